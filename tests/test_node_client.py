"""The Node.js client in examples/node/ (onnxruntime-node + tokenizers, written from docs/contracts.md)
passes a bundle's conformance vectors: every token id, every decision, scores within 1e-5.

Runs when `node` and `npm` are on PATH and examples/node/node_modules is installed or installable
(`ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm install`); skips otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest

from pipeline.export import quantize, write_bundle
from pipeline.tokenization import learn_templates, make_spec

from .fabricate import make_meta, mean_pool_graph

NODE_DIR = Path(__file__).parent.parent / "examples" / "node"
MULTI = {"kind": "multi", "cost_lambdas": {"0.25": 0.4, "0.5": 0.1, "1.0": 0.0}, "default_cost_weight": 0.05}


@pytest.fixture(scope="module")
def node_ready():
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not on PATH")
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir() or not (
            NODE_DIR / "node_modules" / "tokenizers").is_dir():
        try:
            done = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                                  text=True, timeout=600, env={**os.environ, "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip"})
        except subprocess.TimeoutExpired:
            pytest.skip("npm install did not finish in 10 minutes")
        if done.returncode != 0:
            pytest.skip(f"npm install failed (no registry?): {done.stderr.strip().splitlines()[-1:]}")


def _bundle(out: Path, n_models: int = 2, decision: dict | None = None, templates: dict | None = None) -> Path:
    stage = out.parent / f"{out.name}-stage"
    stage.mkdir(parents=True, exist_ok=True)
    mean_pool_graph(stage / "model.onnx", n_models, dim=16, seed=n_models)
    model = onnx.load(str(stage / "model.onnx"))
    model.ir_version = 10  # what torch's exporter writes; onnxruntime-node reads IR versions up to 13
    onnx.save(model, str(stage / "model.onnx"))
    quantize(stage / "model.onnx", stage / "model.int8.onnx")
    meta = make_meta(n_models, decision, max_tokens=64)
    if templates:
        meta["tokenizer"].update(make_spec(64) | {"templates": templates})
    return write_bundle(out, stage / "model.onnx", stage / "model.int8.onnx", meta)


def _run_node(bundle: Path) -> dict:
    done = subprocess.run(["node", "conformance.mjs", str(bundle)], cwd=NODE_DIR, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"returncode": done.returncode}


def test_node_client_passes_pair_vectors_with_templates(node_ready, tmp_path):
    system = ("You are a careful assistant. Read the question and answer with one word only. "
              "Do not explain your answer, and never apologise. ")
    templates = learn_templates([system + f"Question {i}: what is {i} times {i + 1}?" for i in range(30)])
    bundle = _bundle(tmp_path / "pair", templates=templates)
    out = _run_node(bundle)
    assert out["passed"] and out["returncode"] == 0, out
    for graph in ("int8", "fp32"):
        r = out["graphs"][graph]
        assert r["ids"] == r["text"] == out["prompts"] >= 200
        assert r["decisions"] == r["decisionsTotal"] == out["prompts"] * out["settings"]
        assert r["maxScoreDiff"] <= 1e-5


def test_node_client_passes_multi_vectors(node_ready, tmp_path):
    out = _run_node(_bundle(tmp_path / "multi", n_models=3, decision=MULTI))
    assert out["passed"] and out["returncode"] == 0, out


def test_node_client_fails_on_wrong_vectors(node_ready, tmp_path):
    # The check has teeth: one changed id in the file makes the client report a failure (exit 1).
    bundle = _bundle(tmp_path / "bad")
    path = bundle / "conformance.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[5])
    rec["input_ids"][1] += 1
    lines[5] = json.dumps(rec, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = json.loads((bundle / "router.json").read_text())
    config["files"].pop("conformance.jsonl")  # the client checks listed files' sha256: unlist the edited one
    (bundle / "router.json").write_text(json.dumps(config))
    out = _run_node(bundle)
    assert not out["passed"] and out["returncode"] == 1
    assert out["graphs"]["int8"]["ids"] == out["prompts"] - 1
