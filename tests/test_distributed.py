"""Distributed training: `prerouter train` under ddp on 2 CPU processes (gloo) decides as one process
does (validation metrics gathered from both) and writes one checkpoint and one MLflow run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.common import versions

from .leftovers import leftovers, visible
from .tiny import labeled_with_tiny_teacher, run_two_ranks

ROOT = Path(__file__).resolve().parents[1]
# One member: the val_apgr curve a run logs is then the shipped net's, which the test compares.
TINY = ["teacher.epochs=3", "teacher.head_hidden=16", "student.dim=16", "student.hidden=16", "student.members=1",
        "student.max_tokens=16", "train.max_epochs=3", "train.group_by=null", "train.accelerator=cpu"]


def _history(tracking_uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)}


def _best_epoch_apgr(tracking_uri: str, run_id: str) -> float:
    """val_apgr as logged by the student's validation at the epoch of its best (first lowest) val_loss,
    the epoch whose weights the checkpoint keeps."""
    loss = _history(tracking_uri, run_id, "val_loss")
    apgr = _history(tracking_uri, run_id, "val_apgr")
    best = min(sorted(loss), key=lambda step: loss[step])
    return apgr[best]


@pytest.mark.timeout(300)
def test_ddp_on_two_cpu_processes_matches_one_process_and_writes_once(tmp_path, monkeypatch, demo_files):
    from mlflow import MlflowClient

    from pipeline.common import read_json
    from pipeline.config import load_config
    from pipeline.train import train

    teacher = labeled_with_tiny_teacher(monkeypatch, tmp_path, demo_files["wide"], "demo",
                                        PREROUTER_MODELS_DIR="one/models")
    overrides = [f"teacher.path={teacher}", *TINY]

    # one process, batches of 64
    train("demo", load_config(overrides=overrides + ["train.batch_size=64", "teacher.batch_size=64"]))
    one = read_json(tmp_path / "one/models/demo/checkpoint/meta.json")

    # two processes, 32 rows each per step (the same 64 per optimiser step), started as a user starts
    # them: one command, whose Lightning ddp launcher runs the same command again as rank 1
    # (one MLflow store for both runs: creating a SQLite store costs seconds)
    env = os.environ | {"PREROUTER_MODELS_DIR": str(tmp_path / "two/models"), "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": str(ROOT)}
    sets = [a for o in overrides + ["train.batch_size=32", "teacher.batch_size=32", "train.strategy=ddp",
                                    "train.devices=2"] for a in ("-s", o)]
    run_two_ranks([sys.executable, "-m", "pipeline", "train", "demo", *sets], env, tmp_path, 240, "ddp training")

    # written once: one checkpoint directory (no second writer's leftovers) holding the weights once
    # (Lightning's own checkpoints are dropped), one MLflow run (beside the one-process run's), the one the
    # checkpoint names
    models = tmp_path / "two/models/demo"
    assert visible(models) == ["checkpoint"] and leftovers(models) == [] and len(versions(models / "checkpoint")) == 1
    two = read_json(models / "checkpoint/meta.json")
    assert sorted(p.name for p in (models / "checkpoint").iterdir()) == [
        "config.yaml", "meta.json", "student.pt", "teacher_head.pt"]
    uri = f"sqlite:///{(tmp_path / 'mlruns/mlflow.db').resolve()}"
    experiments = [e.experiment_id for e in MlflowClient(uri).search_experiments()]
    runs = MlflowClient(uri).search_runs(experiments)
    assert sorted(r.data.params["train.strategy"] for r in runs) == ["auto", "ddp"]
    assert [r.info.run_id for r in runs if r.data.params["train.strategy"] == "ddp"] == [two["mlflow_run_id"]]

    # gathered: the val_apgr both processes logged (and early-stopped / checkpointed on) is the metric of
    # the whole validation split, not of one process's half: at the kept epoch it equals what rank 0
    # measures afterwards on every validation prompt with the kept weights
    assert _best_epoch_apgr(uri, two["mlflow_run_id"]) == pytest.approx(two["metrics"]["val"]["apgr"], abs=1e-6)
    assert _best_epoch_apgr(uri, one["mlflow_run_id"]) == pytest.approx(one["metrics"]["val"]["apgr"], abs=1e-6)

    # and the two runs agree: same rows, same split, close metrics (the order of the training rows differs)
    assert one["metrics"]["val"]["n"] == two["metrics"]["val"]["n"]
    for split in ("val", "test"):
        for key in ("apgr", "bce"):
            assert two["metrics"][split][key] == pytest.approx(one["metrics"][split][key], abs=0.05), (split, key)
    assert np.isfinite(two["metrics"]["teacher_test"]["apgr"])
