"""The bundle's MODEL_CARD.md, written from router.json alone (no clock, no other file)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from . import routing
from .common import flatten, read_json
from .config import TEST_FRACTION, VAL_FRACTION
from .routing import PAIR_SCORE


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}"
    return str(v)


def _nested_table(d: Mapping, row_label: str = "metric") -> str:
    """Entries that are flat {name: value} dicts side by side (e.g. splits × metrics), the rest flattened.

    None values (e.g. an infinite budget written to JSON) are left out.
    """
    def scalar(v):
        return not isinstance(v, (Mapping, list, tuple))

    cols = [k for k, v in d.items() if isinstance(v, Mapping) and v and all(scalar(x) for x in v.values())]
    parts = []
    if cols:
        rows = list(dict.fromkeys(k for c in cols for k, v in d[c].items() if v is not None))
        lines = [f"| {row_label} | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {r} | " + " | ".join(_fmt(d[c][r]) if d[c].get(r) is not None else "" for c in cols) + " |"
                  for r in rows]
        parts.append("\n".join(lines))
    flat = {k: v for k, v in flatten({k: v for k, v in d.items() if k not in cols}, lists=False).items() if v is not None}
    if flat:
        parts.append("\n".join([f"| {row_label} | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]))
    return "\n\n".join(parts)


def _label_method(cfg: Mapping) -> str:
    label = cfg.get("label", {}) if isinstance(cfg, Mapping) else {}
    if not label:
        return "not recorded in router.json"
    parts = ["per-model outcomes scaled to targets in [0, 1]"]
    if label.get("score_range"):
        parts.append(f"scores read on the range {label['score_range']}")
    if label.get("threshold") is not None:
        parts.append(f"binarised at {label['threshold']}")
    if label.get("relaxation"):
        parts.append(f"soft labels P[q(weak) ≥ q(strong) − {label['relaxation']}]")
    parts.append(f"pairwise data: models ranked by Bradley–Terry strength into {label.get('tiers', 2)} tiers")
    parts.append(f"hash split: test {label.get('test_fraction', TEST_FRACTION):g}, "
                 f"validation {label.get('val_fraction', VAL_FRACTION):g}")
    return "; ".join(parts)


def _chosen_line(selection: Mapping) -> str:
    """What the pipeline chose on held-out train data (`router.json` `selection`), in one bullet."""
    prior = (selection.get("cluster_prior") or {}).get("chosen")
    if selection.get("group_by"):
        group = f"group smoothing by `{selection['group_by']}` (cross-validated)"
    else:
        group = "no group smoothing" + (" (cross-validated)" if selection.get("candidates") else "")
    return ("- chosen by the pipeline: " + group + "; cluster prior (on validation) "
            + (f"k = {prior['k']}, τ = {prior['temperature']}, β = {prior['beta']} (nearest train clusters' "
               "model rates blended into the outputs, inside the graph)" if prior else "none")
            + " (`selection` in router.json)")


def write_model_card(bundle_dir: str | Path, router: Mapping | None = None) -> Path:
    """Write BUNDLE/MODEL_CARD.md from the router.json dict (read from the bundle when not given).

    A pure function of `router`: no clock, no other file, so the card hashes the same every time.
    """
    bundle_dir = Path(bundle_dir)
    router = router if router is not None else read_json(bundle_dir / "router.json")
    name = router.get("name") or bundle_dir.parent.name
    models = sorted(router.get("models", []), key=lambda m: m["index"])
    decision = router.get("decision", {})
    cfg = router.get("training_config", {}) or {}
    tok = router.get("tokenizer", {})
    student = cfg.get("student", {})
    pair = decision.get("weak") and decision.get("strong")

    lines = [f"# Model card: prerouter router `{name}`", "",
             f"A pre-generation LLM router exported by prerouter {router.get('pipeline_version', '?')} "
             f"({router.get('created_at', 'date not recorded')}). Before any model generates, it reads the prompt "
             f"and predicts for each of the {len(models)} candidate models the probability that the model answers "
             "it well (`sigmoid(logits)` of the ONNX graph), then picks one model.", "",
             "## Data", "",
             f"- training data hash: `{router.get('data_hash') or 'not recorded'}`",
             f"- label method: {_label_method(cfg)}",
             "- training: a teacher head on sentence embeddings, distilled into the compact student below", "",
             "## Models and costs", "",
             "| index | model | cost | role |", "|---:|---|---:|---|"]
    for m in models:
        role = "weak" if m["name"] == decision.get("weak") else "strong" if m["name"] == decision.get("strong") else ""
        cost = "unknown" if m.get("cost") is None else _fmt(m["cost"])
        lines.append(f"| {m['index']} | {m['name']} | {cost} | {role} |")
    if decision.get("costs_assumed") and all(m.get("cost") is None for m in models):
        lines.append("\nNo cost was known: the default decision is the best predicted model (λ = 0); the cost "
                     "budgets below assume cost = index + 1.")
    elif decision.get("costs_assumed"):
        lines.append("\nSome costs were unknown; the N-model decision assumed cost = index + 1 for them.")

    lines += ["", "## Decision rule", ""]
    kind = decision.get("kind")
    thresholds_table = ["| target strong-call share | score threshold |", "|---:|---:|"] + [
        f"| {float(k):g} | {_fmt(float(v))} |" for k, v in sorted(decision.get("thresholds", {}).items(),
                                                                key=lambda kv: float(kv[0]))]
    if kind == "pair":
        lines += [f"**Decision kind: `pair`** (router.json `decision.kind`), the rule `Router.route` uses. Between "
                  f"`{decision['weak']}` and `{decision['strong']}`: score "
                  f"`{decision.get('score', PAIR_SCORE)}`; the prompt goes to the strong model when the score reaches "
                  "the threshold calibrated on validation prompts for the wanted share of strong calls.", "",
                  f"- Settings it takes: `strong_fraction` in [0, 1] (default "
                  f"{decision.get('default_strong_fraction', 0.5):g}; between calibrated shares the threshold is "
                  "interpolated linearly, 0 = never strong, 1 = always strong) or `threshold` (a raw score), not "
                  "both. `cost_weight` does not apply to this bundle: passing it is an error.", "",
                  *thresholds_table]
    elif kind == "multi":
        lines += ["**Decision kind: `multi`** (router.json `decision.kind`), the rule `Router.route` uses: pick "
                  "argmax_j p_j − λ·cost_j, with costs divided by the priciest model's (an unknown cost counts as "
                  "index + 1); an exact tie goes to the cheaper model. λ is calibrated on validation prompts per "
                  "cost budget (the mean cost as a fraction of the priciest model's cost).", "",
                  "- Settings it takes: `cost_weight` = λ ≥ 0 (default "
                  f"{_fmt(routing.default_cost_weight(decision))}). `strong_fraction` and `threshold` do not apply "
                  "to this bundle: passing either is an error.", "",
                  "| cost budget | λ |", "|---:|---:|"]
        lines += [f"| {float(k):g} | {_fmt(float(v))} |" for k, v in sorted(decision.get("cost_lambdas", {}).items(),
                                                                           key=lambda kv: float(kv[0]))]
        if pair:
            lines += ["", f"For evaluation and reports only (not a routing rule of this bundle): the pair "
                      f"`{decision['weak']}` → `{decision['strong']}` scored by `{decision.get('score', PAIR_SCORE)}`, "
                      "with thresholds calibrated like a pair bundle's:", "", *thresholds_table]
    if decision.get("win_probability"):
        lines += ["", f"Pairwise data: P(model a beats model b on a prompt) = `{decision['win_probability']}` "
                  "(`Router.win_probability(prompts, a, b)`)."]
    if decision.get("unreachable_fractions"):
        lines += ["", "Tied validation scores make these strong-call shares unreachable (share realised instead): "
                  + ", ".join(f"{k} → {v}" for k, v in decision["unreachable_fractions"].items()) + "."]

    lines += ["", "## Metrics", ""]
    metrics = router.get("metrics") or {}
    lines.append(_nested_table(metrics) if metrics else "No metrics recorded at export time.")
    if any(isinstance(v, Mapping) and "quality" in v for v in metrics.values()):
        lines += ["", "`quality` is the routing measure the pipeline chooses its settings by (and `prerouter tune` "
                  "maximises): the pair's APGR for two models, the mean outcome of each prompt's highest-scored "
                  "model for more, the share of decided battles whose winner the scores predict for pairwise data."]
    lines += ["", "## Latency", ""]
    latency = router.get("latency") or {}
    if latency:
        lines += ["Single routing decisions (batch 1, tokenization included); times in milliseconds.", "",
                  _nested_table({k: v for k, v in latency.items() if k != "buckets"}, "figure")]
        if isinstance(latency.get("buckets"), Mapping):
            lines += ["", "Milliseconds per decision by prompt length:", "",
                      _nested_table(latency["buckets"], "figure")]
    else:
        lines.append("Not measured when this card was written; run `prerouter check-latency BUNDLE` "
                     "(single decisions, batch 1, one thread, tokenization included).")

    onnx = router.get("onnx", {})
    lines += ["", "## Student and files", "",
              f"- student: {student.get('family', '?')} encoder, width {student.get('dim', '?')}"
              + (f", {student.get('layers')} layers" if student.get("family") == "transformer" else "")
              + (f"; {student['members']} of them (seeds apart), logits averaged in the graph"
                 if student.get("members", 1) > 1 else ""),
              f"- tokenizer: `{tok.get('file', 'tokenizer.json')}`, at most {tok.get('max_tokens', '?')} tokens "
              f"({tok.get('truncation', '?')}: {tok.get('head_tokens', '?')} from the start, "
              f"{tok.get('tail_tokens', '?')} from the end). Before tokenizing, "
              + (f"{len((tok.get('templates') or {}).get('prefixes', []))} learned template prefix(es) and "
                 f"{len((tok.get('templates') or {}).get('suffixes', []))} suffix(es) are shortened "
                 "(`tokenizer.templates`), then " if tok.get("templates") else "")
              + f"a prompt longer than {tok.get('char_window', '?')} characters (Unicode code points, not UTF-16 "
              f"units) keeps its first W − t and last t characters joined by one inserted space, t = "
              f"⌊{tok.get('char_window', 'W')}·{tok.get('tail_tokens', 'T')} / "
              f"({tok.get('head_tokens', 'H')} + {tok.get('tail_tokens', 'T')})⌋ (rounded down); the exact rules "
              "are in docs/contracts.md §2",
              f"- conformance vectors: `{(router.get('conformance') or {}).get('file', 'conformance.jsonl')}` "
              "(token ids, scores and decisions at several settings for a few hundred prompts, edge cases "
              "included): a port of the runtime to another language must reproduce them",
              f"- ONNX opset {onnx.get('opset', '?')}: `{onnx.get('fp32', 'model.onnx')}` (fp32) and "
              f"`{onnx.get('int8', 'model.int8.onnx')}` (int8, served by default); inputs `input_ids`, "
              "`attention_mask` (int64 [batch, seq]), output `logits` [batch, n_models]",
              "- `router.json` lists the sha256 of every file; the runtime refuses a bundle whose files changed",
              _chosen_line(router.get("selection") or {}), "",
              "## Intended use", "",
              "Choosing, per prompt and before generation, which of the listed models to call, to trade answer "
              "quality against cost on traffic resembling the training data. Serve it with "
              "`pipeline.runtime.Router` (`pip install prerouter`: numpy + onnxruntime + tokenizers, no torch) or "
              "over HTTP with `prerouter serve BUNDLE` (the `serve` extra).", "",
              "## Limits", "",
              "- It knows only the models listed above; adding, removing or updating a model needs new outcome "
              "data and retraining.",
              "- Quality figures hold for prompts like the training data. On other traffic the realised share of "
              "strong calls drifts from its calibrated target: check with `prerouter report`.",
              "- Labels come from the outcome data (correctness, judge scores or pairwise preferences) and carry "
              "their noise and biases, e.g. a judge model's preferences.",
              f"- Prompts longer than {tok.get('max_tokens', '?')} tokens are seen only through their start and "
              "end; the vocabulary is that of the tokenizer, so other languages and scripts may route poorly.",
              "- It predicts answer quality, not safety: it is no content filter.", ""]
    path = bundle_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
