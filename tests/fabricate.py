"""Bundles made without training, written by the exporter's own writer.

`tiny_bundle`: a random mean-pool graph (embedding lookup, masked mean, linear head) whose logits
`reference_logits` recomputes in numpy, for tests of the runtime and the serving paths.

`bag_bundle`: a bag-of-tokens linear router fitted with numpy. logits = mean over the prompt's tokens of
W[token] + b, with W fitted by ridge regression of each model's outcome on the mean one-hot token vector
(scaled to logits). It reads the prompt through the runtime's own `encode`, so it routes real prompts with
real signal in milliseconds, and its quality can be planted: `negate=True` reverses every decision,
`shuffle=True` fits it on shuffled labels.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.export import quantize, write_bundle
from pipeline.tokenization import make_spec
from tests.tiny import PACKAGED

TOKENIZER = PACKAGED / "tokenizer.json"
VOCAB = 30522


def mean_pool_graph(path: Path, n_models: int = 2, dim: int = 8, seed: int = 0) -> dict:
    """A real ONNX router without torch: embedding lookup, masked mean, linear head. Returns its weights."""
    rng = np.random.default_rng(seed)
    w = {"emb": rng.normal(size=(VOCAB, dim)).astype(np.float32),
         "W": rng.normal(size=(dim, n_models)).astype(np.float32),
         "b": rng.normal(size=(n_models,)).astype(np.float32)}
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("ReduceSum", ["em", "one"], ["s"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "one"], ["cnt"], keepdims=0),
        helper.make_node("Max", ["cnt", "floor"], ["cnt1"]),
        helper.make_node("Div", ["s", "cnt1"], ["mean"]),
        helper.make_node("MatMul", ["mean", "W"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logits"]),
    ]
    consts = [numpy_helper.from_array(v, k) for k, v in w.items()] + [
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([1.0], np.float32), "floor")]
    graph = helper.make_graph(
        nodes, "mean_pool", [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
                             for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_models])], consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


def reference_logits(w: dict, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    mean = (w["emb"][input_ids] * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return mean @ w["W"] + w["b"]


def make_meta(n_models: int = 2, decision: dict | None = None, max_tokens: int = 32,
              templates: dict | None = None) -> dict:
    names = ["weak", "strong"] if n_models == 2 else [f"m{i}" for i in range(n_models)]
    costs = [0.1, 1.0] if n_models == 2 else [float(i + 1) for i in range(n_models)]
    return {
        "name": "tiny",
        "models": [{"name": n, "cost": c, "index": i} for i, (n, c) in enumerate(zip(names, costs))],
        "tokenizer": {**make_spec(max_tokens), "source": str(TOKENIZER), **({"templates": templates} if templates else {})},
        "decision": decision or {"kind": "pair", "weak": "weak", "strong": "strong",
                                 "thresholds": {"0.1": 0.7, "0.5": 0.5, "0.9": 0.3},
                                 "default_strong_fraction": 0.5},
        "metrics": {"val_apgr": 0.5}, "data_hash": "abc", "config": {"student": {"family": "static"}},
    }


def tiny_bundle(out: Path, n_models: int = 2, decision: dict | None = None, max_tokens: int = 32,
                templates: dict | None = None) -> tuple[Path, dict]:
    """A complete bundle written by the exporter's own writer; returns (bundle dir, graph weights)."""
    stage = out.parent / f"{out.name}-stage"
    stage.mkdir(parents=True, exist_ok=True)
    w = mean_pool_graph(stage / "model.onnx", n_models)
    quantize(stage / "model.onnx", stage / "model.int8.onnx")
    return write_bundle(out, stage / "model.onnx", stage / "model.int8.onnx",
                        make_meta(n_models, decision, max_tokens, templates)), w


PROMPTS = ["What is the capital of France?", "", "def f(x):\n    return x ** 2\n" * 20,
           "Prove that there are infinitely many primes. " * 40, "日本語のテキスト 😀", "a\x00b\x07c"]


def _graph(w: np.ndarray, b: np.ndarray, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = w.shape[1]
    nodes = [
        helper.make_node("Gather", ["W", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "ax2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "ax1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "ax1"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["mean"]),
        helper.make_node("Add", ["mean", "B"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2")]
    graph = helper.make_graph(
        nodes, "bag", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", m])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def features(prompts: list[str], spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean one-hot over the token ids of each prompt [n, V_seen], the seen token ids)."""
    from pipeline.tokenization import encode, load_tokenizer

    ids, mask = encode(load_tokenizer(TOKENIZER), prompts, spec)
    vocab, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.reshape(ids.shape)
    x = np.zeros((len(prompts), vocab.size))
    rows = np.repeat(np.arange(len(prompts)), ids.shape[1])
    np.add.at(x, (rows, inverse.ravel()), mask.ravel().astype(float))
    return x / mask.sum(1, keepdims=True), vocab


def bag_bundle(out: Path, prompts: list[str], target: np.ndarray, observed: np.ndarray, models: list[str],
               costs: list[float | None], *, negate: bool = False, shuffle: bool = False, ridge: float = 0.3,
               pair: tuple[str, str] | None = None, max_tokens: int = 64, seed: int = 0,
               data_hash: str | None = None, name: str = "bag", reference: bool = True) -> Path:
    """Fit the bag-of-tokens router on (prompts, target, observed) and write a sealed bundle to `out`
    (with `reference`, the quantiles of its scores on those prompts in `decision.reference`)."""
    from pipeline.calibrate import score_reference
    from pipeline.conformance import seal_bundle
    from pipeline.export import router_config
    from pipeline.metrics import calibrate_lambdas, calibrate_thresholds
    from pipeline.tokenization import make_spec
    from tokenizers import Tokenizer

    spec = make_spec(max_tokens)
    target = np.asarray(target, float)
    observed = np.asarray(observed, bool)
    if shuffle:
        perm = np.random.default_rng(seed).permutation(len(prompts))
        target, observed = target[perm], observed[perm]
    x, seen = features(prompts, spec)
    v = Tokenizer.from_file(str(TOKENIZER)).get_vocab_size()
    m = len(models)
    w = np.zeros((v, m))
    b = np.zeros(m)
    for j in range(m):
        rows = observed[:, j]
        xj, yj = x[rows], target[rows, j]
        mean = yj.mean()
        coef = np.linalg.solve(xj.T @ xj + ridge * np.eye(xj.shape[1]), xj.T @ (yj - mean))
        w[seen, j] = 4.0 * coef
        b[j] = 4.0 * (mean - 0.5)
    if negate:
        w, b = -w, -b
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _graph(w, b, out / "model.onnx")
    shutil.copyfile(out / "model.onnx", out / "model.int8.onnx")
    shutil.copyfile(TOKENIZER, out / "tokenizer.json")

    logits = x @ w[seen] + b
    p = 1.0 / (1.0 + np.exp(-logits))
    decision: dict = {"kind": "pair" if m == 2 else "multi"}
    if pair is None and m >= 2:
        rates = [target[observed[:, j], j].mean() for j in range(m)]
        pair = (models[int(np.argmin(rates))], models[int(np.argmax(rates))])
    if pair is not None:
        weak, strong = models.index(pair[0]), models.index(pair[1])
        decision.update(weak=pair[0], strong=pair[1], score="(1 + p_strong - p_weak) / 2",
                        thresholds=calibrate_thresholds((1 + p[:, strong] - p[:, weak]) / 2),
                        default_strong_fraction=0.5)
    if m > 2:
        c = np.array([c if c is not None else i + 1.0 for i, c in enumerate(costs)])
        decision["cost_lambdas"] = calibrate_lambdas(p, c)
    if reference:
        at = (models.index(pair[0]), models.index(pair[1])) if pair is not None else None
        decision["reference"] = score_reference(p, models, at, source="fit prompts")
    meta = {"name": name, "models": [{"name": n, "cost": c, "index": i} for i, (n, c) in enumerate(zip(models, costs))],
            "tokenizer": spec | {"source": str(TOKENIZER)}, "decision": decision, "data_hash": data_hash}
    seal_bundle(out, router_config(meta, opset=17))
    return out


def labeled_arrays(name: str):
    """(prompts, target, mask, split, models, costs, content hash) of a labeled dataset."""
    from pipeline.common import arrow_table, processed_dir, read_json
    from pipeline.ingest import list_matrix
    from pipeline.label import load_labels

    ds, stats = load_labels(name)
    table = arrow_table(ds)
    manifest = read_json(processed_dir(name) / "manifest.json")
    models = list(stats["models"])
    return (table.column("prompt").to_pylist(), list_matrix(table, "target", float), list_matrix(table, "mask", bool),
            np.asarray(table.column("split").to_pylist()), models, [manifest["costs"].get(m) for m in models],
            stats.get("content_hash"))
