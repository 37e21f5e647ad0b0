"""End to end: ingest -> label -> (tune) -> train -> export -> check-latency -> evaluate -> report.

One MLflow parent run wraps the stages; each stage that logs opens a nested run. Every stage is
skipped when its inputs are unchanged (content hashes), so a rerun after a crash resumes where the
last finished stage left off.
"""
from __future__ import annotations

import time
from pathlib import Path

from .common import DataError, GateError, check_name, check_output_path, console, model_dir, setup_mlflow
from .config import Config, check_machine, load_config


def _name_of(data: str) -> str:
    return Path(data.removeprefix("hf:")).stem.replace("/", "_") if data else "data"


def run(data: str, out: Path | None = None, name: str | None = None, trials: int = 0,
        budget_ms: float = 1.0, config: Config | None = None, split_column: str | None = None,
        test_data: str | None = None) -> Path:
    """Run every stage on `data`; returns the bundle directory. Evaluate and report are skipped, with one
    line saying so, when the test split is empty (e.g. a `split_column` holding only train and val)."""
    import mlflow

    from .evaluate import evaluate
    from .export import check_bundle_dir, export
    from .ingest import ingest
    from .label import label, require_test_split
    from .latency import check_latency
    from .train import train

    cfg = config or load_config()
    check_machine(cfg.train)
    name = check_name(name or _name_of(data))
    out = check_bundle_dir(check_output_path(Path(out) if out else model_dir(name) / "bundle"))  # before any work
    setup_mlflow()
    timings: dict[str, float] = {}

    def stage(title: str, fn, *args, **kwargs):
        console.rule(f"[bold]{title}")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[title] = round(time.perf_counter() - t0, 2)
        return result

    with mlflow.start_run(run_name=f"run-{name}") as parent:
        mlflow.set_tags({"dataset": name, "source": data})
        stage("ingest", ingest, data, name=name, split_column=split_column, test_data=test_data)
        stage("label", label, name, cfg.label)
        if trials > 0:
            from .tune import tune

            cfg = stage("tune", tune, name, cfg, trials=trials).config
        stage("train", train, name, cfg)
        stage("export", export, name, out=out, config=cfg)
        gate_failure = None
        try:
            stage("check-latency", check_latency, out, budget_ms=budget_ms, decisions=cfg.export.latency_decisions)
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
        console.print(f"next: `prerouter route {out} \"your prompt\"` or `prerouter score {out} --input prompts.jsonl "
                      f"--output scores.jsonl`")
    return out
