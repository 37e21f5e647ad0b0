"""ONNX export: real students trace with dynamic axes, the parity gate measures and refuses, bundles register."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.common import GateError
from pipeline.config import ExportConfig, StudentConfig, load_config
from pipeline.encoders import build_student
from pipeline.export import (QUANT_RECIPES, export_module, int8_failures, int8_parity, log_bundle, onnx_logits,
                             quantize, to_onnx)
from pipeline.runtime import Router
from pipeline.tokenization import encode, load_tokenizer

from .fabricate import TOKENIZER, VOCAB, make_meta, tiny_bundle

torch.set_num_threads(1)
FAST = ExportConfig(latency_decisions=40)
WORDS = sorted(w for w in load_tokenizer(TOKENIZER).get_vocab() if w.isalpha() and w.isascii())


def prompts(n: int, seed: int = 0, longest: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, longest)))) for _ in range(n)]


def student(family: str, members: int = 1) -> nn.Module:
    torch.manual_seed(0)
    cfg = StudentConfig(family=family, dim=16, layers=1, heads=2, max_tokens=32, hidden=16, members=members)
    return build_student(cfg, VOCAB, 2, pretrained_init=False).eval()


class MeanPool(nn.Module):
    """The simplest student: embedding, masked mean, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.out = nn.Embedding(VOCAB, 8), nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return self.out((self.embed(input_ids) * m).sum(1) / m.sum(1).clamp(min=1))


class Untraceable(MeanPool):
    """`.item()` freezes the traced example's token count into the graph: ONNX and PyTorch then disagree."""

    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids, attention_mask) * attention_mask.sum().item()


def torch_probs(net: nn.Module, texts: list[str], spec: dict) -> np.ndarray:
    ids, mask = encode(load_tokenizer(TOKENIZER), texts, spec)
    with torch.no_grad():
        return torch.sigmoid(net(torch.from_numpy(ids), torch.from_numpy(mask))).double().numpy()


def calibrated_meta(net: nn.Module, held: list[str]) -> dict:
    """Meta whose thresholds are the quantiles of the student's own held-out routing scores."""
    meta = make_meta()
    p = torch_probs(net, held, meta["tokenizer"])
    s = (1 + p[:, 1] - p[:, 0]) / 2
    meta["decision"]["thresholds"] = {f"{f:.1f}": float(np.quantile(s, 1 - f)) for f in np.arange(0.1, 1.0, 0.1)}
    return meta


@pytest.mark.parametrize("family,members", [("static", 1), ("transformer", 1), ("static", 3)])
def test_export_module_writes_a_faithful_bundle(tmp_path, family, members):
    net, held = student(family, members), prompts(120)
    bundle = export_module(net, calibrated_meta(net, held), tmp_path / "bundle", held, config=FAST)
    config = json.loads((bundle / "router.json").read_text())
    parity = config["metrics"]["parity"]
    assert parity["n_prompts"] == 120 and parity["fp32_max_abs_diff"] <= 1e-4
    assert parity["int8_min_agreement"] >= 0.99 and len(parity["int8_agreement"]) == 9
    assert config["latency"]["decisions"] == 40 and config["latency"]["overall"]["p99"] > 0
    # Both clocks, and the one a latency gate reads by default: the router's own CPU time.
    assert config["latency"]["clock"] == "cpu" and config["latency"]["overall"]["cpu_p99"] > 0
    assert config["onnx"]["opset"] == 17 and config["metrics"]["val_apgr"] == 0.5
    # New prompts, other batch sizes and lengths (some past max_tokens): the axes really are dynamic.
    fresh = prompts(50, seed=1, longest=120)
    expected = torch_probs(net, fresh, config["tokenizer"])
    fp32 = Router.load(bundle, quantized=False)
    assert np.abs(fp32.scores(fresh, batch_size=7) - expected).max() < 1e-4
    assert np.abs(np.array([fp32.scores([q])[0] for q in fresh[:10]]) - expected[:10]).max() < 1e-4
    int8 = Router.load(bundle)
    assert np.abs(int8.scores(fresh) - expected).max() < 0.02
    assert parity["int8_recipe"] in dict(QUANT_RECIPES)


def test_quantize_shrinks_embeddings_only_when_asked(tmp_path):
    to_onnx(student("static"), tmp_path / "fp32.onnx")
    size = (tmp_path / "fp32.onnx").stat().st_size
    assert quantize(tmp_path / "fp32.onnx", tmp_path / "a.onnx", embeddings=True).stat().st_size < size / 3
    assert quantize(tmp_path / "fp32.onnx", tmp_path / "b.onnx", embeddings=False).stat().st_size > size * 0.9


def test_fp32_parity_failure_leaves_the_old_bundle(tmp_path):
    out, _ = tiny_bundle(tmp_path / "bundle")
    before = (out / "router.json").read_text()
    held = prompts(40)
    with pytest.raises(GateError, match=r"fp32 ONNX vs PyTorch max \|Δlogit\|") as e:
        export_module(Untraceable(), make_meta(), out, held, config=FAST)
    assert e.value.exit_code == 1
    assert (out / "router.json").read_text() == before
    assert not list(tmp_path.glob(".bundle.tmp-*"))
    fresh = tmp_path / "never"
    with pytest.raises(GateError):
        export_module(Untraceable(), make_meta(), fresh, held, config=FAST)
    assert not fresh.exists()


def routing_scores(tmp_path, net: nn.Module, held: list[str], meta: dict) -> dict[str, np.ndarray]:
    """Pair routing scores of the fp32 graph and of each int8 recipe."""
    batches = [encode(load_tokenizer(TOKENIZER), held, meta["tokenizer"])]
    to_onnx(net, tmp_path / "fp32.onnx")
    paths = {"fp32": tmp_path / "fp32.onnx"}
    for recipe, embeddings in QUANT_RECIPES:
        paths[recipe] = quantize(tmp_path / "fp32.onnx", tmp_path / f"{recipe}.onnx", embeddings)
    out = {}
    for name, path in paths.items():
        p = 1 / (1 + np.exp(-onnx_logits(path, batches).astype(np.float64)))
        out[name] = (1 + p[:, 1] - p[:, 0]) / 2
    return out


def flip_threshold(s: dict[str, np.ndarray], recipe: str, keep: str | None = None) -> float:
    """A threshold at which `recipe` routes some prompt unlike fp32 (and, if given, `keep` routes all alike)."""
    for i in np.argsort(-np.abs(s[recipe] - s["fp32"])):
        t = float((s[recipe][i] + s["fp32"][i]) / 2)
        if keep is None or ((s[keep] >= t) == (s["fp32"] >= t)).all():
            return t
    raise AssertionError(f"no threshold separates {recipe} from {keep}")


def test_small_matmuls_stay_fp32(tmp_path):
    import onnx

    from pipeline.export import per_token_nodes, to_onnx

    net = student("static")  # its only per-token MatMul is the dim -> 1 attention scorer
    model = onnx.load(str(to_onnx(net, tmp_path / "m.onnx")))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert [ops.get(n) for n in per_token_nodes(model, embeddings=True)] == ["Gather"]
    assert not per_token_nodes(model, embeddings=False)


def test_int8_agreement_gate_tries_each_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.export.MIN_QUANT_WEIGHTS", 0)  # quantize the tiny scorer too: two real recipes
    net, held = student("static"), prompts(60)
    meta = make_meta()
    s = routing_scores(tmp_path, net, held, meta)
    compact, plain = (r for r, _ in QUANT_RECIPES)
    strict = ExportConfig(min_int8_agreement=1.0, latency_decisions=40)
    # Every recipe flips a decision somewhere: the gate fails and names both.
    meta["decision"]["thresholds"] = {"0.3": flip_threshold(s, compact), "0.7": flip_threshold(s, plain)}
    with pytest.raises(GateError, match="every int8 recipe") as e:
        export_module(net, meta, tmp_path / "bundle", held, config=strict)
    assert f"{compact}: int8 vs fp32 routing agreement" in str(e.value) and f"{plain}: " in str(e.value)
    assert not (tmp_path / "bundle").exists()
    # Only the compact recipe flips one: the fallback keeps embeddings in fp32 and passes.
    meta["decision"]["thresholds"] = {"0.5": flip_threshold(s, compact, keep=plain)}
    bundle = export_module(net, meta, tmp_path / "bundle", held, config=strict)
    parity = json.loads((bundle / "router.json").read_text())["metrics"]["parity"]
    assert parity["int8_recipe"] == plain and parity["int8_min_agreement"] == 1.0
    # A looser requirement accepts the compact recipe.
    loose = ExportConfig(min_int8_agreement=0.9, latency_decisions=40)
    parity = json.loads((export_module(net, meta, tmp_path / "b2", held, config=loose) / "router.json")
                        .read_text())["metrics"]["parity"]
    assert parity["int8_recipe"] == compact and parity["int8_min_agreement"] < 1.0


def test_int8_failures_names_each_broken_bound():
    report = {"int8_agreement": {"threshold@0.1": 1.0, "threshold@0.5": 0.97}, "apgr_fp32": 0.61, "apgr_int8": 0.58}
    failures = int8_failures(report, ExportConfig())
    assert len(failures) == 2 and "0.9700 at threshold@0.5" in failures[0] and "0.5800" in failures[1]
    assert int8_failures({**report, "int8_agreement": {"t": 0.995}, "apgr_int8": 0.605}, ExportConfig()) == []


def test_with_no_gap_between_the_pair_the_apgr_part_of_the_gate_stands_aside():
    # Both models right on every held-out prompt: APGR is undefined (nan for fp32 and int8 alike), which
    # failed the gate ("nan vs nan differs by more than 0.01") for a bundle whose int8 graph was fine.
    rng = np.random.default_rng(0)
    l32 = rng.normal(size=(50, 2))
    meta = {"models": [{"name": "w", "index": 0, "cost": 1.0}, {"name": "s", "index": 1, "cost": 2.0}],
            "decision": {"kind": "pair", "weak": "w", "strong": "s", "thresholds": {"0.5": 0.5}}}
    same = int8_parity(l32, l32 + 1e-4, meta, np.ones((50, 2)))
    assert "apgr_fp32" not in same and "undefined" in same["apgr_skipped"] and int8_failures(same, ExportConfig()) == []
    gap = int8_parity(l32, l32 + 1e-4, meta, np.stack([np.zeros(50), np.ones(50)], 1))
    assert np.isfinite(gap["apgr_fp32"]) and "apgr_skipped" not in gap


def test_export_by_name_gates_logs_and_registers(tmp_path, monkeypatch):
    import datasets
    import mlflow
    from mlflow import MlflowClient

    import pipeline.label
    from pipeline.export import export
    from pipeline.metrics import apgr

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # over any store an earlier test set in-process
    mlflow.set_experiment("prerouter")  # and its experiment, which an earlier test's id would not name here
    monkeypatch.setenv("PREROUTER_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)  # the default artifact root lands here
    rng = np.random.default_rng(0)
    n = 200
    texts = prompts(n)
    split = rng.choice(["train", "val", "test"], size=n, p=[0.5, 0.2, 0.3])
    target = rng.integers(0, 2, size=(n, 2)).astype(np.float32)
    mask = rng.random((n, 2)) > 0.1
    labels = datasets.Dataset.from_dict({"prompt": texts, "target": target.tolist(), "mask": mask.tolist(),
                                         "split": split.tolist()})
    net = student("static")
    with mlflow.start_run() as training_run:
        pass
    meta = {**calibrated_meta(net, texts), "mlflow_run_id": training_run.info.run_id}
    # The training stage's loader, without importing the training stack (Lightning) for it.
    trained = types.SimpleNamespace(student=net, meta=meta, checkpoint_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "pipeline.train", types.SimpleNamespace(load_trained=lambda name: trained))
    monkeypatch.setattr(pipeline.label, "load_labels", lambda name: (labels, {}))

    bundle = export("tiny", config=load_config(overrides=["export.latency_decisions=20"]))
    assert bundle == tmp_path / "models" / "tiny" / "bundle"
    parity = json.loads((bundle / "router.json").read_text())["metrics"]["parity"]
    assert parity["n_prompts"] == int((split != "train").sum())
    # APGR on the test rows where both models were observed, recomputed here from the fp32 graph.
    rows = (split == "test") & mask.all(1)
    assert parity["apgr_n"] == int(rows.sum())
    p = Router.load(bundle, quantized=False).scores([t for t, r in zip(texts, rows) if r])
    expected = apgr((1 + p[:, 1] - p[:, 0]) / 2, target[rows, 0], target[rows, 1])
    assert parity["apgr_fp32"] == pytest.approx(expected, abs=1e-6)
    assert abs(parity["apgr_int8"] - parity["apgr_fp32"]) <= 0.01

    client = MlflowClient()
    version = client.get_model_version("prerouter-tiny", "1")
    assert version.run_id == training_run.info.run_id
    logged = client.get_run(training_run.info.run_id).data.metrics
    assert logged["parity_fp32_max_abs_diff"] == parity["fp32_max_abs_diff"] and "latency_p99_ms" in logged
    files = {a.path for a in client.list_artifacts(training_run.info.run_id, "bundle")}
    assert {"bundle/router.json", "bundle/model.int8.onnx", "bundle/MODEL_CARD.md"} <= files
    assert log_bundle(bundle, {**meta, "mlflow_run_id": "gone"}, "tiny") == "2"  # unknown run: a new one
    local = mlflow.artifacts.download_artifacts("models:/prerouter-tiny/2")
    assert Router.load(local).route("hello") in ("weak", "strong")
