"""Values and inputs that used to pass the first checks and then fail deep in a stage, hang, or change data
without saying so: each is now one error line (exit 2) before any work (#12)."""
from __future__ import annotations

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
