"""The registered version is an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/prerouter-NAME/latest")`
routes like `Router.load(bundle)`, its signature takes a `prompt` column, its environment is the runtime's
alone, and `prerouter pull` still yields exactly the bundle."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.runtime import Router

from .fabricate import tiny_bundle

MULTI = {"kind": "multi", "cost_lambdas": {"0.25": 0.4, "0.5": 0.1, "1.0": 0.0}}
PROMPTS = ["What is the capital of France?", "", "def f(x):\n    return x ** 2\n" * 20,
           "Prove that there are infinitely many primes. " * 40, "日本語のテキスト 😀", "a\x00b\x07c",
           "Summarize this essay in one line.", "x^2 + y^2 = 1"]
TRAINING_STACK = ("torch", "lightning", "transformers", "datasets", "optuna", "rich", "typer", "prerouter")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A pair bundle registered as prerouter-tiny (versions 1 and 2, the same bundle) and a 3-model bundle
    as prerouter-multi, in a SQLite registry of this module."""
    from pipeline.export import log_bundle

    root = tmp_path_factory.mktemp("mlflow-model")
    pair, _ = tiny_bundle(root / "pair")
    multi, _ = tiny_bundle(root / "multi", n_models=3, decision=MULTI)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREROUTER_MLRUNS_DIR", str(root / "mlruns"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert log_bundle(pair, {}, "tiny") == "1"
        assert log_bundle(pair, {}, "tiny") == "2"
        assert log_bundle(multi, {}, "multi") == "1"
        yield {"root": root, "pair": pair, "multi": multi}


@pytest.fixture
def store(registered, monkeypatch):
    from pipeline.common import setup_mlflow

    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(registered["root"] / "mlruns"))
    setup_mlflow()
    return registered


@pytest.mark.parametrize("kind, name", [("pair", "tiny"), ("multi", "multi")])
def test_the_registered_model_predicts_what_the_router_decides(store, kind, name):
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/prerouter-{name}/latest")
    router = Router.load(store[kind])
    out = model.predict(pd.DataFrame({"prompt": PROMPTS}))
    p = router.scores(PROMPTS)
    assert out["model"].tolist() == router.decide(PROMPTS)
    for j, m in enumerate(router.models):
        assert np.abs(out[f"scores.{m}"].to_numpy() - p[:, j]).max() <= 1e-6
    if kind == "pair":
        assert np.abs(out["score"].to_numpy() - router.routing_score(p)).max() <= 1e-6
        for fraction in (0.0, 0.3, 0.9, 1.0):
            got = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"strong_fraction": fraction})
            assert got["model"].tolist() == router.decide(PROMPTS, strong_fraction=fraction)
        got = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"threshold": 0.2})
        assert got["model"].tolist() == router.decide(PROMPTS, threshold=0.2)
    else:
        assert "score" not in out.columns
        for lam in (0.0, 0.1, 0.4, 5.0):
            got = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"cost_weight": lam})
            assert got["model"].tolist() == router.decide(PROMPTS, cost_weight=lam)
    # {"prompt": [...]} and, on the model itself, a plain list route the same prompts
    assert model.predict({"prompt": PROMPTS})["model"].tolist() == out["model"].tolist()
    assert model.unwrap_python_model().predict(None, PROMPTS)["model"].tolist() == out["model"].tolist()


def test_signature_takes_a_prompt_column(store):
    from mlflow.models import get_model_info

    info = get_model_info("models:/prerouter-tiny/latest")
    inputs, outputs = info.signature.inputs.to_dict(), info.signature.outputs.to_dict()
    assert inputs == [{"type": "string", "name": "prompt", "required": True}]
    assert [c["name"] for c in outputs] == ["model", "score", "scores.weak", "scores.strong"]
    assert {p.name: p.default for p in info.signature.params.params} == {"strong_fraction": None, "threshold": None}
    multi = get_model_info("models:/prerouter-multi/latest").signature
    assert [c["name"] for c in multi.outputs.to_dict()] == ["model", "scores.m0", "scores.m1", "scores.m2"]
    assert [p.name for p in multi.params.params] == ["cost_weight"]
    seal = json.loads((store["pair"] / "router.json").read_text())["bundle_sha256"]
    assert info.metadata["bundle_sha256"] == seal


def test_the_model_needs_only_the_runtime(store):
    """requirements.txt: the runtime's packages (and MLflow); MLmodel ships the runtime's code only; a
    fresh interpreter where neither the project nor the training stack can be imported loads and routes."""
    import mlflow
    import yaml

    local = Path(mlflow.artifacts.download_artifacts("models:/prerouter-tiny/latest"))
    requirements = [r for r in (local / "requirements.txt").read_text().splitlines() if r.strip()]
    names = {re.split(r"[=<>!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}
    assert names == {"mlflow", "numpy", "onnxruntime", "tokenizers"}, requirements
    text = ((local / "requirements.txt").read_text() + (local / "conda.yaml").read_text()
            + (local / "python_env.yaml").read_text()).lower()
    assert not any(heavy in text for heavy in ("torch", "lightning", "transformers"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert "python_model" not in mlmodel["flavors"]["python_function"]  # from code: no pickle to load
    code = sorted(str(f.relative_to(local / "code")) for f in (local / "code").rglob("*.py"))
    assert code == ["prerouter_runtime/__init__.py", "prerouter_runtime/bundle_contract.py",
                    "prerouter_runtime/chat.py",
                    "prerouter_runtime/mlflow_model.py", "prerouter_runtime/routing.py",
                    "prerouter_runtime/runtime.py", "prerouter_runtime/tokenization.py"]

    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in (*TRAINING_STACK, "pipeline"))
    script = (f"import sys; {blocked}\n"
              "import mlflow.pyfunc, pandas as pd\n"
              f"m = mlflow.pyfunc.load_model({str(local)!r})\n"
              f"print(m.predict(pd.DataFrame({{'prompt': {PROMPTS!r}}}))['model'].tolist())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON"))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=local)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == repr(Router.load(store["pair"]).decide(PROMPTS))


def test_served_json_round_trips(store):
    """What `mlflow models serve` answers, without starting it: the scoring app on the loaded model."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from pipeline.registry import promote

    promote("tiny", 2)
    router = Router.load(store["pair"])
    app = scoring_server.init(mlflow.pyfunc.load_model("models:/prerouter-tiny@champion"))
    client = TestClient(app)
    want = router.decide(PROMPTS[:3], strong_fraction=1.0)
    for body in ({"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS[:3]]}},
                 {"dataframe_records": [{"prompt": p} for p in PROMPTS[:3]]},
                 {"inputs": {"prompt": PROMPTS[:3]}}):
        reply = client.post("/invocations", json=body | {"params": {"strong_fraction": 1.0}})
        assert reply.status_code == 200, reply.text
        rows = reply.json()["predictions"]
        assert [r["model"] for r in rows] == want == ["strong"] * 3
        p = router.scores(PROMPTS[:3])
        assert np.abs(np.array([[r["scores.weak"], r["scores.strong"]] for r in rows]) - p).max() <= 1e-6


def test_pull_yields_the_bundle_alone(store, tmp_path):
    from pipeline.registry import pull

    info = pull("tiny@2", tmp_path / "pulled")
    assert info["version"] == "2"
    assert sorted(f.name for f in (tmp_path / "pulled").iterdir()) == sorted(f.name for f in store["pair"].iterdir())
    Router.load(tmp_path / "pulled", verify=True)


def test_defining_the_pyfunc_class_raises_no_warning():
    """MLflow checks a PythonModel's `predict` when the class is defined and warns where it has no input
    type hint; `prerouter export` and every load of the model would print that warning."""
    code = ("import warnings, mlflow.pyfunc\n"  # MLflow's own imports warn about MLflow's classes
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    import pipeline.mlflow_model\n"
            "assert not seen, [str(w.message) for w in seen]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
