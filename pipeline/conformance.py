"""The bundle's conformance vectors (docs/contracts.md §2) and its seal.

`conformance.jsonl` holds a few hundred edge-case prompts with what the Python runtime makes of them,
for both graphs: the text after templates and the character window, the token ids, the scores and
the decision at every routing setting the bundle's decision kind takes. Any other runtime (e.g. the
Node.js client in examples/node/) proves it decides like the reference one by reproducing them.
`seal_bundle` writes router.json with the sha256 of every other file and the bundle digest over it.
Export and calibrate both finish a bundle with `with_conformance` (seal, write the vectors from the
sealed bundle) and a final `seal_bundle`. The runtime is imported inside the functions that need it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import console, sha256_file, write_json

ROUTER = "router.json"  # what seal_bundle writes; every other file in the bundle is listed in it
CONFORMANCE = "conformance.jsonl"
CONFORMANCE_TOLERANCE = 1e-5


def conformance_prompts(spec: dict, n_plain: int = 200, seed: int = 0) -> list[str]:
    """A few hundred prompts that exercise every rule of the tokenizer contract: plain text of many
    lengths, prompts just under, at and over `char_window` (the inserted space, the tail's share),
    astral characters (one code point, two UTF-16 units) at the cut, combining marks, control and
    zero-width characters, special tokens written verbatim, the empty prompt, scripts, long words,
    and the bundle's templates (their prefixes and suffixes, whole and nearly, and with whitespace added
    around them)."""
    import random

    rng = random.Random(seed)
    window = spec["char_window"]
    words = ("the a of to and in is it you that for on with as are this be at or have from by not what "
             "how why explain prove write code function integer prime capital France sum list sort graph "
             "derivative essay poem summarize translate compare Python SQL matrix theorem history").split()
    pieces = ["😀", "🧪", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "e\u0301", "n\u0303", "Z\u0336\u0335a\u0334", "日本語", "中文", "한국어",
              "العربية", "Ελληνικά", "ΣΑΣ ΟΔΟΣ", "Ещё", "café naïve", "ﬁ", "Ⅻ", "\u200b", "\ufeff", "\u00a0",
              "\t", "\n", "\r\n", "\x00", "\x07", "\x1b[0m", "\x7f", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]",
              "##ing", "<s>", "don't", "U.S.A.", "3.14159", "x^2+y^2", "a" * 120, "https://example.com/a?b=c"]
    out = ["", " ", "\n\n", "?", "What is 2+2?", "[CLS]", "[CLS] [SEP]", "😀", "e\u0301" * 3,
           "\x00\x01\x02", "\ufeffhello", "HELLO World", "Ünïcödé", "ΣΑΣ", "日本語のテキスト 😀", "a\x00b\x07c"]
    for i in range(n_plain):
        n = rng.choice([1, 3, 8, 20, 60, 150, 400])
        toks = [rng.choice(pieces) if rng.random() < 0.15 else rng.choice(words) for _ in range(n)]
        out.append(" ".join(toks) + rng.choice(["", "?", ".", "!"]))
    body = " ".join(rng.choice(words) for _ in range(window))  # several times the window
    for length in (window - 1, window, window + 1, window + 7, 2 * window, 10 * window):
        out.append(body[:length])
    for k in range(12):  # astral characters and combining marks right at the head and tail cuts
        text = list(body[:2 * window])
        for j in range(k, len(text), 37):
            text[j] = rng.choice(["😀", "e\u0301", "𝔘", "日"])
        out.append("".join(text))
        out.append("😀" * (window // 2 + k))
    templates = spec.get("templates") or {}
    for side in ("prefixes", "suffixes"):
        for t in templates.get(side, []):
            middle = " ".join(rng.choice(words) for _ in range(rng.choice([3, 30, 300])))
            text = t["text"]
            near = text[:-2] + "!" + text[-1:] if side == "prefixes" else text[:1] + "!" + text[2:]
            out += [text + middle, middle + text, text, near + middle if side == "prefixes" else middle + near]
    for p in templates.get("prefixes", [])[:4]:
        for q in templates.get("suffixes", [])[:4]:
            out.append(p["text"] + "the varying middle of a templated prompt" + q["text"])
    for text in [t["text"] for side in ("prefixes", "suffixes") for t in templates.get(side, [])[:3]]:
        # what a client adds around a template: a trailing newline, Windows line breaks, edge whitespace
        out += [" \t" + text + " middle\r\n", ("middle\n" + text).replace("\n", "\r\n") + "\n\n",
                "\r" + text + "\u00a0", "\v\f" + text + "\ufeff"]
    return list(dict.fromkeys(out))


def conformance_settings(decision: dict) -> list[dict]:
    """Routing settings the vectors record a decision for: the default ({}), then every setting the
    bundle's decision kind takes (strong fractions and a threshold for pair, λ for multi)."""
    if decision["kind"] == "pair":
        fractions = sorted({0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0} | {float(k) for k in decision.get("thresholds", {})})
        return [{}] + [{"strong_fraction": f} for f in fractions] + [{"threshold": 0.5}]
    lambdas = sorted({0.0, 0.05, 0.2, 1.0} | {float(v) for v in (decision.get("cost_lambdas") or {}).values()})
    return [{}] + [{"cost_weight": lam} for lam in lambdas]


def write_conformance(folder: Path) -> dict:
    """Write FOLDER/conformance.jsonl from the bundle in FOLDER (router.json, graphs, tokenizer), as the
    Python runtime serves it. First line: `{"conformance": 1, "settings": [...], "graphs": ["int8", "fp32"],
    "tolerance": 1e-5}`; then one line per prompt: `prompt`, `text` (after compact_templates and
    clip_chars), `input_ids` ([CLS] … [SEP], batch 1), `scores` ({graph: [p_j]}), for pair bundles
    `score` ({graph: pair score}), and `decisions` ({graph: [model per setting]}). Returns router.json's
    `conformance` record (None, and no file, for a bundle the runtime cannot load)."""
    from .runtime import Router, RouterError
    from .tokenization import clip_chars, compact_templates, encode_one

    folder = Path(folder)
    try:
        routers = {"int8": Router.load(folder, quantized=True, verify=False),
                   "fp32": Router.load(folder, quantized=False, verify=False)}
    except RouterError as e:  # a bundle the runtime refuses has no vectors; Router.load says why on loading
        console.print(f"[yellow]no conformance vectors: the runtime refuses this bundle ({e.reason})[/]")
        return None
    first = routers["int8"]
    settings = conformance_settings(first.decision)
    prompts = conformance_prompts(first.spec)
    lines = [json.dumps({"conformance": 1, "settings": settings, "graphs": list(routers),
                         "tolerance": CONFORMANCE_TOLERANCE, "n_prompts": len(prompts)})]
    for prompt in prompts:
        ids = encode_one(first.tokenizer, prompt, first.spec)
        rec: dict[str, Any] = {"prompt": prompt, "text": clip_chars(compact_templates(prompt, first.spec), first.spec),
                               "input_ids": ids[0].tolist(), "scores": {}, "decisions": {}}
        for graph, router in routers.items():
            p = router.scores([prompt], batch_size=1)[0]
            rec["scores"][graph] = [float(x) for x in p]
            if router.decision["kind"] == "pair":
                rec.setdefault("score", {})[graph] = float(router.routing_score(p))
            rec["decisions"][graph] = [router.models[int(router.choose(p, s.get("strong_fraction"), s.get("threshold"),
                                                                        s.get("cost_weight")))] for s in settings]
        lines.append(json.dumps(rec, ensure_ascii=False))
    (folder / CONFORMANCE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"file": CONFORMANCE, "n_prompts": len(prompts), "tolerance": CONFORMANCE_TOLERANCE}


def with_conformance(folder: Path, router: dict) -> dict:
    """Seal `router` into FOLDER (what the runtime loads), write the conformance vectors from that bundle,
    and return the read-back router.json dict with its new `conformance` record (none when the runtime
    refuses the bundle). Export and calibrate both end a bundle's decision rules this way."""
    router = seal_bundle(folder, {k: v for k, v in router.items() if k != "conformance"})
    conformance = write_conformance(folder)
    if conformance:
        router["conformance"] = conformance
    return router


def seal_bundle(folder: Path, router: dict) -> dict:
    """Write router.json into `folder` with `files` (sha256 of every other file there) and `bundle_sha256`.

    The digest is computed on router.json as it is read back (values that JSON cannot hold are written
    as strings), so `Router.load` recomputes the same. Returns that read-back dict.
    """
    from .bundle_contract import bundle_digest

    router = {k: v for k, v in router.items() if k != "bundle_sha256"}
    router["files"] = {f.name: sha256_file(f) for f in sorted(Path(folder).iterdir())
                       if f.is_file() and f.name != ROUTER}
    router = json.loads(json.dumps(router, default=str))
    router["bundle_sha256"] = bundle_digest(router)
    write_json(Path(folder) / ROUTER, router)
    return router
