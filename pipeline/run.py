"""End to end: ingest -> label -> (tune) -> train -> export -> check-latency -> evaluate -> report.

One MLflow parent run wraps the stages; each stage that logs opens a nested run. Every stage is
skipped when its inputs are unchanged (content hashes), so a rerun after a crash resumes where the
last finished stage left off.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from .common import (DataError, GateError, check_name, check_output_path, console, model_dir, process_alive,
                     process_start, setup_mlflow)
from .config import Config, check_machine, load_config
from .ingest_sources import default_name


HOST = socket.gethostname()


class Terminated(SystemExit):
    """SIGTERM during `run`: unwinds like an exception (temporary folders removed), exit status 143."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` instead of ending the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_stale_runs(name: str) -> list[str]:
    """Mark KILLED the `run-NAME` parent runs (and their RUNNING children) left RUNNING by a `prerouter run`
    on this machine whose process is gone (a SIGKILL, a crash of the machine): MLflow cannot tell."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("prerouter")
    if experiment is None:
        return []
    stale = []
    for r in client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = 'run-{name}' "
                                "and attributes.status = 'RUNNING'"):
        tags = r.data.tags
        pid, start = tags.get("prerouter.pid"), tags.get("prerouter.pid_start")
        if tags.get("prerouter.host") != HOST or not (pid or "").isdigit():
            continue  # another machine's, or from before runs recorded their process: cannot tell
        if process_alive(int(pid), int(start) if (start or "").isdigit() else None):
            continue
        children = client.search_runs([experiment.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{r.info.run_id}' and attributes.status = 'RUNNING'"))
        for run_ in [*children, r]:
            client.set_tag(run_.info.run_id, "prerouter.ended_by", "a later run found its process gone")
            client.set_terminated(run_.info.run_id, "KILLED")
        stale.append(r.info.run_id)
    if stale:
        console.print(f"[yellow]MLflow run(s) {', '.join(stale)} of run-{name} were left RUNNING by a stopped "
                      "process; marked KILLED[/]")
    return stale


def _ensure_registered(name: str, bundle: Path) -> None:
    """Register the bundle when the registry has no version of it: a run killed after the bundle was swapped
    in but before export registered it leaves a bundle that export then finds up to date and skips."""
    from .export import log_bundle
    from .registry import version_of
    from .train import load_trained

    try:
        version_of(name, bundle)
    except DataError:
        console.print(f"[yellow]{bundle} is not in the model registry (an earlier run stopped before "
                      "registering it); registering it now[/]")
        log_bundle(bundle, load_trained(name).meta, name)


def run(data: str | Sequence[str], out: Path | None = None, name: str | None = None, trials: int = 0,
        budget_ms: float = 1.0, config: Config | None = None, split_column: str | None = None,
        test_data: str | None = None, layout: str | None = None, models: list[str] | None = None,
        rename: dict[str, str] | None = None, prompts: str | None = None) -> Path:
    """Run every stage on `data`; returns the bundle directory. Evaluate and report are skipped, with one
    line saying so, when the test split is empty (e.g. a `split_column` holding only train and val).
    `data` is what ingest reads (several inputs are merged; the first names the dataset by default);
    `layout`, `models`, `rename`, `prompts`, `split_column` and `test_data` are ingest's options."""
    import mlflow

    from .encoders import tokenizer_file
    from .evaluate import evaluate
    from .export import check_bundle_dir, export
    from .ingest import ingest
    from .label import label, require_test_split
    from .latency import check_latency
    from .train import train

    cfg = config or load_config()
    check_machine(cfg.train)
    tokenizer_file(cfg.teacher.path)  # a hub teacher that cannot be fetched fails now, not after ingest and label
    inputs = [data] if isinstance(data, str) else list(data)
    name = check_name(name or default_name(inputs[0]))
    out = check_bundle_dir(check_output_path(Path(out) if out else model_dir(name) / "bundle"))  # before any work
    setup_mlflow()
    end_stale_runs(name)
    timings: dict[str, float] = {}

    def stage(title: str, fn, *args, **kwargs):
        console.rule(f"[bold]{title}")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[title] = round(time.perf_counter() - t0, 2)
        return result

    parent_id = None
    try:
        with _sigterm_unwinds(), mlflow.start_run(run_name=f"run-{name}") as parent:
            parent_id = parent.info.run_id
            mlflow.set_tags({"dataset": name, "source": " + ".join(inputs), "prerouter.host": HOST,
                             "prerouter.pid": os.getpid(),
                             "prerouter.pid_start": process_start(os.getpid()) or ""})
            stage("ingest", ingest, data, name=name, layout=layout, models=models, rename=rename,
                  prompts=prompts, split_column=split_column, test_data=test_data)
            stage("label", label, name, cfg.label)
            if trials > 0:
                from .tune import tune

                cfg = stage("tune", tune, name, cfg, trials=trials).config
            stage("train", train, name, cfg)
            stage("export", export, name, out=out, config=cfg)
            _ensure_registered(name, out)
            gate_failure = None
            try:
                stage("check-latency", check_latency, out, budget_ms=budget_ms,
                      decisions=cfg.export.latency_decisions)
            except GateError as e:  # still evaluate and report the bundle; fail the run at the end
                gate_failure = e
                console.print(f"[bold red]{e}[/] (continuing with evaluate and report)")
            try:
                require_test_split(name)
            except DataError as e:
                console.print(f"[yellow]evaluate and report skipped:[/] {e}")
            else:
                stage("evaluate", evaluate, name, bundle=out)
                try:
                    from .report import report
                except ImportError:  # the report stage is optional for the pipeline's correctness
                    report = None
                if report is not None:
                    stage("report", report, out, data=name)
            mlflow.log_metrics({f"seconds_{k.replace('-', '_')}": v for k, v in timings.items()})
            console.rule("[bold green]done")
            console.print(f"bundle: [bold]{out}[/]  (MLflow run {parent.info.run_id})")
            console.print(f"stage seconds: {timings}")
            if gate_failure is not None:
                mlflow.set_tag("latency_gate", "failed")
                raise gate_failure
            console.print(f"next: `prerouter route {out} \"your prompt\"` or `prerouter score {out} "
                          "--input prompts.jsonl --output scores.jsonl`")
    except (Terminated, KeyboardInterrupt):
        if parent_id is not None:  # the block ended it FAILED; it was stopped, not broken
            from mlflow import MlflowClient

            MlflowClient().set_terminated(parent_id, "KILLED")
        raise
    return out
