"""make retrain end to end on the demo data: the first challenger becomes champion, a shuffled-label one is refused."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_retrain_promotes_then_refuses_a_shuffled_label_challenger(tmp_path, demo_files):
    from mlflow import MlflowClient

    from pipeline.demo import generate
    from tests.tiny import make_tiny_teacher

    teacher = make_tiny_teacher(tmp_path / "teacher")
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "teacher": {"path": str(teacher), "epochs": 3, "head_hidden": 16},
        "student": {"dim": 16, "hidden": 16, "max_tokens": 16, "heads": 2},
        "train": {"max_epochs": 8, "batch_size": 64, "distill_weight": 0.0},
        "export": {"latency_decisions": 10}}))
    env = {**os.environ, "PREROUTER_DATA_DIR": str(tmp_path / "data"), "PREROUTER_MODELS_DIR": str(tmp_path / "models"),
           "PREROUTER_MLRUNS_DIR": str(tmp_path / "mlruns"), "PREROUTER_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def retrain(data: Path, *extra: str) -> subprocess.CompletedProcess:
        # -o: the installed .venv counts as up to date (no reinstall from inside a test)
        return subprocess.run(["make", "-C", str(ROOT), "-o", ".venv/.installed", "retrain", f"DATA={data}", "NAME=demo",
                               f"CONFIG={config}", "BUDGET_MS=200", *extra], env=env, capture_output=True, text=True,
                              timeout=600)

    first = retrain(demo_files["wide"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "does not exist yet" in first.stderr + first.stdout

    from pipeline.common import setup_mlflow

    old = os.environ.get("PREROUTER_MLRUNS_DIR")
    os.environ["PREROUTER_MLRUNS_DIR"] = str(tmp_path / "mlruns")
    try:
        setup_mlflow()
        client = MlflowClient()
        assert str(client.get_model_version_by_alias("prerouter-demo", "champion").version) == "1"
        router = json.loads((tmp_path / "models" / "demo" / "bundle" / "router.json").read_text())
        assert set(router["decision"]["reference"]["quantiles"]) == {"small-7b", "medium-34b", "large-70b", "pair_score"}

        # next month: the same prompts with every row's outcomes shuffled onto another row
        frame = pd.read_csv(demo_files["wide"])
        outcomes = ["small-7b", "medium-34b", "large-70b"]
        perm = np.random.default_rng(0).permutation(len(frame))
        frame[outcomes] = frame[outcomes].to_numpy()[perm]
        shuffled = tmp_path / "shuffled.csv"
        frame.to_csv(shuffled, index=False)
        held_out = generate(tmp_path / "heldout", n_prompts=600, seed=1)["wide"]
        second = retrain(shuffled, f"EVAL_DATA={held_out}")
        assert second.returncode != 0, second.stdout[-3000:]
        verdict = json.loads((tmp_path / "models" / "demo" / "compare" / "compare.json").read_text())
        assert verdict["verdict"] == "keep" and verdict["champion"] == "models:/prerouter-demo@champion"
        assert str(client.get_model_version_by_alias("prerouter-demo", "champion").version) == "1"
        assert len(client.search_model_versions("name='prerouter-demo'")) == 2  # registered, not promoted
    finally:
        if old is None:
            os.environ.pop("PREROUTER_MLRUNS_DIR", None)
        else:
            os.environ["PREROUTER_MLRUNS_DIR"] = old
