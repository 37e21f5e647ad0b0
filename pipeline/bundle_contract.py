"""The bundle contract: what a router.json the runtime can use looks like, and the digests that seal a
bundle (docs/contracts.md §2). The exporter writes by these rules and `Router.load` checks by them.

Every check raises ValueError naming what is wrong; the runtime turns it into a RouterError naming the
file. Imports only the standard library (the runtime stays free of schema libraries).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from .tokenization import TEMPLATES_VERSION

SCHEMA_VERSION = 2  # 2: router.json carries bundle_sha256 and is validated on load
MAX_ROUTER_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 32  # router.json nests about 6 deep (training_config, metrics.parity)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path) -> str:
    """A file's sha256 (hex), read in 1 MiB blocks: what router.json's `files` lists."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def canonical_router_json(config: dict) -> bytes:
    """router.json without `bundle_sha256`, as sorted-key compact ASCII JSON: the form the digest covers."""
    body = {k: v for k, v in config.items() if k != "bundle_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def bundle_digest(config: dict) -> str:
    """`bundle_sha256`: sha256 over each listed file's sha256 (sorted by name) and the canonical router.json."""
    h = hashlib.sha256(b"prerouter bundle\n")
    for name, digest in sorted(config.get("files", {}).items()):
        h.update(json.dumps([name, digest]).encode("ascii") + b"\n")
    h.update(canonical_router_json(config))
    return h.hexdigest()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_finite_number(x) -> bool:
    """An int or float that is finite; a bool is not a number here (JSON true is not 1)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fraction_key(k) -> float | None:
    try:
        f = float(k)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _too_deep(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


def _bundle_path(root: Path, rel, where: str) -> Path:
    """`root / rel` for a relative path that stays inside the bundle folder (symbolic links included)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ValueError(f"{where} must be a file name inside the bundle, got {rel!r}")
    parts = re.split(r"[/\\]", rel)
    if rel.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", rel) or ".." in parts:
        raise ValueError(f"{where} {rel!r} leaves the bundle folder")
    full = root / rel
    try:
        inside = full.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symbolic link loop
        inside = False
    if not inside:
        raise ValueError(f"{where} {rel!r} leaves the bundle folder")
    return full


def check_schema_version(config) -> None:
    """Raise ValueError unless router.json's `schema_version` is the one this runtime reads."""
    version = config.get("schema_version") if isinstance(config, dict) else None
    if version != SCHEMA_VERSION:
        if _is_int(version) and 1 <= version < SCHEMA_VERSION:
            raise ValueError(f"schema_version {version}: made by an older prerouter, without the checks this "
                             f"runtime needs; re-export it (prerouter export NAME)")
        raise ValueError(f"schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})")


def check_router_json(config, root: Path, verify: bool = True) -> None:
    """Raise ValueError naming the first thing in router.json that the runtime cannot use as it is.

    A small hand-written schema (the runtime stays free of schema libraries): required keys and
    their types, models (unique names, indices 0..n-1, costs), tokenizer spec, decision (known kind,
    pair models among the models, numeric thresholds in [0, 1] that never rise with the strong
    fraction, λ ≥ 0), every path inside the bundle folder, and with `verify` the `files` hashes and
    `bundle_sha256` present. It checks structure only; load compares the hashes.
    """
    if not isinstance(config, dict):
        raise ValueError(f"must be a JSON object, got {type(config).__name__}")
    if _too_deep(config, MAX_JSON_DEPTH):
        raise ValueError(f"nests deeper than {MAX_JSON_DEPTH} levels")
    required = ["models", "tokenizer", "onnx", "decision"] + (["files", "bundle_sha256"] if verify else [])
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"required key{'s' * (len(missing) > 1)} missing: {', '.join(missing)}")
    optional = {"name": (str, type(None)), "pipeline_version": str, "created_at": str, "outputs": dict,
                "metrics": dict, "latency": dict, "data_hash": (str, type(None)), "training_config": dict,
                "export_fingerprint": (str, type(None)), "conformance": dict}
    for key, kind in optional.items():
        if key in config and not isinstance(config[key], kind):
            raise ValueError(f"{key} has the wrong type ({type(config[key]).__name__})")

    models = config["models"]
    if not isinstance(models, list) or len(models) < 2:
        raise ValueError("models must be a list of at least 2 models")
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise ValueError(f"models[{i}] must be an object with a non-empty string name")
        if not _is_int(m.get("index")):
            raise ValueError(f"models[{i}].index must be an integer")
        cost = m.get("cost")
        if cost is not None and not (is_finite_number(cost) and cost >= 0):
            raise ValueError(f"models[{i}].cost must be a number >= 0 or null, got {cost!r}")
    names = [m["name"] for m in models]
    if len(set(names)) != len(names):
        raise ValueError("models has duplicate names")
    if sorted(m["index"] for m in models) != list(range(len(models))):
        raise ValueError(f"models' indices must be 0..{len(models) - 1}, each once")

    tok = config["tokenizer"]
    if not isinstance(tok, dict):
        raise ValueError("tokenizer must be an object")
    _bundle_path(root, tok.get("file", "tokenizer.json"), "tokenizer.file")
    for key in ("max_tokens", "head_tokens", "tail_tokens", "char_window"):
        if not _is_int(tok.get(key)) or tok[key] < (3 if key == "max_tokens" else 1 if key == "char_window" else 0):
            raise ValueError(f"tokenizer.{key} must be a positive integer, got {tok.get(key)!r}")
    if tok.get("truncation") not in ("head_tail", "head"):
        raise ValueError(f"tokenizer.truncation {tok.get('truncation')!r} is not head_tail or head")
    if tok["head_tokens"] + tok["tail_tokens"] > tok["max_tokens"] - 2:
        raise ValueError("tokenizer.head_tokens + tail_tokens exceed max_tokens - 2")
    templates = tok.get("templates")
    if templates:
        if not isinstance(templates, dict):
            raise ValueError("tokenizer.templates must be an object")
        if not (_is_int(templates.get("version", 1)) and 1 <= templates.get("version", 1) <= TEMPLATES_VERSION):
            raise ValueError(f"tokenizer.templates.version {templates['version']!r} is not known to this runtime "
                             f"(1 to {TEMPLATES_VERSION}); upgrade prerouter to load this bundle")
        for side in ("prefixes", "suffixes"):
            items = templates.get(side)
            if not isinstance(items, list) or not all(
                    isinstance(t, dict) and isinstance(t.get("text"), str) and _is_int(t.get("keep"))
                    and 0 <= t["keep"] <= len(t["text"]) for t in items):
                raise ValueError(f"tokenizer.templates.{side} must be a list of {{text, keep}}")

    onnx = config["onnx"]
    if not isinstance(onnx, dict):
        raise ValueError("onnx must be an object")
    for key in ("fp32", "int8"):
        _bundle_path(root, onnx.get(key), f"onnx.{key}")
    if "opset" in onnx and not _is_int(onnx["opset"]):
        raise ValueError("onnx.opset must be an integer")

    d = config["decision"]
    if not isinstance(d, dict):
        raise ValueError("decision must be an object")
    if d.get("kind") not in ("pair", "multi"):
        raise ValueError(f"decision is unusable: kind {d.get('kind')!r} (pair or multi)")
    if d["kind"] == "pair" or "weak" in d or "strong" in d:
        unknown = [d.get(k) for k in ("weak", "strong") if d.get(k) not in names]
        if unknown:
            raise ValueError(f"decision is unusable: unknown pair models {unknown}")
        if d["weak"] == d["strong"]:
            raise ValueError("decision: weak and strong are the same model")
    for key, lo, hi in (("default_strong_fraction", 0.0, 1.0), ("default_cost_weight", 0.0, math.inf)):
        if key in d and not (is_finite_number(d[key]) and lo <= d[key] <= hi):
            raise ValueError(f"decision.{key} must be a number in [{lo:g}, {hi:g}], got {d[key]!r}")
    for key, key_hi, value_hi in (("thresholds", 1.0, 1.0), ("cost_lambdas", math.inf, math.inf)):
        table = d.get(key, {})
        if not isinstance(table, dict):
            raise ValueError(f"decision.{key} must be an object")
        points = []
        for k, v in table.items():
            f = _fraction_key(k)
            if f is None or not 0.0 <= f <= key_hi:
                raise ValueError(f"decision.{key} key {k!r} is not a number in [0, {key_hi:g}]")
            if not (is_finite_number(v) and 0.0 <= v <= value_hi):
                raise ValueError(f"decision.{key}[{k!r}] must be a number in [0, {value_hi:g}], got {v!r}")
            points.append((f, v))
        if key == "thresholds":  # a larger share of strong calls never needs a higher threshold
            points.sort()
            if any(b[1] > a[1] for a, b in zip(points, points[1:])):
                raise ValueError("decision.thresholds must not rise as the strong fraction grows")

    if "files" in config:
        files = config["files"]
        if not isinstance(files, dict):
            raise ValueError("files must be an object of file name -> sha256")
        for name, digest in files.items():
            _bundle_path(root, name, "files key")
            if name == "router.json" or not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ValueError(f"files[{name!r}] must be the sha256 (64 hex digits) of a file other than router.json")
        if verify:
            for need in (tok.get("file", "tokenizer.json"), onnx["fp32"], onnx["int8"]):
                if need not in files:
                    raise ValueError(f"files does not list {need!r}, so its sha256 cannot be checked")
    if "bundle_sha256" in config and not (isinstance(config["bundle_sha256"], str)
                                          and _HEX64.fullmatch(config["bundle_sha256"])):
        raise ValueError("bundle_sha256 must be 64 hex digits")
