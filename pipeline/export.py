"""Export a trained student to the bundle (docs/contracts.md §2): ONNX fp32 + int8, a parity gate, router.json.

The gate compares, on held-out prompts, PyTorch with fp32 ONNX (max |Δlogit|) and fp32 with int8
(routing agreement at every calibrated threshold, test APGR). A failing gate leaves no new bundle.
The conformance vectors and the seal (router.json's hashes) come from pipeline/conformance.py.
torch is imported inside the functions that need it, so writing and reading bundles stays torch-free.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import __version__
from .common import ConfigError, DataError, GateError, atomic_dir, console, model_dir, read_json, sha256_json
from .config import Config, ExportConfig
from .conformance import ROUTER, seal_bundle, with_conformance
from .routing import choose, pair_score, sigmoid
from .bundle_contract import SCHEMA_VERSION
from .runtime import relative_costs
from .tokenization import encode, load_tokenizer

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"
FP32, INT8, TOKENIZER = "model.onnx", "model.int8.onnx", "tokenizer.json"


def export(name: str, out: str | Path | None = None, config: Config | None = None) -> Path:
    """Export `models/NAME`'s trained student, gate it on the val+test prompts, write and register the bundle."""
    from .label import load_labels
    from .train import load_trained

    config = config or Config()
    bundle_dir = check_bundle_dir(Path(out) if out else model_dir(name) / "bundle")
    trained = load_trained(name)
    fingerprint = sha256_json({"checkpoint": trained.meta.get("fingerprint"), "export": config.export.model_dump()})
    if _up_to_date(bundle_dir, fingerprint):
        console.print(f"[dim]export: {bundle_dir} is up to date (same checkpoint and export options), skipping[/]")
        return bundle_dir
    trained.meta["export_fingerprint"] = fingerprint
    labels, _ = load_labels(name)
    split = np.array(labels["split"])
    held = np.flatnonzero(split != "train")
    if held.size == 0:
        raise DataError(f"dataset {name!r} has no val/test prompts to check the exported model on")
    held_ds = labels.select(held)
    target = np.array(held_ds["target"], dtype=np.float64)
    observed = np.array(held_ds["mask"], dtype=bool) & (split[held] == "test")[:, None]
    outcomes = np.where(observed, target, np.nan)  # APGR is measured on the test split only
    bundle = export_module(trained.student, trained.meta, bundle_dir,
                           list(held_ds["prompt"]), outcomes, config.export)
    log_bundle(bundle, trained.meta, name)
    console.print(f"[green]bundle[/] {bundle}")
    return bundle


def _up_to_date(bundle: Path, fingerprint: str) -> bool:
    """A complete bundle (every sha256 checks out) made from the same checkpoint and export options."""
    from .runtime import Router

    try:
        router = json.loads((bundle / ROUTER).read_text())
        if router.get("export_fingerprint") != fingerprint:
            return False
        Router.load(bundle)
        return True
    except Exception:
        return False


def check_bundle_dir(out: Path) -> Path:
    """`out`, if writing a bundle there replaces nothing but an earlier bundle (the write swaps the whole folder)."""
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / ROUTER).is_file()):
        raise ConfigError(f"{out} exists and is not a prerouter bundle (no {ROUTER}); writing the bundle would "
                          "replace everything in it: choose a new or empty directory for --out")
    return out


def export_module(student, meta: dict, out: str | Path, holdout_prompts: list[str],
                  holdout_outcomes: np.ndarray | None = None, config: ExportConfig | None = None) -> Path:
    """ONNX-export `student`, quantize it, run the parity gate on `holdout_prompts`, write the bundle.

    `holdout_outcomes` ([n, n_models], NaN where unobserved) enables the APGR part of the gate.
    """
    config = config or ExportConfig()
    tok = load_tokenizer(meta["tokenizer"]["source"])
    batches = [encode(tok, holdout_prompts[i:i + 64], meta["tokenizer"]) for i in range(0, len(holdout_prompts), 64)]
    if not batches:
        raise DataError("no held-out prompts to check the exported model on")
    with tempfile.TemporaryDirectory(prefix="prerouter-export-") as stage:
        fp32, int8 = Path(stage) / FP32, Path(stage) / INT8
        to_onnx(student, fp32, opset=config.opset)
        ref, l32 = torch_logits(student, batches), onnx_logits(fp32, batches)
        fp32_diff = float(np.max(np.abs(l32 - ref)))
        if not fp32_diff <= config.parity_atol:
            raise GateError(f"parity gate failed on {len(ref)} held-out prompts: fp32 ONNX vs PyTorch "
                            f"max |Δlogit| = {fp32_diff:.3g} > parity_atol {config.parity_atol:g} (Python-side "
                            "values in forward(), e.g. .item() or shape-dependent branches, are frozen by tracing)")
        tried = []
        for recipe, embeddings in QUANT_RECIPES:  # the most compact recipe that keeps routing parity
            quantize(fp32, int8, embeddings)
            parity = {"n_prompts": len(ref), "fp32_max_abs_diff": fp32_diff, "int8_recipe": recipe,
                      **int8_parity(l32, onnx_logits(int8, batches), meta, holdout_outcomes)}
            failures = int8_failures(parity, config)
            if not failures:
                break
            tried.append(f"{recipe}: " + "; ".join(failures))
        else:
            raise GateError(f"parity gate failed on {len(ref)} held-out prompts, for every int8 recipe:\n  "
                            + "\n  ".join(tried))
        return write_bundle(out, fp32, int8, meta, opset=config.opset, parity=parity,
                            latency_decisions=config.latency_decisions)


# ---------------------------------------------------------------------------------------------
# ONNX graphs
# ---------------------------------------------------------------------------------------------


def to_onnx(student, path: Path, opset: int = 17) -> Path:
    """Trace `student(input_ids, attention_mask) -> logits` to ONNX with dynamic batch and sequence axes."""
    import torch

    student = student.eval()
    ids = torch.full((2, 16), 1000, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row, so that masking code paths are traced
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, OUTPUT: {0: "batch"}}
    # The TorchScript exporter: the torch.export-based one needs onnxscript, which is not a dependency,
    # and the TorchScript one traces BERT-style attention with dynamic axes reliably.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(student, (ids, mask), str(path), dynamo=False, input_names=list(INPUTS),
                          output_names=[OUTPUT], dynamic_axes=axes, opset_version=opset)
    return path


# (name, whether embedding tables become int8). They dominate a static student's size; when their
# int8 error flips routing decisions they stay fp32 and only the per-token matrix products shrink.
QUANT_RECIPES = (("matmul+embeddings", True), ("matmul", False))


def quantize(fp32: Path, int8: Path, embeddings: bool = True) -> Path:
    """Dynamic int8 quantization of the per-token work: weight MatMuls over [batch, seq, dim]
    activations and (if `embeddings`) embedding lookups. The per-prompt head after pooling stays fp32:
    it costs nothing, and routing scores are most sensitive to it.

    Unsigned 8-bit weights: on random and trained students alike they kept logits ~10x closer to
    fp32 than signed ones at the same speed.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"  # node selection is by name
    nodes = per_token_nodes(model, embeddings)
    if not nodes:  # an empty selection means "everything" to quantize_dynamic
        shutil.copyfile(fp32, int8)
        return int8
    # It logs a generic "consider pre-processing" hint on the root logger; symbolic shape
    # pre-processing fails on BERT graphs and did not change parity or speed here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(model, str(int8), weight_type=QuantType.QUInt8, nodes_to_quantize=nodes)
    finally:
        root.setLevel(level)
    return int8


MIN_QUANT_WEIGHTS = 4096  # MatMul weights smaller than this stay fp32


def per_token_nodes(model, embeddings: bool) -> list[str]:
    """Names of MatMuls with a weight operand over rank >= 3 inputs, and of embedding Gathers."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]}
    weights = {w.name: int(np.prod(w.dims)) for w in model.graph.initializer if w.data_type == onnx.TensorProto.FLOAT}
    names = []
    for node in model.graph.node:
        # A small weight (e.g. the static student's dim -> 1 attention scorer) costs more to run quantized
        # (per-call activation scales, MatMulInteger, dequantize) than in fp32: measured 0.11 vs 0.07 ms.
        if (node.op_type == "MatMul" and weights.get(node.input[1], 0) >= MIN_QUANT_WEIGHTS
                and rank.get(node.input[0], 0) >= 3):
            names.append(node.name)
        elif embeddings and node.op_type == "Gather" and node.input[0] in weights:
            names.append(node.name)
    return names


def onnx_logits(path: Path, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return np.concatenate([session.run([OUTPUT], {k: v for k, v in zip(INPUTS, b) if k in names})[0]
                           for b in batches])


def torch_logits(student, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    import torch

    student = student.eval()
    with torch.no_grad():
        return np.concatenate([student(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
                               for ids, mask in batches])


# ---------------------------------------------------------------------------------------------
# The parity gate
# ---------------------------------------------------------------------------------------------


def _choices(p: np.ndarray, decision: dict, names: list[str], rel_cost: np.ndarray) -> dict[str, np.ndarray]:
    """Routing decisions at every calibrated operating point: {key: bool or index array}."""
    out = {}
    if "weak" in decision and "strong" in decision:
        weak, strong = names.index(decision["weak"]), names.index(decision["strong"])
        score = pair_score(p, weak, strong)
        out.update({f"threshold@{k}": score >= float(t) for k, t in (decision.get("thresholds") or {}).items()})
    if decision["kind"] == "multi":
        out.update({f"lambda@{k}": choose(p, rel_cost, float(lam))
                    for k, lam in (decision.get("cost_lambdas") or {}).items()})
    return out


def int8_parity(l32: np.ndarray, l8: np.ndarray, meta: dict, outcomes: np.ndarray | None) -> dict:
    """fp32 vs int8 logits: max |Δ|, routing agreement at every calibrated point, test APGR of both."""
    ordered = sorted(meta["models"], key=lambda m: m["index"])
    names, costs = [m["name"] for m in ordered], relative_costs(ordered)
    p32, p8 = sigmoid(l32), sigmoid(l8)
    c32, c8 = _choices(p32, meta["decision"], names, costs), _choices(p8, meta["decision"], names, costs)
    agreement = {k: float(np.mean(c32[k] == c8[k])) for k in c32}
    report: dict[str, Any] = {"int8_max_abs_diff": float(np.max(np.abs(l8 - l32))), "int8_agreement": agreement,
                              "int8_min_agreement": min(agreement.values(), default=1.0)}
    if outcomes is not None and "weak" in meta["decision"]:
        report.update(_apgr_pair(p32, p8, outcomes, meta["decision"], names))
    return report


def int8_failures(report: dict, config: ExportConfig) -> list[str]:
    """What in an `int8_parity` report breaks the gate (empty when it passes)."""
    failures = []
    agreement = report["int8_agreement"]
    worst = min(agreement, key=agreement.get) if agreement else None
    if worst is not None and agreement[worst] < config.min_int8_agreement:
        failures.append(f"int8 vs fp32 routing agreement {agreement[worst]:.4f} at {worst} "
                        f"< min_int8_agreement {config.min_int8_agreement:g}")
    if "apgr_fp32" in report and not abs(report["apgr_fp32"] - report["apgr_int8"]) <= config.max_int8_apgr_drop:
        failures.append(f"test APGR int8 {report['apgr_int8']:.4f} vs fp32 {report['apgr_fp32']:.4f} "
                        f"differs by more than max_int8_apgr_drop {config.max_int8_apgr_drop:g}")
    return failures


def _apgr_pair(p32: np.ndarray, p8: np.ndarray, outcomes: np.ndarray, decision: dict, names: list[str]) -> dict:
    from .metrics import apgr

    weak, strong = names.index(decision["weak"]), names.index(decision["strong"])
    rows = ~np.isnan(outcomes[:, weak]) & ~np.isnan(outcomes[:, strong])
    if rows.sum() < 2:
        return {}
    q_weak, q_strong = outcomes[rows, weak], outcomes[rows, strong]

    def score(p):
        return pair_score(p[rows], weak, strong)

    fp32, int8 = apgr(score(p32), q_weak, q_strong), apgr(score(p8), q_weak, q_strong)
    if not (np.isfinite(fp32) and np.isfinite(int8)):  # the same mean outcome: no gap to recover
        return {"apgr_n": int(rows.sum()), "apgr_skipped": f"{decision['weak']} and {decision['strong']} have the "
                "same mean outcome on the held-out prompts, so APGR is undefined; the agreement part decides"}
    return {"apgr_n": int(rows.sum()), "apgr_fp32": float(fp32), "apgr_int8": float(int8)}


# ---------------------------------------------------------------------------------------------
# The bundle
# ---------------------------------------------------------------------------------------------


def router_config(meta: dict, *, opset: int, parity: dict | None = None) -> dict:
    """router.json without `files` (docs/contracts.md §2)."""
    spec = {k: v for k, v in meta["tokenizer"].items() if k != "source"}
    return {
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "name": meta.get("name"),
        "models": [{"name": m["name"], "cost": m.get("cost"), "index": m["index"]} for m in meta["models"]],
        "outputs": {"activation": "sigmoid", "meaning": "P(model succeeds or wins on the prompt)"},
        "tokenizer": {"file": TOKENIZER, **spec},
        "onnx": {"fp32": FP32, "int8": INT8, "opset": opset},
        "decision": meta["decision"],
        "metrics": {**meta.get("metrics", {}), **({"parity": parity} if parity else {})},
        "latency": {},
        "data_hash": meta.get("data_hash"),
        "training_config": meta.get("config", {}),
        "export_fingerprint": meta.get("export_fingerprint"),
        "selection": meta.get("selection"),  # settings the pipeline chose on validation (pipeline/select.py)
        "files": {},
    }


def write_bundle(out: str | Path, fp32: Path, int8: Path, meta: dict, *, opset: int = 17,
                 parity: dict | None = None, latency_decisions: int | None = None) -> Path:
    """Write the bundle directory atomically: both graphs, the tokenizer, the model card, router.json.

    With `latency_decisions`, single-decision latency is measured on the finished files and recorded
    (for the model card and MLflow; the latency gate itself is `prerouter check-latency`).
    """
    from .latency import check_latency
    from .model_card import write_model_card

    out = Path(out)
    router = router_config(meta, opset=opset, parity=parity)
    with atomic_dir(out) as tmp:
        shutil.copyfile(fp32, tmp / FP32)
        shutil.copyfile(int8, tmp / INT8)
        shutil.copyfile(_tokenizer_file(meta["tokenizer"]["source"]), tmp / TOKENIZER)
        router = with_conformance(tmp, router)  # sealed again below with the card
        if latency_decisions:
            router = seal_bundle(tmp, router)
            router["latency"] = check_latency(tmp, budget_ms=None, decisions=latency_decisions, show=False)
        write_model_card(tmp, router)
        seal_bundle(tmp, router)
    return out


def _tokenizer_file(source: str | Path) -> Path:
    source = Path(source)
    return source / TOKENIZER if source.is_dir() else source


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------


def log_bundle(bundle: Path, meta: dict, name: str) -> str:
    """Log the bundle and its parity/latency figures to the training run; register it as `prerouter-NAME`.

    Tracking store: `pipeline.common.setup_mlflow` (MLFLOW_TRACKING_URI, else SQLite under mlruns/,
    which the model registry needs). The run's `bundle` artifact folder holds the bundle's files and,
    beside them, an MLflow pyfunc model of it (`pipeline.mlflow_model.save`: MLmodel, the runtime's
    code and pip requirements), so the version created from its artifact URI is what `prerouter pull`
    verifies and what `mlflow.pyfunc.load_model("models:/prerouter-NAME/VERSION")` serves. Returns the
    registered version.
    """
    import time

    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from .common import setup_mlflow
    from .mlflow_model import save as save_pyfunc

    experiment = setup_mlflow()
    client = MlflowClient()  # explicit run ids: the training run may be finished or in another experiment
    router = read_json(Path(bundle) / ROUTER)
    run_id = meta.get("mlflow_run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            console.print(f"[yellow]MLflow run {run_id} is not in this tracking store; logging to a new run[/]")
            run_id = None
    new_run = run_id is None
    if new_run:
        parent = mlflow.active_run()
        run_id = client.create_run(experiment, run_name=f"export-{name}",
                                   tags={"mlflow.parentRunId": parent.info.run_id} if parent else None).info.run_id
    now = int(time.time() * 1000)
    figures = {f"parity_{k}": v for k, v in router["metrics"].get("parity", {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    figures.update({f"latency_{k}_ms": v for k, v in router.get("latency", {}).get("overall", {}).items()
                    if k.startswith("p")})
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in figures.items()])
    with tempfile.TemporaryDirectory(prefix="prerouter-log-") as stage:
        client.log_artifacts(run_id, str(save_pyfunc(bundle, Path(stage) / "bundle")), artifact_path="bundle")
    if new_run:
        client.set_terminated(run_id)
    model = f"prerouter-{name}"
    try:
        client.create_registered_model(model, description=f"prerouter bundle for {name}")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(model, source=f"{client.get_run(run_id).info.artifact_uri}/bundle",
                                          run_id=run_id, tags={"data_hash": str(router.get("data_hash"))})
    console.print(f"[green]registered[/] {model} version {version.version}")
    return str(version.version)
