"""Router vs cascade vs ensemble: the quality, cost and latency each serving strategy would get.

From per-prompt per-model outcomes in [0, 1] and a model profile (time to first token, decoding
speed, typical output length, price; `configs/profile.yaml`), each strategy is simulated prompt by
prompt on the same random draws of output lengths (one factor per prompt, shared by every model), so
their differences are not sampling noise:

- router: the bundle's measured decision latency + one generation by the model it picked;
- cascade: the cheapest model answers first; an LLM judge that is right with probability
  `accuracy` decides whether the answer is good enough or the next model must answer, serially;
  every generation and every judge call is paid for and waited for;
- ensemble: every model answers in parallel (latency of the slowest), then a judge merges; its
  quality is that of the judge's pick, and of the best answer as an upper bound; it pays for all.

Cascade and ensemble run over a "ladder": the models sorted by cost, keeping each one only when it
is better on average than every cheaper one (escalating to a worse or equally priced model is
never useful).
Numpy only, so it runs anywhere the report runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml

from .common import ConfigError, DataError

DEFAULT_PROFILE = Path(__file__).parent / "configs" / "profile.yaml"
FIELDS = ("ttft_s", "tokens_per_s", "output_tokens", "price_per_1k")


@dataclass(frozen=True)
class Judge:
    """An LLM judge: right with probability `accuracy`; `latency_ms` and `cost` (USD) per call."""

    accuracy: float = 0.85
    latency_ms: float = 300.0
    cost: float = 0.0002
    pass_threshold: float = 0.5  # an outcome at or above it is a good answer

    def __post_init__(self):
        if not 0.0 <= self.accuracy <= 1.0:
            raise ConfigError(f"judge accuracy must be in [0, 1], got {self.accuracy}")
        if self.latency_ms < 0 or self.cost < 0:
            raise ConfigError("judge latency_ms and cost must be >= 0")


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------


def _check_entry(where: str, entry, *, partial: bool) -> dict:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"profile {where}: must be a mapping of {', '.join(FIELDS)}")
    unknown = set(entry) - set(FIELDS)
    if unknown:
        raise ConfigError(f"profile {where}: unknown keys {sorted(unknown)} (allowed: {', '.join(FIELDS)})")
    if not partial and set(FIELDS) - set(entry):
        raise ConfigError(f"profile {where}: missing {sorted(set(FIELDS) - set(entry))}")
    out = {}
    for k, v in entry.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"profile {where}.{k}: must be a number, got {v!r}")
        if v < 0 or (k in ("tokens_per_s", "output_tokens") and v <= 0):
            raise ConfigError(f"profile {where}.{k}: must be positive, got {v}")
        out[k] = float(v)
    return out


def load_profile(profile: str | Path | Mapping | None = None) -> dict:
    """The packaged profile, with a YAML file (or dict) merged over it and validated.

    Model entries may be partial: missing fields come from the cost-rank default of that model.
    """
    base = yaml.safe_load(DEFAULT_PROFILE.read_text())
    user: Mapping = {}
    if isinstance(profile, Mapping):
        user = profile
    elif profile is not None:
        path = Path(profile)
        if not path.is_file():
            raise ConfigError(f"profile file not found: {path}")
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(user, Mapping):
            raise ConfigError(f"{path}: top level must be a mapping")
    unknown = set(user) - {"output_tokens_sigma", "defaults", "models", "judge"}
    if unknown:
        raise ConfigError(f"profile: unknown keys {sorted(unknown)}")

    sigma = user.get("output_tokens_sigma", base["output_tokens_sigma"])
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma < 0:
        raise ConfigError(f"profile output_tokens_sigma: must be a number >= 0, got {sigma!r}")
    defaults = {}
    for anchor in ("cheapest", "priciest"):
        entry = {**base["defaults"][anchor], **(user.get("defaults") or {}).get(anchor, {})}
        defaults[anchor] = _check_entry(f"defaults.{anchor}", entry, partial=False)
        if min(defaults[anchor].values()) <= 0:  # geometric interpolation needs positive anchors
            raise ConfigError(f"profile defaults.{anchor}: every field must be > 0")
    models = {name: _check_entry(f"models.{name}", e, partial=True)
              for name, e in {**base["models"], **(user.get("models") or {})}.items()}
    judge_d = {**base["judge"], **(user.get("judge") or {})}
    try:
        judge = Judge(**{k: float(v) for k, v in judge_d.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"profile judge: {e}") from None
    return {"output_tokens_sigma": float(sigma), "defaults": defaults, "models": models, "judge": asdict(judge)}


def _cost_rank(costs: Sequence[float | None]) -> np.ndarray:
    """Each model's cost rank scaled to [0, 1] (ties share the average rank; unknown costs 0.5)."""
    c = np.array([np.nan if x is None else float(x) for x in costs])
    rank = np.full(len(c), 0.5)
    ok = np.isfinite(c)
    if ok.sum() >= 2:
        v = c[ok]
        r = np.array([(v < x).sum() + ((v == x).sum() - 1) / 2 for x in v])
        rank[ok] = r / (len(v) - 1)
    return rank


def model_profiles(models: Sequence[str], costs: Sequence[float | None], profile: Mapping) -> dict[str, np.ndarray]:
    """Per-model arrays of ttft_s, tokens_per_s, output_tokens, price_per_1k.

    A model missing from `profile["models"]` (or a field missing from its entry) gets the value
    interpolated geometrically between `defaults.cheapest` and `defaults.priciest` at its cost rank.
    """
    lo, hi = profile["defaults"]["cheapest"], profile["defaults"]["priciest"]
    rows = []
    for name, r in zip(models, _cost_rank(costs)):
        default = {f: lo[f] ** (1 - r) * hi[f] ** r for f in FIELDS}
        rows.append({**default, **profile["models"].get(name, {})})
    return {f: np.array([row[f] for row in rows], dtype=float) for f in FIELDS}


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------


def _summary(kind: str, quality: np.ndarray, cost: np.ndarray, latency_s: np.ndarray, calls: np.ndarray) -> dict:
    return {"kind": kind, "quality": float(quality.mean()), "cost": float(cost.mean()),
            "p50_s": float(np.percentile(latency_s, 50)), "p95_s": float(np.percentile(latency_s, 95)),
            "calls": float(calls.mean()), "latency_s": latency_s}


def default_ladder(outcomes: np.ndarray, mean_cost: np.ndarray) -> list[int]:
    """Models by expected cost, each kept only when better on average than every cheaper one.

    Among equally priced models only the best is kept: escalating at the same price buys nothing
    the best of them would not give at once.
    """
    quality = outcomes.mean(0)
    ladder, best = [], -np.inf
    for j in sorted(range(len(mean_cost)), key=lambda j: (mean_cost[j], -quality[j])):
        if quality[j] > best:
            ladder.append(j)
            best = quality[j]
    return ladder


def _router(o, gen_cost, gen_s, choices, decision_ms) -> dict:
    rows = np.arange(len(o))
    choices = np.asarray(choices, dtype=int)
    return _summary("router", o[rows, choices], gen_cost[rows, choices],
                    decision_ms / 1000.0 + gen_s[rows, choices], np.ones(len(o)))


def _cascade(o, gen_cost, gen_s, ladder, judge: Judge, rng) -> dict:
    n = len(o)
    good = o >= judge.pass_threshold
    done = np.zeros(n, bool)
    quality, cost, latency, calls = (np.zeros(n) for _ in range(4))
    for step, j in enumerate(ladder):
        active = ~done
        cost[active] += gen_cost[active, j]
        latency[active] += gen_s[active, j]
        calls[active] += 1
        if step == len(ladder) - 1:  # the last model's answer is final: no judge call
            quality[active] = o[active, j]
            break
        right = rng.random(n) < judge.accuracy  # drawn for every row so the stream does not depend on `done`
        accept = np.where(right, good[:, j], ~good[:, j])
        cost[active] += judge.cost
        latency[active] += judge.latency_ms / 1000.0
        stop = active & accept
        quality[stop] = o[stop, j]
        done |= stop
    return _summary("cascade", quality, cost, latency, calls)


def _ensemble(o, gen_cost, gen_s, ladder, judge: Judge, rng) -> tuple[dict, dict]:
    n, rows = len(o), np.arange(len(o))
    sub = o[:, ladder]
    merge = len(ladder) > 1  # a single model needs no merge step
    latency = gen_s[:, ladder].max(1) + merge * judge.latency_ms / 1000.0
    cost = gen_cost[:, ladder].sum(1) + merge * judge.cost
    calls = np.full(n, float(len(ladder)))
    best = sub.max(1)
    # The judge picks a best answer with probability `accuracy`, otherwise a random worse one.
    right = rng.random(n) < judge.accuracy
    worse = sub < best[:, None]
    keys = np.where(worse, rng.random(sub.shape), -1.0)
    wrong = np.where(worse.any(1), sub[rows, keys.argmax(1)], best)
    picked = np.where(right, best, wrong)
    return (_summary("ensemble", picked, cost, latency, calls),
            _summary("ensemble-upper", best, cost, latency, calls))


def _match_quality(curve: list[dict], target: float) -> dict:
    """The cheapest router point reaching `target` quality (else the best it has)."""
    reach = [p for p in curve if p["quality"] >= target - 1e-12]
    if reach:
        return {**min(reach, key=lambda p: (p["cost"], -p["quality"])), "reached": True}
    return {**max(curve, key=lambda p: (p["quality"], -p["cost"])), "reached": False}


def _match_cost(curve: list[dict], budget: float) -> dict:
    """The best router point costing at most `budget` (else the cheapest it has)."""
    within = [p for p in curve if p["cost"] <= budget * (1 + 1e-9)]
    if within:
        return {**max(within, key=lambda p: (p["quality"], -p["cost"])), "reached": True}
    return {**min(curve, key=lambda p: (p["cost"], -p["quality"])), "reached": False}


def simulate(outcomes, mask=None, costs: Sequence[float | None] | None = None, profile=None, *,
             models: Sequence[str] | None = None, router_choices=None,
             router_curve: Mapping[float, Sequence[int]] | None = None, knob: str = "strong fraction",
             decision_ms: float = 0.0, judge: Judge | None = None, ladder: Sequence[int] | None = None,
             seed: int = 0) -> dict:
    """Simulate router, cascade and ensemble on the prompts where every model is observed.

    outcomes, mask: [n, m]; costs: [m] (only ranks models missing from the profile); profile: a
    path, dict or None (packaged); router_choices: [n] model index per prompt (the default operating
    point); router_curve: {knob value: choices [n]}, the router's operating points (strong fraction
    or λ), from which the points matching the cascade's and the ensemble's quality and cost are
    picked; judge: overrides the profile's. Costs are USD per prompt, latencies seconds.
    """
    o = np.asarray(outcomes, dtype=float)
    if o.ndim != 2 or o.shape[1] < 1:
        raise DataError(f"outcomes must be [n_prompts, n_models], got shape {o.shape}")
    n_all, m = o.shape
    mask = np.ones_like(o, bool) if mask is None else np.asarray(mask, bool)
    models = list(models) if models is not None else [f"model{j}" for j in range(m)]
    costs = list(costs) if costs is not None else [None] * m
    if mask.shape != o.shape or len(models) != m or len(costs) != m:
        raise DataError(f"mask {mask.shape}, models ({len(models)}) and costs ({len(costs)}) must match outcomes {o.shape}")
    if router_choices is None and not router_curve:
        raise DataError("simulate needs router_choices or router_curve")
    keep = mask.all(1) & np.isfinite(o).all(1)
    if not keep.any():
        raise DataError("no prompt has an observed outcome for every model; nothing to simulate")
    o = o[keep]
    n = len(o)
    prof = load_profile(profile)
    judge = judge or Judge(**prof["judge"])
    per = model_profiles(models, costs, prof)

    rng_tokens, rng_cascade, rng_ensemble = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    sigma = prof["output_tokens_sigma"]
    # Log-normal output lengths with mean = each model's typical length, from one factor per prompt shared by
    # every model and strategy: a prompt that asks for a long answer gets one from each model, and models with
    # the same profile cost the same on every prompt (a strategy's cost is not which models' draws it hit).
    tokens = per["output_tokens"] * np.exp(sigma * rng_tokens.standard_normal((n, 1)) - sigma ** 2 / 2)
    gen_s = per["ttft_s"] + tokens / per["tokens_per_s"]
    gen_cost = tokens * per["price_per_1k"] / 1000.0
    # Expected (not sampled) cost orders the ladder, so equally priced models tie exactly.
    ladder = list(ladder) if ladder is not None else default_ladder(o, per["output_tokens"] * per["price_per_1k"])

    strategies: dict[str, dict] = {}
    for j in ladder:
        strategies[f"always {models[j]}"] = _router(o, gen_cost, gen_s, np.full(n, j), 0.0) | {"kind": "single"}
    curve = []
    for value, choices in (router_curve or {}).items():
        choices = np.asarray(choices, dtype=int)[keep]
        curve.append({"knob": float(value), **_router(o, gen_cost, gen_s, choices, decision_ms)})
    if router_choices is not None:
        strategies["router"] = _router(o, gen_cost, gen_s, np.asarray(router_choices, dtype=int)[keep], decision_ms)
    strategies[f"cascade (judge acc {judge.accuracy:.2f})"] = _cascade(o, gen_cost, gen_s, ladder, judge, rng_cascade)
    pick, upper = _ensemble(o, gen_cost, gen_s, ladder, judge, rng_ensemble)
    strategies["ensemble (judge pick)"] = pick
    strategies["ensemble (best-of, upper bound)"] = upper

    matched = {}
    if curve:
        for name, s in strategies.items():
            if s["kind"] in ("cascade", "ensemble"):
                tag = {"kind": "matched", "target": name}
                matched[f"router @ {s['kind']} quality"] = _match_quality(curve, s["quality"]) | tag
                matched[f"router @ {s['kind']} cost"] = _match_cost(curve, s["cost"]) | tag
    return {"n": n, "n_dropped": int(n_all - n), "models": models, "ladder": [models[j] for j in ladder],
            "decision_ms": float(decision_ms), "judge": asdict(judge), "knob": knob, "seed": seed,
            "profile": {name: {f: float(per[f][j]) for f in FIELDS} for j, name in enumerate(models)},
            "strategies": strategies, "curve": curve, "matched": matched}


# ---------------------------------------------------------------------------------------------
# Table and figure
# ---------------------------------------------------------------------------------------------


def economics_rows(result: dict) -> list[dict]:
    """One row per strategy (singles, router, matched router points, cascade, ensemble), no arrays."""
    rows = []
    for name, s in list(result["strategies"].items()) + list(result["matched"].items()):
        note = ""
        if s["kind"] == "matched":
            note = f"{result['knob']} = {s['knob']:.3g}" + ("" if s["reached"] else " (target not reached)")
        elif s["kind"] == "ensemble-upper":
            note = "best answer always picked"
        rows.append({"strategy": name, "kind": s["kind"], "quality": s["quality"], "cost": s["cost"],
                     "p50_s": s["p50_s"], "p95_s": s["p95_s"], "calls": s["calls"], "note": note})
    order = {"single": 0, "router": 1, "matched": 2, "cascade": 3, "ensemble": 4, "ensemble-upper": 5}
    return sorted(rows, key=lambda r: order[r["kind"]])


def economics_table(result: dict) -> str:
    """Markdown table: quality, USD per 1,000 prompts, p50/p95 latency and generations per prompt."""
    lines = ["| strategy | quality | USD / 1k prompts | p50 latency (s) | p95 latency (s) | generations / prompt | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in economics_rows(result):
        lines.append(f"| {r['strategy']} | {r['quality']:.3f} | {1000 * r['cost']:.2f} | {r['p50_s']:.2f} "
                     f"| {r['p95_s']:.2f} | {r['calls']:.2f} | {r['note']} |")
    return "\n".join(lines)


_STYLE = {"router": ("*", "tab:blue"), "cascade": ("o", "tab:orange"), "ensemble": ("^", "tab:red"),
          "ensemble-upper": ("v", "tab:purple")}
_SINGLE_COLORS = ["0.35", "tab:brown", "tab:olive", "tab:pink", "tab:green", "0.6"]


def _colors(result: dict) -> dict[str, str]:
    out, singles = {}, 0
    for name, s in result["strategies"].items():
        if s["kind"] == "single":
            out[name] = _SINGLE_COLORS[singles % len(_SINGLE_COLORS)]
            singles += 1
        else:
            out[name] = _STYLE[s["kind"]][1]
    return out


def _annotate_latency(ax, strategies: dict) -> None:
    """p50 latency beside each strategy's point; labels that would overlap are stacked downwards, and
    strategies at the same point with the same p50 (a ladder of one model: cascade = ensemble = it) get one."""
    ax.margins(x=0.08, y=0.12)  # room for markers and labels at the edges of a narrow range
    ax.figure.canvas.draw()  # fixes the limits, so data -> pixel positions are final
    placed: list[tuple[float, float]] = []
    said: set[tuple[int, int, str]] = set()
    for s in strategies.values():
        x, y = 1000 * s["cost"], s["quality"]
        px, py = ax.transData.transform((x, y))
        text = f"p50 {s['p50_s']:.1f}s"
        if (round(px), round(py), text) in said:
            continue
        said.add((round(px), round(py), text))
        dy = -12
        while any(abs(px - qx) < 45 and abs(py + dy * 1.3 - qy) < 11 for qx, qy in placed):
            dy -= 10  # 1 point of offset is ~1.3 px at 130 dpi
        placed.append((px, py + dy * 1.3))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(7, dy), fontsize=7.5,
                    color="0.25")


def plot_economics(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Left: cost vs quality (router curve, every strategy, p50 latency annotated); right: latency ECDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(result)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 6.4), dpi=130)
    if result["curve"]:
        pts = sorted(result["curve"], key=lambda p: p["cost"])
        ax.plot([1000 * p["cost"] for p in pts], [p["quality"] for p in pts], "-", color="tab:blue", alpha=0.5,
                lw=1.5, label=f"router, {result['knob']} sweep")
    for name, s in result["strategies"].items():
        marker = "s" if s["kind"] == "single" else _STYLE[s["kind"]][0]
        x, y = 1000 * s["cost"], s["quality"]
        ax.scatter([x], [y], marker=marker, color=colors[name], s=110 if s["kind"] == "router" else 60,
                   zorder=6 if s["kind"] == "router" else 3,
                   edgecolor="black", linewidth=0.5, label=name)
    # Matched router points: hollow, in the colour of the strategy they are matched to, joined to it.
    for name, s in result["matched"].items():
        target = s["target"]
        t = result["strategies"][target]
        by_quality = name.endswith("quality")
        x, y = 1000 * s["cost"], s["quality"]
        ax.scatter([x], [y], marker="D" if by_quality else "X", facecolor="white", edgecolor=colors[target],
                   linewidth=1.6, s=60, zorder=4, label=name)
        ax.plot([1000 * t["cost"], x], [t["quality"], y], ":", color=colors[target], lw=1.0, zorder=2)
    costs = [1000 * s["cost"] for s in result["strategies"].values()]
    if min(costs) > 0 and max(costs) / min(costs) > 20:
        ax.set_xscale("log")
    _annotate_latency(ax, result["strategies"])
    ax.set_xlabel("cost (USD per 1,000 prompts" + (", log scale)" if ax.get_xscale() == "log" else ")"))
    ax.set_ylabel("quality (mean outcome)")
    ax.set_title("Cost vs quality (p50 latency annotated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)

    for name, s in result["strategies"].items():
        if s["kind"] == "ensemble-upper":  # same latencies as the judge-picked ensemble
            continue
        lat = np.sort(s["latency_s"])
        ls = "--" if s["kind"] == "single" else "-"
        bx.plot(lat, np.arange(1, len(lat) + 1) / len(lat), ls, lw=1.6, color=colors[name],
                label=f"{name} (p50 {s['p50_s']:.1f}s, p95 {s['p95_s']:.1f}s)")
        bx.axvline(s["p95_s"], color=colors[name], lw=0.8, ls=":", alpha=0.8)
    bx.set_xscale("log")
    bx.set_xlabel("end-to-end latency per prompt (s, log scale)")
    bx.set_ylabel("share of prompts answered within")
    bx.set_title("Latency distribution (ECDF; dotted lines: p95)")
    bx.grid(alpha=0.3, which="both")
    bx.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    fig.suptitle(title or f"Router vs cascade vs ensemble, simulated on {result['n']} prompts "
                 f"(decision {result['decision_ms']:.2f} ms, judge accuracy {result['judge']['accuracy']:.2f})",
                 fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
