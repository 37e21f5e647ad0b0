"""Tables and figures of the routing report: arrays in, Markdown or PNG out (no data loading)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


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
                   share_of: int, rel_cost: np.ndarray | None = None, max_groups: int = 40,
                   strategies: Mapping[str, np.ndarray] | None = None) -> list[dict]:
    """Per metadata value: n, the share routed to model `share_of`, the mean relative cost of the picks
    (when `rel_cost` is given), and the quality of the router, of always calling each reference model
    and of each of `strategies` (per-prompt outcomes, NaN where unknown).

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
        for name, got in (strategies or {}).items():
            known = got[sel][np.isfinite(got[sel])]
            row[name] = float(known.mean()) if len(known) else float("nan")
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
        cells += [f"{r['router']:.3f}"] + [f"{r[k]:.3f}" if np.isfinite(r[k]) else "-" for k in refs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
