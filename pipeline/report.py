"""Routing report: how a bundle routes a labeled test set, scored the way a service would score it.

`report(bundle, data)` writes `report.md` with PNG figures (and `report.json` with every number)
into a folder beside the bundle, and logs the folder to MLflow:

- pair routing: quality vs strong-call share of the router beside random, prompt-length, TF-IDF +
  logistic regression, k-nearest-neighbour and matrix-factorisation baselines; APGR, CPT(50%),
  CPT(80%); always-weak, always-strong and the oracle marked;
- N models: the λ sweep's cost–quality points, RouterBench's AIQ, quality at cost budgets, the
  best single model and the oracle;
- calibration drift: each calibrated target (strong-call share, cost budget) against what it
  realises on this data;
- a breakdown by metadata column (subject, category, eval_name, family, dataset);
- router vs cascade vs ensemble economics from `pipeline.simulate`, with the bundle's measured
  decision latency.

`write_model_card(bundle_dir, router)` writes the bundle's MODEL_CARD.md from router.json alone.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .common import DataError, flatten, read_json

# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


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
    parts.append(f"hash split: test {label.get('test_fraction', 0.2):g}, validation {label.get('val_fraction', 0.1):g}")
    return "; ".join(parts)


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
    if decision.get("costs_assumed"):
        lines.append("\nSome costs were unknown; the N-model decision assumed cost = index + 1 for them.")

    lines += ["", "## Decision rule", ""]
    if pair:
        lines += [f"Pair routing between `{decision['weak']}` and `{decision['strong']}`: score "
                  f"`{decision.get('score', '(1 + p_strong - p_weak) / 2')}`; the prompt goes to the strong model "
                  f"when the score reaches the threshold calibrated on validation prompts for the wanted share "
                  f"of strong calls (default {decision.get('default_strong_fraction', 0.5):g}).", "",
                  "| target strong-call share | score threshold |", "|---:|---:|"]
        lines += [f"| {float(k):g} | {_fmt(float(v))} |" for k, v in sorted(decision.get("thresholds", {}).items(),
                                                                           key=lambda kv: float(kv[0]))]
    if decision.get("kind") == "multi":
        lines += ["", "N-model routing: pick argmax_j p_j − λ·cost_j (cost relative to the priciest model); λ is "
                  "calibrated on validation prompts per cost budget (a fraction of the priciest model's cost).", "",
                  "| cost budget | λ |", "|---:|---:|"]
        lines += [f"| {float(k):g} | {_fmt(float(v))} |" for k, v in sorted(decision.get("cost_lambdas", {}).items(),
                                                                           key=lambda kv: float(kv[0]))]

    lines += ["", "## Metrics", ""]
    metrics = router.get("metrics") or {}
    lines.append(_nested_table(metrics) if metrics else "No metrics recorded at export time.")
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
              + (f", {student.get('layers')} layers" if student.get("family") == "transformer" else ""),
              f"- tokenizer: `{tok.get('file', 'tokenizer.json')}`, at most {tok.get('max_tokens', '?')} tokens "
              f"({tok.get('truncation', '?')}: {tok.get('head_tokens', '?')} from the start, "
              f"{tok.get('tail_tokens', '?')} from the end)",
              f"- ONNX opset {onnx.get('opset', '?')}: `{onnx.get('fp32', 'model.onnx')}` (fp32) and "
              f"`{onnx.get('int8', 'model.int8.onnx')}` (int8, served by default); inputs `input_ids`, "
              "`attention_mask` (int64 [batch, seq]), output `logits` [batch, n_models]",
              "- `router.json` lists the sha256 of every file; the runtime refuses a bundle whose files changed", "",
              "## Intended use", "",
              "Choosing, per prompt and before generation, which of the listed models to call, to trade answer "
              "quality against cost on traffic resembling the training data. Serve it with "
              "`pipeline.runtime.Router` (numpy + onnxruntime, no torch).", "",
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


# ---------------------------------------------------------------------------------------------
# Tables and figures (arrays in, Markdown or PNG out)
# ---------------------------------------------------------------------------------------------

METADATA_COLUMNS = ("subject", "category", "eval_name", "family", "dataset")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_BASELINE_COLORS = ["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def _pct(x) -> str:
    return "not reached" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def pair_table(rows: Mapping[str, Mapping]) -> str:
    """Markdown: one row per method with APGR, CPT(50%), CPT(80%) and quality at 50% strong calls."""
    lines = ["| method | APGR | CPT(50%) | CPT(80%) | quality at 50% strong |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['apgr']:.3f} | {_pct(r['cpt50'])} | {_pct(r['cpt80'])} | {r['q50']:.3f} |")
    return "\n".join(lines)


def plot_pair_curves(curves: Mapping[str, np.ndarray], weak_quality: float, strong_quality: float,
                     path: str | Path, costs: tuple[float, float] | None = None, title: str = "",
                     apgr: Mapping[str, float] | None = None) -> Path:
    """Quality vs share of strong calls for each method; `curves` values are qualities on an even grid
    of fractions from 0 to 1. "router" is drawn bold, "oracle" dotted; always-weak/strong are marked;
    `apgr` values go into the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.6), dpi=130)
    palette = iter(_BASELINE_COLORS * 2)
    for name, q in curves.items():
        f = np.linspace(0, 100, len(q))
        style = dict(lw=2.6, color="tab:blue", zorder=4) if name == "router" else \
            dict(lw=1.4, ls=":", color="black") if name == "oracle" else dict(lw=1.3, alpha=0.9, color=next(palette))
        label = f"{name} (APGR {apgr[name]:.3f})" if apgr and name in apgr else name
        ax.plot(f, q, label=label, **style)
    ax.plot([0, 100], [weak_quality, strong_quality], ls="--", lw=1, color="0.5", label="random mix (expected)")
    ax.scatter([0], [weak_quality], marker="s", s=70, color="white", zorder=5, edgecolor="black",
               label=f"always weak ({weak_quality:.3f})")
    ax.scatter([100], [strong_quality], marker="s", s=70, color="0.25", zorder=5, edgecolor="black",
               label=f"always strong ({strong_quality:.3f})")
    ax.set_xlabel("calls to the strong model (% of prompts)")
    ax.set_ylabel("quality (mean outcome of the chosen model)")
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    if costs is not None and all(c is not None for c in costs):
        cw, cs = costs
        # Cost is affine in the strong-call share, so a second axis reads the same curves as cost.
        sec = ax.secondary_xaxis("top", functions=(lambda f: cw + (cs - cw) * f / 100,
                                                   lambda c: 100 * (c - cw) / ((cs - cw) or 1.0)))
        sec.set_xlabel("cost per prompt (bundle cost units)")
    ax.set_title(title or "Quality vs strong-call share", fontsize=11)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def multi_table(rows: Mapping[str, Mapping], budgets: Sequence[float]) -> str:
    """Markdown: AIQ and quality at each cost budget (fraction of the priciest model's cost) per method."""
    head = "| method | AIQ | " + " | ".join(f"quality at ≤{100 * b:g}% cost" for b in budgets) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(budgets)]
    for name, r in rows.items():
        cells = [("n/a" if q is None else f"{q:.3f}") for q in r["at_budget"]]
        aiq = r.get("aiq")
        lines.append(f"| {name} | {'' if aiq is None else f'{aiq:.3f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_cost_quality(sweep: np.ndarray, hull: np.ndarray, singles: Mapping[str, tuple[float, float]],
                      oracle: tuple[float, float], path: str | Path, cost_unit: str = "bundle cost units",
                      baselines: Mapping[str, np.ndarray] | None = None, aiq: Mapping[str, float] | None = None,
                      title: str = "") -> Path:
    """N models: the router's λ sweep ([k, 2] cost, quality), its non-decreasing convex hull, each
    single model, the oracle and, thin, the hulls of `baselines`; cost per prompt on x; `aiq` values
    go into the legend."""
    plt = _pyplot()
    aiq = aiq or {}

    def label(name):
        return f"{name} hull" + (f" (AIQ {aiq[name]:.3f})" if name in aiq else "")

    fig, ax = plt.subplots(figsize=(8.5, 5.6), dpi=130)
    for (name, h), color in zip((baselines or {}).items(), _BASELINE_COLORS):
        ax.plot(h[:, 0], h[:, 1], lw=1.2, color=color, alpha=0.9, label=label(name))
    ax.scatter(sweep[:, 0], sweep[:, 1], s=14, color="tab:blue", alpha=0.6, label="router, λ sweep")
    ax.plot(hull[:, 0], hull[:, 1], color="tab:blue", lw=2.4, label=label("router"))
    sc = np.array(list(singles.values()))
    ax.scatter(sc[:, 0], sc[:, 1], marker="s", s=40, color="0.45", edgecolor="black", lw=0.5, zorder=3,
               label="single models")
    best = max(singles, key=lambda k: singles[k][1])
    # Name the models only when the labels stay readable.
    named = singles if len(singles) <= 12 else {best: singles[best], min(singles, key=lambda k: singles[k][0]):
                                                 singles[min(singles, key=lambda k: singles[k][0])]}
    for k, (c, q) in named.items():
        ax.annotate(k, (c, q), textcoords="offset points", xytext=(5, 4), fontsize=7, color="0.2")
    ax.scatter([oracle[0]], [oracle[1]], marker="*", s=180, color="gold", edgecolor="black", zorder=5,
               label=f"oracle ({oracle[1]:.3f})")
    ax.set_xlabel(f"cost per prompt ({cost_unit})")
    ax.set_ylabel("quality (mean outcome of the chosen model)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Cost vs quality over the λ sweep", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # outside: never over points
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def drift_table(rows: Sequence[Mapping], target_name: str, setting_name: str, budget: bool = False) -> str:
    """Markdown: calibrated target, its setting (threshold or λ), what it realises here, and the gap.

    `budget`: the target is a ceiling (a cost budget), so only going over it is drift.
    """
    last = "over budget (points)" if budget else "drift (points)"
    lines = [f"| {target_name} | {setting_name} | realised on this data | {last} |", "|---:|---:|---:|---:|"]
    for r in rows:
        gap = 100 * (r["realised"] - r["target"])
        cell = ("within" if gap <= 0.05 else f"+{gap:.1f}") if budget else f"{gap:+.1f}"
        lines.append(f"| {100 * r['target']:g}% | {r['setting']:.4g} | {100 * r['realised']:.1f}% | {cell} |")
    return "\n".join(lines)


def breakdown_rows(values: Sequence, choices: np.ndarray, outcomes: np.ndarray, references: Mapping[str, int],
                   share_of: int, rel_cost: np.ndarray | None = None, max_groups: int = 40) -> list[dict]:
    """Per metadata value: n, the share routed to model `share_of`, the mean relative cost of the picks
    (when `rel_cost` is given), and the quality of the router and of always calling each reference model.

    outcomes: [n, n_models] with every used model observed. The largest `max_groups` groups are kept;
    the rest are merged into one "other" row.
    """
    values = np.array(["(missing)" if v is None else str(v) for v in values], dtype=object)
    chosen = outcomes[np.arange(len(values)), choices]
    names, counts = np.unique(values, return_counts=True)
    order = [names[i] for i in np.lexsort((names, -counts))]
    groups = [(g, values == g) for g in order[:max_groups]]
    if len(order) > max_groups:
        groups.append((f"(other {len(order) - max_groups} groups)", ~np.isin(values, order[:max_groups])))
    out = []
    for g, sel in groups:
        row = {"group": g, "n": int(sel.sum()), "share": float(np.mean(choices[sel] == share_of))}
        if rel_cost is not None:
            row["cost"] = float(rel_cost[choices[sel]].mean())
        row["router"] = float(chosen[sel].mean())
        row.update({name: float(outcomes[sel, j].mean()) for name, j in references.items()})
        out.append(row)
    return out


def breakdown_table(column: str, rows: Sequence[Mapping], share_label: str = "strong share") -> str:
    """Markdown of `breakdown_rows`: shares in %, relative cost in %, qualities to 3 decimals."""
    if not rows:
        return ""
    refs = [k for k in rows[0] if k not in ("group", "n", "share", "cost", "router")]
    has_cost = "cost" in rows[0]
    head = [column, "n", share_label] + (["mean cost"] if has_cost else []) + ["router quality"] + \
        [f"{r} quality" for r in refs]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["group"], str(r["n"]), f"{100 * r['share']:.0f}%"] + ([f"{100 * r['cost']:.0f}%"] if has_cost else [])
        cells += [f"{r['router']:.3f}"] + [f"{r[k]:.3f}" for k in refs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

PAIR_FRACTIONS = np.linspace(0.0, 1.0, 51)  # operating points of the pair router in the simulation
BUDGETS = (0.25, 0.5, 0.75, 1.0)
RANDOM_SEEDS = 10  # cost budgets (fraction of the priciest model's cost) in the N-model table


def _load_data(data: str, training_config: Mapping):
    """(name, labels Dataset, label stats): a labeled dataset name, or a data file ingested and labeled here."""
    from .common import labels_dir, processed_dir
    from .config import load_config
    from .label import label, load_labels

    def label_cfg():
        # The bundle's own label options, so targets mean what they meant in training.
        try:
            return load_config(base={"label": dict(training_config.get("label", {}))}).label
        except Exception:
            return None

    if Path(data).is_file() or data.startswith("hf:"):
        from .ingest import ingest

        name = ingest(data).name
        label(name, label_cfg())
    else:
        name = data
        if not (labels_dir(name) / "label_stats.json").is_file():
            if not (processed_dir(name) / "manifest.json").is_file():
                raise DataError(f"{data!r} is neither a data file nor a dataset under {processed_dir(name).parent}")
            label(name, label_cfg())
    ds, stats = load_labels(name)
    return name, ds, stats


class _Columns:
    """The labeled table as arrays, with target and mask columns in the bundle's model order."""

    def __init__(self, ds, stats: Mapping, models: Sequence[str]):
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        missing = [m for m in models if m not in stats["models"]]
        if missing:
            raise DataError(f"the bundle routes between {list(models)} but the data has no outcomes for {missing} "
                            f"(its models: {stats['models']})")
        cols = [stats["models"].index(m) for m in models]

        def matrix(name, dtype):
            col = table.column(name).combine_chunks()
            return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(table), -1)[:, cols]

        self.prompts = table.column("prompt").to_pylist()
        self.ids = table.column("prompt_id").to_pylist()
        self.target = matrix("target", np.float64)
        self.mask = matrix("mask", bool)
        self.split = np.asarray(table.column("split").to_pylist())
        self.meta = {c: table.column(c).to_pylist() for c in METADATA_COLUMNS if c in table.column_names}


def _model_costs(router_json: Mapping) -> np.ndarray:
    """Bundle costs in model order; unknown costs count as index + 1, as the decision rule assumed."""
    ordered = sorted(router_json["models"], key=lambda m: m["index"])
    return np.array([m["cost"] if m.get("cost") is not None else m["index"] + 1.0 for m in ordered], dtype=float)


def _embeddings(cols: _Columns, training_config: Mapping) -> tuple[np.ndarray, str]:
    """Teacher embeddings of every prompt (the cache training filled), else TF-IDF + SVD features."""
    from .config import load_config

    try:
        from .encoders import teacher_embeddings

        t = load_config(base={"teacher": dict(training_config.get("teacher", {}))}).teacher
        return teacher_embeddings(cols.prompts, cols.ids, t.path, t.max_tokens, t.batch_size), "teacher embeddings"
    except ImportError:  # a serving-only install without torch
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        x = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit_transform(cols.prompts)
        dim = max(2, min(128, x.shape[1] - 1))
        return TruncatedSVD(dim, random_state=0).fit_transform(x), "TF-IDF + SVD features (no torch for the teacher)"


def _pair_section(cols, p, train, test, weak, strong, emb, costs, known_costs: bool, figdir: Path,
                  title: str) -> tuple[list[str], dict]:
    from . import baselines as bl
    from .metrics import quality_curve, routing_metrics

    both_te = test[cols.mask[test, weak] & cols.mask[test, strong]]
    both_tr = train[cols.mask[train, weak] & cols.mask[train, strong]]
    if len(both_te) < 2:
        return ["_Too few test prompts with both pair models observed for a quality curve._"], {}
    yw, ys = cols.target[both_te, weak], cols.target[both_te, strong]
    pos = {r: i for i, r in enumerate(test)}
    pt = p[[pos[r] for r in both_te]]
    prompts_te = [cols.prompts[r] for r in both_te]
    scores = {"router": (1.0 + pt[:, strong] - pt[:, weak]) / 2.0,
              "random": [bl.random_scores(len(both_te), seed) for seed in range(RANDOM_SEEDS)],
              "prompt length": bl.length_scores(prompts_te)}
    if len(both_tr):
        y_tr = bl.strong_needed(cols.target[both_tr, weak], cols.target[both_tr, strong])
        scores["TF-IDF + LR"] = bl.tfidf_lr([cols.prompts[r] for r in both_tr], y_tr, prompts_te)
        scores["kNN"] = bl.knn_scores(emb[both_tr], y_tr, emb[both_te])
        mf = bl.matrix_factorization(emb[both_tr], cols.target[both_tr][:, [weak, strong]],
                                     np.ones((len(both_tr), 2), bool), emb[both_te])
        scores["matrix factorisation"] = mf[:, 1] - mf[:, 0]
    scores["oracle"] = bl.oracle_scores(yw, ys)
    rows, curves = {}, {}
    for name, s in scores.items():
        runs = s if isinstance(s, list) else [s]  # random: averaged over seeds
        ms = [routing_metrics(r, yw, ys) for r in runs]
        q = np.mean([quality_curve(r, yw, ys)[1] for r in runs], axis=0)
        curves[name] = q
        rows[name] = {k: float(np.mean([m[k] for m in ms])) for k in ("apgr", "cpt50", "cpt80")} | {"q50": float(q[50])}
    plot_pair_curves(curves, float(yw.mean()), float(ys.mean()), figdir / "quality_curves.png",
                     costs=(costs[weak], costs[strong]) if known_costs else None, title=title, apgr={k: v["apgr"] for k, v in rows.items()})
    md = [f"Test prompts with both models observed: {len(both_te)}. Random is averaged over {RANDOM_SEEDS} seeds; the oracle knows the "
          "outcomes. CPT(x) is the share of strong calls needed to recover x of the weak→strong gap.", "",
          pair_table(rows), "", "![quality vs strong-call share](quality_curves.png)"]
    return md, {"n": int(len(both_te)), "weak_quality": float(yw.mean()), "strong_quality": float(ys.mean()),
                "methods": rows}


def _lambda_grid(p: np.ndarray, costs: np.ndarray, n: int = 120) -> np.ndarray:
    """λ from 0 (best predicted model) to the λ above which every prompt goes to the cheapest model."""
    c = costs / costs.max()
    cheap = int(np.argmin(c))
    dearer = c > c[cheap]
    hi = float(np.max((p[:, dearer] - p[:, [cheap]]) / (c[dearer] - c[cheap]), initial=0.0)) if dearer.any() else 0.0
    if hi <= 0:
        return np.array([0.0])
    return np.unique(np.r_[0.0, np.geomspace(hi * 1e-3, hi * 1.001, n)])


def _sweep(p: np.ndarray, y: np.ndarray, costs: np.ndarray) -> dict:
    from .metrics import _nondecreasing_hull, aiq, cost_quality_points

    c, q = cost_quality_points(p, y, None, costs, _lambda_grid(p, costs))
    lo = float((costs / costs.max()).min())
    hx, hy = _nondecreasing_hull(c, q)
    if hx[-1] < 1.0:  # AIQ counts the hull as flat up to the priciest model's cost
        hx, hy = np.r_[hx, 1.0], np.r_[hy, hy[-1]]
    at = [float(q[c <= b + 1e-12].max()) if (c <= b + 1e-12).any() else None for b in BUDGETS]
    return {"points": np.stack([c, q], 1), "hull": np.stack([hx, hy], 1),
            "aiq": aiq(c, q, cost_range=(lo, 1.0)) if lo < 1.0 else float("nan"), "at_budget": at}


def _multi_section(cols, p, test, train, emb, costs, known_costs: bool, models, figdir: Path,
                   title: str) -> tuple[list[str], dict]:
    from . import baselines as bl

    full = cols.mask[test].all(1)
    if full.sum() < 2:
        return ["_Too few test prompts with every model observed for the N-model analysis._"], {}
    rows_te = test[full]
    y = cols.target[rows_te]
    pm = p[full]
    c = costs / costs.max()
    methods = {"router": pm, "random": np.random.default_rng(0).random(pm.shape)}
    full_tr = train[cols.mask[train].all(1)]
    if len(full_tr):
        methods["kNN"] = bl.knn_scores(emb[full_tr], cols.target[full_tr], emb[rows_te])
    if len(train):
        methods["matrix factorisation"] = bl.matrix_factorization(emb[train], cols.target[train], cols.mask[train],
                                                                  emb[rows_te])
    sweeps = {name: _sweep(pr, y, costs) for name, pr in methods.items()}
    singles = {m: (float(c[j]), float(y[:, j].mean())) for j, m in enumerate(models)}
    # Oracle: per prompt the best outcome, from the cheapest model that reaches it.
    by_cost = np.argsort(c, kind="stable")
    pick = by_cost[np.argmax(y[:, by_cost], axis=1)]
    oracle = (float(c[pick].mean()), float(y[np.arange(len(y)), pick].mean()))
    best = max(singles, key=lambda k: singles[k][1])
    table = {name: {"aiq": s["aiq"], "at_budget": s["at_budget"]} for name, s in sweeps.items()}
    table[f"best single model ({best})"] = {"aiq": None, "at_budget": [
        max((q for cc, q in singles.values() if cc <= b + 1e-12), default=None) for b in BUDGETS]}
    table["oracle"] = {"aiq": None, "at_budget": [oracle[1] if oracle[0] <= b + 1e-12 else None for b in BUDGETS]}
    plot_cost_quality(sweeps["router"]["points"], sweeps["router"]["hull"], singles, oracle, figdir / "cost_quality.png",
                      cost_unit="fraction of the priciest model's cost",
                      baselines={k: v["hull"] for k, v in sweeps.items() if k != "router"},
                      aiq={k: v["aiq"] for k, v in sweeps.items()}, title=title)
    md = [f"Test prompts with every model observed: {len(rows_te)}. Each method picks argmax_j p_j − λ·cost_j over a "
          "sweep of λ; AIQ (RouterBench) is the area under the non-decreasing convex hull of its (cost, quality) "
          "points over the cost range from the cheapest to the priciest model, divided by that range. Costs are "
          "relative to the priciest model" + (" (unknown costs: model j is taken to cost j + 1, as the decision rule "
                                              "assumed)" if not known_costs else "")
          + ". Quality at a budget is the best swept point within it.", "",
          multi_table(table, BUDGETS), "", "![cost vs quality](cost_quality.png)"]
    return md, {"n": int(len(rows_te)), "methods": table, "singles": singles, "oracle": oracle}


def _decision_ms(router, router_json: Mapping, prompts: Sequence[str]) -> tuple[float, str]:
    """The bundle's p50 decision latency in ms: from router.json, else timed here."""
    lat = router_json.get("latency") or {}
    p50 = (lat.get("overall") or {}).get("p50")
    if p50 is not None:
        return float(p50), f"p50 recorded at export ({lat.get('model', 'int8')}, batch 1, {lat.get('threads', 1)} thread)"
    from .latency import time_decisions

    sample = [prompts[i % len(prompts)] for i in range(300)]
    ms = time_decisions(router, sample, warmup=50)
    return float(np.median(ms)), f"p50 of {len(sample)} single decisions timed now on this data's test prompts"


def _economics(cols, test, p, choices, costs, sim_costs, models, kind, weak, strong, decision_ms, profile, figdir,
               title):
    """Simulate router, cascade and ensemble; `sim_costs` (None = unknown) only rank models missing from
    the profile, while `costs` are the ones the routing decision uses."""
    from .metrics import choose
    from .simulate import economics_table, plot_economics, simulate

    if kind == "pair":
        use = [weak, strong]
        score = (1.0 + p[:, strong] - p[:, weak]) / 2.0
        order = np.argsort(-score, kind="stable")
        curve = {}
        for f in PAIR_FRACTIONS:
            top = np.zeros(len(test), int)
            top[order[:int(round(f * len(test)))]] = 1
            curve[float(f)] = top
        router_choices, knob = (choices == strong).astype(int), "strong fraction"
    else:
        use = list(range(len(models)))
        lambdas = _lambda_grid(p, costs, n=60)
        curve = {float(lam): choose(p, costs, lam) for lam in lambdas}
        router_choices, knob = choices, "λ"
    res = simulate(cols.target[test][:, use], cols.mask[test][:, use], [sim_costs[j] for j in use], profile,
                   models=[models[j] for j in use], router_choices=router_choices, router_curve=curve, knob=knob,
                   decision_ms=decision_ms)
    plot_economics(res, figdir / "economics.png", title=title)
    return res, economics_table(res)


def _metric_name(key: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", key)


def _log_mlflow(out: Path, name: str, bundle: Path, numbers: Mapping) -> None:
    import mlflow

    from .common import setup_mlflow

    setup_mlflow()
    flat = {_metric_name(k): float(v) for k, v in flatten(numbers, lists=False).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    with mlflow.start_run(run_name=f"report-{name}", nested=mlflow.active_run() is not None):
        mlflow.set_tags({"dataset": name, "bundle": str(bundle)})
        mlflow.log_metrics(flat)
        mlflow.log_artifacts(str(out), artifact_path="report")


def report(bundle: str | Path, data: str, out: str | Path | None = None,
           profile: str | Path | Mapping | None = None) -> Path:
    """Score `data`'s test split with the bundle and write OUT/report.md (+ PNGs, report.json); returns report.md.

    `data`: a labeled dataset name, or a data file (ingested and labeled with the bundle's label options).
    `out` defaults to BUNDLE/../report. `profile`: the model profile of the economics simulation.
    """
    from .common import ConfigError, atomic_dir, console, write_json
    from .metrics import choose, realised_fractions
    from .runtime import Router
    from .simulate import economics_rows

    bundle = Path(bundle)
    router = Router.load(bundle)
    rj = router.config
    out = Path(out) if out else bundle.parent / "report"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").is_file())):
        raise ConfigError(f"{out} exists and is not a report folder; choose another --out")
    training_config = rj.get("training_config") or {}
    name, ds, stats = _load_data(str(data), training_config)
    cols = _Columns(ds, stats, router.models)
    test, train = np.flatnonzero(cols.split == "test"), np.flatnonzero(cols.split == "train")
    if len(test) == 0:
        raise DataError(f"dataset {name!r} has no test prompts")
    models, costs, decision = router.models, _model_costs(rj), rj["decision"]
    kind = decision["kind"]
    pair_names = (decision.get("weak"), decision.get("strong")) if decision.get("weak") else \
        (stats["pair"]["weak"], stats["pair"]["strong"])
    if all(n in models for n in pair_names):
        weak, strong = models.index(pair_names[0]), models.index(pair_names[1])
    else:  # the data's pair is not among the bundle's models: compare the cheapest with the priciest
        weak, strong = int(np.argmin(costs)), int(np.argmax(costs))
    p = router.scores([cols.prompts[r] for r in test])
    score = (1.0 + p[:, strong] - p[:, weak]) / 2.0
    if kind == "pair":
        default = float(decision.get("default_strong_fraction", 0.5))
        choices = np.where(score >= router.threshold_for(default), strong, weak)
        default_note = f"strong-call share target {default:g}"
    else:
        lam = router.default_cost_weight()
        choices = choose(p, costs, lam)
        default_note = f"λ = {lam:.4g}"
    emb, emb_note = _embeddings(cols, training_config) if len(train) else (None, "")
    decision_ms, latency_note = _decision_ms(router, rj, [cols.prompts[r] for r in test])
    label = f"{name} test split"
    numbers: dict = {"dataset": name, "bundle": str(bundle), "n_test": int(len(test)), "n_train": int(len(train)),
                     "models": models, "kind": kind, "decision_ms": decision_ms}

    with atomic_dir(out) as tmp:
        md = [f"# Routing report: `{rj.get('name') or bundle.parent.name}` on `{name}`", "",
              f"Bundle `{bundle}` ({kind} routing, {len(models)} models: {', '.join(f'`{m}`' for m in models)}) "
              f"scored {len(test)} test prompts of `{name}` through the ONNX runtime, as a service would. "
              f"Baselines were fitted on its {len(train)} train prompts"
              + (f"; kNN and matrix factorisation use {emb_note}." if emb_note else ".")]

        md += ["", f"## Pair routing: `{models[weak]}` → `{models[strong]}`", ""]
        known = all(m.get("cost") is not None for m in rj["models"])
        pair_md, numbers["pair"] = _pair_section(cols, p, train, test, weak, strong, emb, costs, known, tmp,
                                                 f"{label}: {models[weak]} → {models[strong]}")
        md += pair_md
        if len(models) > 2:
            md += ["", f"## {len(models)} models: cost vs quality", ""]
            multi_md, numbers["multi"] = _multi_section(cols, p, test, train, emb, costs, known, models, tmp,
                                                        f"{label}: {len(models)} models")
            md += multi_md

        md += ["", "## Calibration drift", ""]
        drift = []
        if decision.get("thresholds"):
            real = realised_fractions(score, decision["thresholds"])
            drift = [{"target": float(k), "setting": float(t), "realised": real[k]}
                     for k, t in sorted(decision["thresholds"].items(), key=lambda kv: float(kv[0]))]
            md += ["Share of test prompts sent to the strong model by each threshold calibrated on the training "
                   "data's validation split:", "", drift_table(drift, "target strong share", "threshold"), ""]
        lam_drift = []
        if decision.get("cost_lambdas"):
            c = costs / costs.max()
            lam_drift = [{"target": float(b), "setting": float(lam), "realised": float(c[choose(p, costs, lam)].mean())}
                         for b, lam in sorted(decision["cost_lambdas"].items(), key=lambda kv: float(kv[0]))]
            md += ["Mean cost (relative to the priciest model) realised by each calibrated λ:", "",
                   drift_table(lam_drift, "cost budget", "λ", budget=True), ""]
        numbers["drift"] = {"thresholds": drift, "cost_lambdas": lam_drift}

        numbers["breakdown"] = {}
        if kind == "pair":
            refs, share_of, rel_cost = {"weak": weak, "strong": strong}, strong, None
            share_label, intro = "strong share", f"strong share is the share routed to `{models[strong]}`"
        else:
            q = np.where(cols.mask[test], cols.target[test], np.nan)
            best = int(np.nanargmax(np.nanmean(q, axis=0)))
            cheap = int(np.argmin(costs))
            refs = {f"cheapest ({models[cheap]})": cheap, f"best single ({models[best]})": best}
            share_of, rel_cost = best, costs / costs.max()
            share_label = "best-model share"
            intro = f"best-model share is the share routed to `{models[best]}`, mean cost relative to the priciest model"
        used = [*refs.values(), share_of]
        usable = cols.mask[test][:, used].all(1) & cols.mask[test, choices]
        if cols.meta and usable.any():
            md += ["## Breakdown", "", f"At the default operating point ({default_note}); {intro}; "
                   f"{int(usable.sum())} test prompts with the models involved observed.", ""]
            for column, values in cols.meta.items():
                rows = breakdown_rows([values[r] for r in test[usable]], choices[usable], cols.target[test[usable]],
                                      refs, share_of, rel_cost)
                numbers["breakdown"][column] = rows
                md += [f"### by `{column}`", "", breakdown_table(column, rows, share_label), ""]

        md += ["## Router vs cascade vs ensemble (simulated)", ""]
        sim_costs = [m.get("cost") for m in sorted(rj["models"], key=lambda m: m["index"])]
        cost_note = ""
        if kind == "pair" and None in (sim_costs[weak], sim_costs[strong]):
            # Unknown pair costs: the strong model is taken to be the pricier one, as routing assumes.
            sim_costs[weak], sim_costs[strong] = 1.0, 2.0
            cost_note = " The bundle has no costs: the strong model is taken to be the pricier one."
        elif None in sim_costs:
            cost_note = " Models with unknown cost and no profile entry get the middle default profile."
        res, econ_md = _economics(cols, test, p, choices, costs, sim_costs, models, kind, weak, strong, decision_ms,
                                  profile, tmp, f"{label}: router vs cascade vs ensemble (simulated)")
        numbers["economics"] = {"n": res["n"], "ladder": res["ladder"], "judge": res["judge"],
                                "profile": res["profile"],
                                "rows": [{k: v for k, v in r.items()} for r in economics_rows(res)]}
        md += [f"Per prompt: the router's decision ({decision_ms:.3f} ms, {latency_note}) plus one generation; a "
               f"cascade over {' → '.join(f'`{m}`' for m in res['ladder'])} that asks an LLM judge (accuracy "
               f"{res['judge']['accuracy']:.2f}, {res['judge']['latency_ms']:g} ms, ${res['judge']['cost']:g} per call) "
               "whether to escalate; an ensemble that asks every model of that ladder in parallel and lets the "
               "judge pick. Output lengths are drawn per prompt (same draws for every strategy); time to first "
               "token, speed and price come from the model profile (table below). Matched rows are the router's "
               f"operating points ({res['knob']}) whose quality or cost matches the cascade's or ensemble's. "
               f"{res['n']} test prompts with every simulated model observed.{cost_note}", "",
               econ_md, "", "![economics](economics.png)", "", "Model profile:", "",
               "| model | time to first token (s) | tokens / s | typical output tokens | USD / 1k output tokens |",
               "|---|---:|---:|---:|---:|"]
        # The models the strategies use: the ladder and the router's default picks.
        shown = set(res["ladder"]) | {models[c] for c in np.unique(choices)}
        md += [f"| {m} | {v['ttft_s']:.2f} | {v['tokens_per_s']:.0f} | {v['output_tokens']:.0f} | {v['price_per_1k']:.4g} |"
               for m, v in res["profile"].items() if m in shown]
        if len(res["profile"]) > len(shown):
            md += ["", f"{len(res['profile']) - len(shown)} other models (on the router's λ sweep only) are in "
                   "`report.json`."]
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        write_json(tmp / "report.json", numbers)
    _log_mlflow(out, name, bundle, numbers)
    console.print(f"[green]report[/] {out / 'report.md'}")
    return out / "report.md"
