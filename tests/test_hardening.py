"""Values and inputs that used to pass the first checks and then fail deep in a stage, hang, or change data
without saying so: each is now one error line (exit 2) before any work (#12)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.common import ConfigError
from pipeline.config import ACCELERATORS, STRATEGIES, check_machine, load_config

ROOT = Path(__file__).resolve().parents[1]


def config_error(*overrides: str, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


# ------------------------------------------------------------------ training hardware and the teacher


@pytest.mark.parametrize("override, why", [
    ("train.accelerator=gpux", "must be one of auto, cpu, gpu"),
    ("train.strategy=dp", "Lightning's strategies"),
    ("train.strategy=ddpp", "Lightning's strategies"),
    ("train.devices=0", "at least 1"),
    ("train.devices=abc", "a count or a list of device ids"),
    ("train.devices='0'", "at least 1"),
    ("train.devices=[0, 0]", "listed twice"),
    ("train.devices=[]", "a count or a list of device ids"),
    ("train.devices=[0, 1]", "number of processes, not a list"),  # cpu
    ("train.devices=-1", "needs a GPU accelerator"),  # cpu
    ("teacher.path=./no/such/teacher", "does not exist here and is not a hub id"),
    ("teacher.path=/no/such/teacher", "does not exist here and is not a hub id"),
    ("teacher.path=~/no-such-teacher", "does not exist here and is not a hub id"),
    ("teacher.path=org/name/extra", "does not exist here and is not a hub id"),
    ("teacher.path=''", "empty"),
])
def test_values_lightning_or_the_teacher_loader_would_reject_fail_in_the_config(override, why):
    message = config_error(override)
    assert why in message and "\n" not in message


def test_accepted_hardware_values_still_load(tmp_path):
    for override in ("train.accelerator=auto", "train.accelerator=GPU", "train.devices=auto", "train.devices=4",
                     "train.devices='2'", "train.strategy=ddp", "train.strategy=DDP_spawn",
                     "teacher.path=sentence-transformers/all-MiniLM-L6-v2", "teacher.path=bert-base-uncased"):
        load_config(None, [override])
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    assert "no tokenizer.json" in config_error(f"teacher.path={teacher}")
    (teacher / "tokenizer.json").write_text("{}")
    assert load_config(None, [f"teacher.path={teacher}"]).teacher.path == str(teacher)
    assert "is a file" in config_error(f"teacher.path={teacher / 'tokenizer.json'}")


def test_the_accepted_names_are_lightnings():
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    assert set(STRATEGIES) == {"auto", *StrategyRegistry.available_strategies()}
    assert set(ACCELERATORS) == {"auto", "gpu", *AcceleratorRegistry.available_accelerators()}


def test_check_machine_refuses_gpus_this_machine_lacks(monkeypatch):
    import torch

    check_machine(load_config(None, ["train.accelerator=cpu", "train.devices=4"]).train)  # processes: fine
    check_machine(load_config(None, ["train.accelerator=auto"]).train)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        check_machine(load_config(None, ["train.accelerator=gpu"]).train)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_machine(load_config(None, ["train.accelerator=gpu", "train.devices=2"]).train)
    check_machine(load_config(None, ["train.accelerator=cuda", "train.devices=[0, 1]"]).train)
    check_machine(load_config(None, ["train.accelerator=gpu", "train.devices=-1"]).train)
    with pytest.raises(ConfigError, match="has 2 CUDA GPUs"):
        check_machine(load_config(None, ["train.accelerator=gpu", "train.devices=4"]).train)
    with pytest.raises(ConfigError, match="no device 3 here"):
        check_machine(load_config(None, ["train.accelerator=gpu", "train.devices='0,3'"]).train)


def test_cli_train_with_a_gpu_accelerator_and_no_gpu_fails_before_the_data(data_dir, cli, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out = cli("train", "missing-dataset", "-s", "train.accelerator=gpu")
    assert code == 2 and "no CUDA GPU" in out and "missing-dataset" not in out


@pytest.mark.parametrize("strategy, says", [("fsdp", "requires a GPU accelerator"),
                                             ("deepspeed", "must have DeepSpeed installed")])
def test_a_strategy_lightning_refuses_here_fails_before_the_data(strategy, says, data_dir, cli):
    import importlib.util

    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    with pytest.raises(ConfigError, match=f"train.strategy={strategy} .*Lightning refuses it on this machine.*{says}"):
        check_machine(load_config(None, [f"train.strategy={strategy}"]).train)
    code, out = cli("train", "missing-dataset", "-s", f"train.strategy={strategy}")
    assert code == 2 and says in out and "missing-dataset" not in out and out.strip().count("\n") == 0, out


def test_strategies_lightning_accepts_here_pass_the_check():
    for overrides in (["train.strategy=ddp_spawn", "train.devices=2"], ["train.strategy=ddp"],
                      ["train.strategy=ddp_find_unused_parameters_true", "train.precision=bf16-mixed"]):
        check_machine(load_config(None, overrides).train)


def test_tune_and_run_check_the_machine_before_reading_data(data_dir, monkeypatch, tmp_path):
    import torch

    from pipeline.run import run
    from pipeline.tune import tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["train.accelerator=gpu"])
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        tune("missing-dataset", cfg, trials=1)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run(str(tmp_path / "missing.csv"), config=cfg)


def test_run_with_a_hub_teacher_it_cannot_fetch_fails_before_reading_data(data_dir, demo_files, monkeypatch, tmp_path):
    from pipeline.run import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here either way; offline fails at once
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setenv("PREROUTER_MODELS_DIR", str(tmp_path / "models"))
    cfg = load_config(None, ["teacher.path=no-such-org/no-such-encoder"])
    with pytest.raises(ConfigError, match="teacher.path='no-such-org/no-such-encoder' cannot be loaded"):
        run(str(demo_files["wide"]), config=cfg)
    assert not (data_dir / "processed").exists() and not (tmp_path / "models").exists()


# ------------------------------------------------------------------ YAML that expands exponentially

BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi"))


def test_a_billion_laughs_config_file_is_refused_fast(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    t0 = time.perf_counter()
    message = config_error(path=path)
    assert time.perf_counter() - t0 < 1.0
    assert str(path) in message and "aliases" in message and "\n" not in message


def test_a_billion_laughs_override_is_refused_fast():
    t0 = time.perf_counter()
    message = config_error("tune.space=" + BOMB.replace("\n", ", ").join("{}"))
    assert time.perf_counter() - t0 < 1.0 and "aliases" in message


def test_recursive_and_deeply_nested_yaml_are_one_line_errors(tmp_path):
    path = tmp_path / "rec.yaml"
    path.write_text("train: &t\n  lr: [*t]\n")
    assert "recursive" in config_error(path=path)
    path.write_text("[" * 5000 + "]" * 5000)
    assert "nested too deeply" in config_error(path=path)


def test_a_few_aliases_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("train: &t\n  lr: 0.001\nteacher:\n  lr: 0.001\n  batch_size: &b 32\nstudent:\n  hidden: 64\n"
                    "tune:\n  space: {student.hidden: [*b, 64]}\n")
    cfg = load_config(path)
    assert cfg.train.lr == 0.001 and cfg.teacher.batch_size == 32 and cfg.tune.space == {"student.hidden": [32, 64]}


# ------------------------------------------------------------------ one error line, whatever the terminal


def prerouter(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with stdout/stderr on pipes (not a terminal: rich would wrap at 80 columns)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    environ["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", *args], cwd=cwd,
                          capture_output=True, text=True, env=environ | (env or {}), timeout=120)


def test_errors_are_one_line_when_not_on_a_terminal(tmp_path):
    data = tmp_path / "data"
    env = {"PREROUTER_DATA_DIR": str(data)}
    bad = tmp_path / ("a-rather-long-file-name-so-that-the-message-passes-eighty-columns" * 2 + ".jsonl")
    bad.write_text('{"prompt": "x", "a": 1, "b": 0}\n{"prompt": \n')
    result = prerouter("ingest", str(bad), cwd=tmp_path, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "line 2" in lines[0], result.stderr
    assert "Failed to load JSON" not in result.stderr + result.stdout  # the `datasets` logger stays quiet

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('prompt,a,b\n"x,1,0\n')
    result = prerouter("ingest", str(bad_csv), cwd=tmp_path, env=env)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr

    # several config errors: one line, separated by "; "; brackets are printed, not read as markup
    result = prerouter("train", "x", "-s", "train.lr=-1", "-s", "train.max_epochs=0", "-s",
                       "label.score_range=[2, 1]", cwd=tmp_path, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "train.lr:" in lines[0] and "train.max_epochs:" in lines[0] and "[2.0, 1.0]" in lines[0]


# ------------------------------------------------------------------ output paths and names


def test_check_output_path_refuses_what_the_file_system_would(tmp_path):
    from pipeline.common import check_output_path

    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (afile / "bundle", "dir", "afile is a file, not a folder"),
        (afile / "deeper" / "bundle", "dir", "afile is a file, not a folder"),
        (afile, "dir", "is a file; a folder is written there"),
        (tmp_path, "file", "is a folder; a file is written there"),
        (tmp_path / ("n" * 300), "dir", "the file system takes"),
        (tmp_path / ("n" * 240), "dir", "room for a temporary copy"),
        (tmp_path / ("n" * 300) / "bundle", "dir", "the file system takes"),
        (str(tmp_path / "a\0b"), "dir", "NUL byte"),
        ("", "dir", "empty path"),
    ]
    for path, kind, why in cases:
        with pytest.raises(ConfigError, match=why):
            check_output_path(path, kind, "--out")
    assert check_output_path(tmp_path / "new" / "bundle") == tmp_path / "new" / "bundle"
    assert check_output_path(tmp_path / "scores.jsonl", "file", "--output") == tmp_path / "scores.jsonl"


@pytest.mark.parametrize("args, why", [
    (["export", "x", "--out", "{afile}/bundle"], "--out {afile}/bundle: {afile} is a file, not a folder"),
    (["export", "x", "--out", "{afile}"], "is a file; a folder is written there"),
    (["report", "b", "--data", "x", "--out", "{afile}/r"], "is a file, not a folder"),
    (["pull", "x", "--out", "{afile}/b"], "is a file, not a folder"),
    (["demo-data", "--out", "{afile}"], "is a file; a folder is written there"),
    (["score", "b", "--input", "i.jsonl", "--output", "{tmp}"], "--output {tmp} is a folder"),
    (["score", "b", "--input", "i.jsonl", "--output", "{afile}/s.jsonl"], "is a file, not a folder"),
    (["ingest", "{csv}", "--name", "n" * 250], "--name: the name"),
    (["ingest", "{csv}", "--name", "a/b"], "invalid --name 'a/b'"),
    (["run", "{csv}", "--name", "n" * 300], "--name: the name"),
    (["run", "{csv}", "--out", "{afile}/b"], "is a file, not a folder"),
    (["calibrate", "b", "--prompts", "p.jsonl", "--out", "{tmp}/new", "--report", "{afile}/r"], "--report"),
])
def test_cli_output_paths_and_names_fail_in_one_line_before_any_work(args, why, data_dir, tmp_path, cli,
                                                                      monkeypatch, demo_files):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "mlruns"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    fill = {"afile": afile, "tmp": tmp_path, "csv": demo_files["wide"]}
    code, out = cli(*[a.format(**fill) for a in args])
    assert code == 2 and why.format(**fill) in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert not any((data_dir / "processed").glob("*"))  # nothing ingested
    assert not (tmp_path / "mlruns").exists()  # nothing started


def test_ingest_and_run_check_the_name_as_library_calls(data_dir, demo_files, tmp_path):
    from pipeline.ingest import ingest
    from pipeline.run import run

    with pytest.raises(ConfigError, match="the file system takes"):
        ingest(str(demo_files["wide"]), name="n" * 300)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        (tmp_path / "afile").write_text("x")
        run(str(demo_files["wide"]), out=tmp_path / "afile" / "bundle")


# ------------------------------------------------------------------ ingest never changes data silently


def _ingest_error(path, **kwargs) -> str:
    from pipeline.common import DataError
    from pipeline.ingest import ingest

    with pytest.raises(DataError) as e:
        ingest(str(path), **kwargs)
    return str(e.value)


def _binary_rows(n: int = 100, seed: int = 0) -> list[tuple[str, int, int]]:
    import random

    rng = random.Random(seed)
    return [(f"prompt {i}", rng.randint(0, 1), rng.randint(0, 1)) for i in range(n)]


@pytest.mark.parametrize("code, says", [
    (errno.ENOSPC, "No space left on device; free disk space, or point PREROUTER_DATA_DIR"),
    (errno.EROFS, "Read-only file system; the file system is read-only: point the PREROUTER_*_DIR variables"),
    (errno.EACCES, "Permission denied"),
])
def test_a_full_disk_or_refused_write_is_one_line_exit_1_and_leaves_nothing(code, says, data_dir, demo_files, cli,
                                                                           monkeypatch):
    import pipeline.ingest_output as ingest_output

    def no_room(table, path):
        raise OSError(code, os.strerror(code), str(path / "data-00000-of-00001.arrow"))

    monkeypatch.setattr(ingest_output, "_save", no_room)
    status, out = cli("ingest", demo_files["long"], "--name", "full")
    assert status == 1 and out.strip().count("\n") == 0, out
    assert "error:" in out and "Traceback" not in out and f"data-00000-of-00001.arrow: {says}" in out
    assert not (data_dir / "processed" / "full").exists()
    assert not [p for p in (data_dir / "processed").iterdir() if "full" in p.name]  # no temporary folder left


def test_an_oserror_that_is_not_the_machines_keeps_its_traceback(data_dir, demo_files, cli, monkeypatch):
    import pipeline.ingest_output as ingest_output

    def missing(table, path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(ingest_output, "_save", missing)
    with pytest.raises(FileNotFoundError):
        cli("ingest", demo_files["long"], "--name", "gone")


def test_duplicated_column_names_are_an_error_naming_them(data_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "dup.csv"
    csv.write_text("prompt,m,m,n,n\n" + "".join(f"{p},{a},{b},{a},{b}\n" for p, a, b in _binary_rows()))
    message = _ingest_error(csv)
    assert "'m', 'n' appear more than once" in message
    jsonl = tmp_path / "dup.jsonl"
    jsonl.write_text("".join(f'{{"prompt": "{p}", "m": {a}, "m": {b}, "n": 1}}\n' for p, a, b in _binary_rows()))
    assert "'m' appear more than once" in _ingest_error(jsonl)
    table = pa.table([pa.array([p for p, _, _ in _binary_rows()]), pa.array([a for _, a, _ in _binary_rows()]),
                      pa.array([b for _, _, b in _binary_rows()])], names=["prompt", "m", "m"])
    parquet = tmp_path / "dup.parquet"
    pq.write_table(table, parquet)
    assert "'m' appear more than once" in _ingest_error(parquet)
    # m and m.1 written as such are two names, not a duplicate
    ok = tmp_path / "ok.csv"
    ok.write_text("prompt,m,m.1\n" + "".join(f"{p},{a},{b}\n" for p, a, b in _binary_rows()))
    from pipeline.common import read_json
    from pipeline.ingest import ingest

    assert read_json(ingest(str(ok)) / "manifest.json")["models"] == ["m", "m.1"]


def test_a_bar_in_a_wide_column_name_is_an_error_unless_the_models_are_named(data_dir, tmp_path):
    from pipeline.common import read_json
    from pipeline.ingest import ingest

    path = tmp_path / "bar.csv"
    path.write_text("prompt,a,b|c,d\n" + "".join(f"{p},{x},{y},{x}\n" for p, x, y in _binary_rows()))
    message = _ingest_error(path)
    assert "'b|c'" in message and "--models" in message
    manifest = read_json(ingest(str(path), models=["a", "b|c", "d"]) / "manifest.json")
    assert manifest["models"] == ["a", "b|c", "d"]
    # RouterBench's suffixes are still per-model columns
    bench = tmp_path / "bench.csv"
    bench.write_text("prompt,a,a|total_cost,a|model_response,b,b|total_cost\n"
                     + "".join(f"{p},{x},0.1,text,{y},0.2\n" for p, x, y in _binary_rows()))
    assert read_json(ingest(str(bench)) / "manifest.json")["models"] == ["a", "b"]


@pytest.mark.parametrize("value", [-3, 5, 1.5])
def test_one_out_of_range_cell_in_a_0_1_column_names_column_row_and_value(data_dir, tmp_path, value):
    rows = _binary_rows()
    path = tmp_path / "cell.csv"
    lines = [f"{p},{a},{b},{0.25 * (i % 5)}" for i, (p, a, b) in enumerate(rows)]
    lines[41] = f"prompt 41,{value},0,0.5"
    path.write_text("prompt,a,b,c\n" + "\n".join(lines) + "\n")
    message = _ingest_error(path)
    assert "row 42" in message and "column 'a'" in message and f"value {value:g}" in message
    lines[41] = f"prompt 41,1,0,{value}"  # a fractional 0-1 column too
    path.write_text("prompt,a,b,c\n" + "\n".join(lines) + "\n")
    message = _ingest_error(path)
    assert "row 42" in message and "column 'c'" in message


def test_an_out_of_range_score_in_the_long_layout_names_the_model(data_dir, tmp_path):
    import json

    path = tmp_path / "long.jsonl"
    records = [{"prompt": p, "model": m, "score": s} for p, a, b in _binary_rows() for m, s in (("x", a), ("y", b))]
    records[21]["score"] = 7
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    message = _ingest_error(path)
    assert "'score' of model 'y'" in message and "value 7" in message and "row 22" in message


def test_real_scales_still_ingest_and_label(data_dir, tmp_path):
    import random

    from pipeline.common import read_json
    from pipeline.ingest import ingest
    from pipeline.label import label

    rng = random.Random(1)
    judge = tmp_path / "judge.csv"
    judge.write_text("prompt,a,b\n" + "".join(f"p{i},{rng.randint(1, 10)},{rng.randint(1, 10)}\n" for i in range(200)))
    ingest(str(judge), models=["a", "b"])
    assert label("judge")["scale"]["rule"].startswith("1-10 judge")
    # a 0-5 rating used across its range is a scale, not a 0-1 column with bad cells
    rating = tmp_path / "rating.csv"
    rating.write_text("prompt,a,b\n" + "".join(f"p{i},{rng.randint(0, 5)}.0,{rng.randint(0, 5)}.0\n"
                                               for i in range(200)))
    assert read_json(ingest(str(rating)) / "manifest.json")["outcome_range"] == [0.0, 5.0]


# ------------------------------------------------------------------ a stopped `prerouter run` and MLflow


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PREROUTER_MODELS_DIR", str(tmp_path / "models"))
    mlflow.set_tracking_uri(uri)
    from pipeline.common import setup_mlflow

    setup_mlflow()
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def _stub_stages(monkeypatch, **overrides):
    """run()'s stages replaced by no-ops (or `overrides`), so only its own bookkeeping runs."""
    import pipeline.evaluate
    import pipeline.export
    import pipeline.ingest
    import pipeline.label
    import pipeline.latency
    import pipeline.train
    from pipeline.common import DataError

    def no_test_split(name):
        raise DataError("no test prompts")

    stubs = {(pipeline.ingest, "ingest"): lambda *a, **k: None, (pipeline.label, "label"): lambda *a, **k: None,
             (pipeline.train, "train"): lambda *a, **k: None, (pipeline.export, "export"): lambda *a, **k: None,
             (pipeline.latency, "check_latency"): lambda *a, **k: None,
             (pipeline.label, "require_test_split"): no_test_split}
    for (module, attr), fn in stubs.items():
        monkeypatch.setattr(module, attr, overrides.get(attr, fn))


def _parent_runs(name: str):
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("prerouter")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = 'run-{name}'")


def test_sigterm_during_run_marks_its_mlflow_run_killed(tracking, monkeypatch, data_dir):
    import signal

    from pipeline.run import Terminated, run

    def killed_while_ingesting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the run")

    _stub_stages(monkeypatch, ingest=killed_while_ingesting)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as e:
        run("demo.csv", name="demo")
    assert e.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the run's only
    (parent,) = _parent_runs("demo")
    assert parent.info.status == "KILLED"


def test_the_next_run_marks_a_parent_left_running_by_a_killed_process_killed(tracking, monkeypatch, data_dir):
    import subprocess

    from mlflow import MlflowClient

    from pipeline.common import process_start
    from pipeline.run import HOST, end_stale_runs, run

    client = MlflowClient()
    exp = client.get_experiment_by_name("prerouter").experiment_id
    gone = subprocess.Popen(["true"])
    gone.wait()

    def left_running(pid, start=""):
        parent = client.create_run(exp, run_name="run-demo", tags={"prerouter.host": HOST, "prerouter.pid": str(pid),
                                                                   "prerouter.pid_start": str(start)})
        child = client.create_run(exp, run_name="train-demo", tags={"mlflow.parentRunId": parent.info.run_id})
        return parent.info.run_id, child.info.run_id

    dead, dead_child = left_running(gone.pid)
    alive, _ = left_running(os.getpid(), process_start(os.getpid()))  # a run still going: left alone
    other_host = client.create_run(exp, run_name="run-demo", tags={"prerouter.host": "elsewhere",
                                                                   "prerouter.pid": str(gone.pid)}).info.run_id
    assert end_stale_runs("demo") == [dead]
    status = {r: client.get_run(r).info.status for r in (dead, dead_child, alive, other_host)}
    assert status == {dead: "KILLED", dead_child: "KILLED", alive: "RUNNING", other_host: "RUNNING"}

    # `prerouter run` does it before starting its own parent
    client.set_terminated(alive, "FINISHED")
    again, _ = left_running(gone.pid)
    _stub_stages(monkeypatch)
    monkeypatch.setattr("pipeline.run._ensure_registered", lambda name, bundle: None)
    run("demo.csv", name="demo")
    assert client.get_run(again).info.status == "KILLED"
    assert {r.info.status for r in _parent_runs("demo") if r.info.run_id not in (dead, again, alive, other_host)} \
        == {"FINISHED"}


def test_run_reads_several_inputs_as_ingest_does(tracking, monkeypatch, data_dir, tmp_path, cli):
    """`prerouter run a.csv b.csv`: one dataset of both files, named after the first, both listed as the source."""
    import pandas as pd

    import pipeline.ingest
    from pipeline.common import read_json

    _stub_stages(monkeypatch, ingest=pipeline.ingest.ingest)
    monkeypatch.setattr("pipeline.run._ensure_registered", lambda name, bundle: None)
    first, second = tmp_path / "votes-1.csv", tmp_path / "votes-2.csv"
    pd.DataFrame({"prompt": ["p1", "p2"], "a": [1, 0], "b": [0, 1]}).to_csv(first, index=False)
    pd.DataFrame({"prompt": ["p3"], "a": [1], "b": [1]}).to_csv(second, index=False)
    code, out = cli("run", first, second)
    assert code == 0, out
    manifest = read_json(data_dir / "processed" / "votes-1" / "manifest.json")
    assert manifest["n_prompts"] == 3 and manifest["source"] == f"{first} + {second}"
    (parent,) = _parent_runs("votes-1")
    assert parent.data.tags["source"] == f"{first} + {second}"


@pytest.mark.parametrize("registered", [False, True])
def test_a_rerun_registers_a_bundle_that_export_skipped_as_up_to_date(tracking, monkeypatch, data_dir, registered):
    import types

    import pipeline.export
    import pipeline.registry
    import pipeline.train
    from pipeline.common import DataError
    from pipeline.run import run

    def version_of(name, bundle):
        if registered:
            return "3"
        raise DataError("no version of prerouter-demo holds this bundle")

    logged = []
    monkeypatch.setattr(pipeline.registry, "version_of", version_of)
    monkeypatch.setattr(pipeline.export, "log_bundle", lambda bundle, meta, name: logged.append((bundle, meta, name)))
    monkeypatch.setattr(pipeline.train, "load_trained", lambda name: types.SimpleNamespace(meta={"m": 1}))
    _stub_stages(monkeypatch)
    out = run("demo.csv", name="demo")
    assert logged == ([] if registered else [(out, {"m": 1}, "demo")])


def test_setup_mlflow_follows_the_mlruns_dir_it_set_itself_but_keeps_a_team_server(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a second local store in the same process
    must still be used, while a URI the user set stays in charge."""
    import mlflow

    from pipeline.common import setup_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "one"))
    setup_mlflow()
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "two"))
    setup_mlflow()
    assert mlflow.get_tracking_uri() == f"sqlite:///{(tmp_path / 'two').resolve() / 'mlflow.db'}"
    team = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team)
    setup_mlflow()
    assert mlflow.get_tracking_uri() == team


@pytest.mark.parametrize("args, says", [
    (("report", "some/bundle"), "Missing option '--data'"),
    (("train",), "Missing argument"),
    (("evaluate", "x", "--no-such-option"), "No such option"),
])
def test_usage_errors_are_clicks_message_and_exit_2_not_a_traceback(cli, args, says):
    code, out = cli(*args)
    assert code == 2 and says in out and "Traceback" not in out
