"""Serving a bundle needs numpy, onnxruntime and tokenizers only: the heavy training stack is blocked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .test_runtime import tiny_bundle

BLOCKED = ("torch", "transformers", "lightning", "pytorch_lightning", "datasets", "sklearn", "mlflow",
           "optuna", "pandas")

SCRIPT = """
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")

sys.meta_path.insert(0, Block())
from pipeline.runtime import Router

router = Router.load(BUNDLE)
print(json.dumps({
    "route": router.route("Explain quicksort in one paragraph."),
    "models": router.models,
    "shape": list(router.scores(["a", "b c"]).shape),
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "onnxruntime", "tokenizers")
                     and "." not in m),
    "extra": sorted(m for m in ("pipeline.common", "pydantic", "rich", "yaml") if m in sys.modules),
}))
"""


def test_route_with_training_stack_blocked(tmp_path):
    bundle, _ = tiny_bundle(tmp_path / "bundle")
    code = f"BLOCKED = {BLOCKED!r}\nBUNDLE = {str(bundle)!r}\n" + SCRIPT
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["route"] in ("weak", "strong") and out["models"] == ["weak", "strong"]
    assert out["shape"] == [2, 2]
    assert out["loaded"] == ["numpy", "onnxruntime", "tokenizers"]
    assert out["extra"] == []  # not even the pipeline's own plumbing on the serving path


def test_blocker_really_blocks(tmp_path):
    # The same finder must make a training-stack import fail, or the test above proves nothing.
    code = f"BLOCKED = {BLOCKED!r}\nBUNDLE = ''\n" + SCRIPT.split("from pipeline.runtime")[0] + "import torch\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "blocked: torch" in done.stderr
