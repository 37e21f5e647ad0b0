"""Routing metrics: RouteLLM quality curves (APGR, CPT), threshold and cost-λ calibration, RouterBench AIQ.

Numpy only: the torch-free runtime and the report import this module.

Conventions (they reproduce the numbers of `../shared/data/README.md`):
- A pair router gives one score per prompt, higher = "send to the strong model". The top fraction f of
  prompts by score goes to strong, the rest to weak. Prompts are ordered by a stable descending sort, so
  tied scores keep their input order (deterministic, no randomness in the metric).
- f·n is rounded to the nearest whole prompt (halves round up), in exact integer arithmetic so that,
  e.g., f = 0.1 with n = 2785 does not depend on floating-point error.
- The area under quality(f) is the trapezoid rule over `n_points` evenly spaced f in [0, 1] (101 by
  default), like RouteLLM's `np.trapz` over its routed fractions.
- Outcomes are per-prompt values in [0, 1] (correctness, normalised score or win rate); one row per
  unique prompt (duplicates averaged by the caller, as the README counts them).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from . import routing

DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_EPS = 1e-12


def _key(x: float) -> str:
    """'0.1', '0.25', '1': the JSON keys of fractions and budgets."""
    return f"{float(x):g}"


def _pair_arrays(scores, weak, strong) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    weak = np.asarray(weak, dtype=np.float64)
    strong = np.asarray(strong, dtype=np.float64)
    if scores.ndim != 1 or weak.shape != scores.shape or strong.shape != scores.shape:
        raise ValueError(f"scores, weak and strong must be 1-D of the same length, got shapes "
                         f"{scores.shape}, {weak.shape}, {strong.shape}")
    if scores.size == 0:
        raise ValueError("no prompts to evaluate")
    if not (np.isfinite(scores).all() and np.isfinite(weak).all() and np.isfinite(strong).all()):
        raise ValueError("scores and outcomes must be finite (no NaN / inf)")
    return scores, weak, strong


def _strong_counts(n: int, n_points: int) -> np.ndarray:
    """Prompts sent to strong at f = i/(n_points-1): round(f·n), halves up, exact integers."""
    if n_points < 2:
        raise ValueError(f"n_points must be at least 2, got {n_points}")
    i = np.arange(n_points, dtype=np.int64)
    return (2 * i * n + (n_points - 1)) // (2 * (n_points - 1))


def _gains(scores: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Cumulative quality gain (sum of strong − weak) after sending the top-k prompts, k = 0..n."""
    order = np.argsort(-scores, kind="stable")
    return np.concatenate([[0.0], np.cumsum((strong - weak)[order])])


def quality_curve(scores, weak, strong, n_points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(fractions, quality): mean outcome when the top fraction f of prompts by score goes to strong."""
    scores, weak, strong = _pair_arrays(scores, weak, strong)
    n = scores.size
    k = _strong_counts(n, n_points)
    quality = (weak.sum() + _gains(scores, weak, strong)[k]) / n
    return np.linspace(0.0, 1.0, n_points), quality


def apgr(scores, weak, strong, n_points: int = 101) -> float:
    """Average performance gap recovered: (AUC of quality(f) − weak) / (strong − weak).

    0.5 is a random router, 1.0 the straight line to strong; an oracle exceeds 1. NaN when the two
    models have the same mean quality (no gap to recover).
    """
    fractions, quality = quality_curve(scores, weak, strong, n_points)
    w, s = float(np.mean(weak)), float(np.mean(strong))
    if abs(s - w) < _EPS:
        return float("nan")
    return float((np.trapezoid(quality, fractions) - w) / (s - w))


def cpt(scores, weak, strong, x: float) -> float:
    """Call-performance threshold: smallest f = k/n whose quality reaches weak + x·(strong − weak).

    Evaluated at every whole number of strong calls (not only the 101-point grid); NaN if never reached
    (only possible for x > 1).
    """
    scores, weak, strong = _pair_arrays(scores, weak, strong)
    n = scores.size
    w, s = weak.mean(), strong.mean()
    quality = (weak.sum() + _gains(scores, weak, strong)) / n
    reached = np.flatnonzero(quality >= w + x * (s - w) - _EPS)
    return float(reached[0] / n) if reached.size else float("nan")


def strong_count(n: int, share: float) -> int:
    """Prompts sent to strong when a `share` of `n` goes there: round(share·n), halves up."""
    return int(np.floor(share * n + 0.5))


def sent_to_strong(scores, share: float) -> np.ndarray:
    """Boolean per prompt: among the top `share` by score (equal scores in input order)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.zeros(scores.size, bool)
    out[np.argsort(-scores, kind="stable")[:strong_count(scores.size, share)]] = True
    return out


def quality_at(scores, weak, strong, share: float) -> float:
    """Mean outcome when the top `share` of prompts by score go to strong (one point of `quality_curve`)."""
    scores, weak, strong = _pair_arrays(scores, weak, strong)
    return float((weak.sum() + _gains(scores, weak, strong)[strong_count(scores.size, share)]) / scores.size)


def routing_metrics(scores, weak, strong) -> dict:
    """APGR, CPT(50%), CPT(80%) and the weak / strong / oracle (best of the two per prompt) quality."""
    scores, weak, strong = _pair_arrays(scores, weak, strong)
    return {
        "apgr": apgr(scores, weak, strong),
        "cpt50": cpt(scores, weak, strong, 0.5),
        "cpt80": cpt(scores, weak, strong, 0.8),
        "weak_quality": float(weak.mean()),
        "strong_quality": float(strong.mean()),
        "oracle_quality": float(np.maximum(weak, strong).mean()),
        "n": int(scores.size),
    }


# ---- thresholds for a pair router -------------------------------------------------------------

def calibrate_thresholds(val_scores, fractions: Iterable[float] = DEFAULT_FRACTIONS) -> dict[str, float]:
    """Score thresholds so that "strong when score ≥ threshold" sends fraction f of validation prompts.

    RouteLLM's calibration: the (1 − f) quantile of the validation scores (linear interpolation).
    """
    val_scores = np.asarray(val_scores, dtype=np.float64).ravel()
    if val_scores.size == 0 or not np.isfinite(val_scores).all():
        raise ValueError("calibration needs at least one finite validation score")
    out = {}
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"strong fraction must be in [0, 1], got {f}")
        out[_key(f)] = float(np.quantile(val_scores, 1.0 - f))
    return out


def realised_fractions(scores, thresholds: Mapping[str, float]) -> dict[str, float]:
    """Fraction of `scores` actually sent to strong by each calibrated threshold (calibration drift)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    return {k: float(np.mean(scores >= t)) for k, t in thresholds.items()}


UNREACHABLE_TOLERANCE = 0.05  # a calibrated strong share realised further off than this is reported


def unreachable_fractions(realised: Mapping[str, float]) -> dict[str, float]:
    """router.json's `decision.unreachable_fractions`: the strong-share targets whose threshold realised a
    share further than UNREACHABLE_TOLERANCE from the target (tied scores send all or none of a tie), with
    what it realised."""
    return {k: round(v, 4) for k, v in realised.items() if abs(v - float(k)) > UNREACHABLE_TOLERANCE}


# ---- N models: argmax_j p_j − λ·cost_j ---------------------------------------------------------

def _normalised_costs(costs) -> np.ndarray:
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim != 1 or costs.size == 0 or not np.isfinite(costs).all() or (costs < 0).any():
        raise ValueError(f"costs must be a non-empty list of finite non-negative numbers, got {costs}")
    if costs.max() <= 0:
        raise ValueError("at least one model must have a positive cost")
    return costs / costs.max()


def choose(p, costs, lam: float) -> np.ndarray:
    """Index of the model picked per prompt: argmax_j p_j − λ·cost_j / max(cost).

    Costs are divided by the most expensive model's cost, so λ is in quality units per "one call of the
    most expensive model" and comparable across datasets. Ties go to the cheaper model.
    """
    p = np.asarray(p, dtype=np.float64)
    c = _normalised_costs(costs)
    if p.ndim != 2 or p.shape[1] != c.size:
        raise ValueError(f"p must be [n_prompts, {c.size}] to match costs, got shape {p.shape}")
    return routing.choose(p, c, lam)


def _mean_cost(p, c: np.ndarray, lam: float) -> float:
    return float(c[choose(p, c, lam)].mean())


def calibrate_lambdas(p_val, costs, budgets: Iterable[float] = DEFAULT_BUDGETS,
                      iters: int = 60) -> dict[str, float]:
    """For each budget (mean cost as a fraction of the most expensive model's cost), the smallest λ ≥ 0
    whose mean normalised cost on validation is ≤ the budget.

    The chosen model's cost never rises as λ grows, so a bisection on λ finds it. A budget below the
    cheapest model's cost cannot be met: it gets the λ that routes every prompt to the cheapest model.
    """
    p_val = np.asarray(p_val, dtype=np.float64)
    c = _normalised_costs(costs)
    if p_val.ndim != 2 or p_val.shape[1] != c.size or p_val.shape[0] == 0:
        raise ValueError(f"p_val must be [n_prompts > 0, {c.size}], got shape {p_val.shape}")
    # Above this λ no model beats the cheapest one on any prompt.
    cheap = int(np.argmin(c))
    dearer = c > c[cheap]
    hi = 0.0
    if dearer.any():
        hi = float(np.max((p_val[:, dearer] - p_val[:, [cheap]]) / (c[dearer] - c[cheap]), initial=0.0))
    hi = hi * (1 + 1e-9) + 1e-12
    out = {}
    for b in budgets:
        if _mean_cost(p_val, c, 0.0) <= b + _EPS:
            out[_key(b)] = 0.0
            continue
        lo, up = 0.0, hi
        if _mean_cost(p_val, c, up) > b + _EPS:  # unreachable budget
            out[_key(b)] = up
            continue
        for _ in range(iters):
            mid = 0.5 * (lo + up)
            if _mean_cost(p_val, c, mid) <= b + _EPS:
                up = mid
            else:
                lo = mid
        out[_key(b)] = up
    return out


def _route(p, outcomes, mask, costs, lam: float) -> dict:
    """Quality and cost of routing with one λ; prompts whose chosen model is unobserved are left out."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    mask = np.ones(outcomes.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if outcomes.shape != np.shape(p) or mask.shape != outcomes.shape:
        raise ValueError(f"p, outcomes and mask must have the same shape, got {np.shape(p)}, "
                         f"{outcomes.shape}, {mask.shape}")
    c = _normalised_costs(costs)
    pick = choose(p, costs, lam)
    rows = np.arange(len(pick))
    seen = mask[rows, pick]
    quality = float(outcomes[rows, pick][seen].mean()) if seen.any() else float("nan")
    return {"lambda": float(lam), "cost": float(c[pick].mean()), "quality": quality,
            "coverage": float(seen.mean())}


def cost_quality_points(p, outcomes, mask, costs, lambdas: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """(cost, quality) per λ: mean normalised cost of the picked models and their mean observed outcome."""
    points = [_route(p, outcomes, mask, costs, lam) for lam in lambdas]
    return (np.array([pt["cost"] for pt in points]), np.array([pt["quality"] for pt in points]))


def quality_at_budgets(p, outcomes, mask, costs, lambdas: Mapping[str, float]) -> dict[str, dict]:
    """For each calibrated budget: λ, realised mean normalised cost, quality and observed coverage."""
    return {key: _route(p, outcomes, mask, costs, lam) for key, lam in lambdas.items()}


def nondecreasing_hull(costs: np.ndarray, qualities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the non-decreasing upper convex hull of the points, by increasing cost."""
    order = np.lexsort((-qualities, costs))  # by cost, best quality first among equal costs
    xs, ys = [], []
    for x, y in zip(costs[order], qualities[order]):
        if ys and y <= ys[-1]:
            continue  # dominated: costs at least as much for no better quality
        # pop vertices that lie on or below the segment to the new point (keeps the hull concave)
        while len(xs) >= 2 and (xs[-1] - xs[-2]) * (y - ys[-2]) - (ys[-1] - ys[-2]) * (x - xs[-2]) >= 0:
            xs.pop(), ys.pop()
        xs.append(float(x)), ys.append(float(y))
    return np.array(xs), np.array(ys)


def aiq(costs, qualities, cost_range: Sequence[float] | None = None) -> float:
    """RouterBench AIQ: area under the non-decreasing convex hull of the (cost, quality) points,
    divided by the width of the cost range.

    The hull is what a router can reach by mixing its operating points (any point on a segment between
    two is reachable by randomising between them), with dominated points dropped; beyond its most
    expensive vertex it stays flat (spending more never has to lower quality). `cost_range` defaults to
    the points' own [min cost, max cost]; it must not start below the cheapest point (unreachable).
    """
    costs = np.asarray(costs, dtype=np.float64).ravel()
    qualities = np.asarray(qualities, dtype=np.float64).ravel()
    if costs.shape != qualities.shape:
        raise ValueError(f"costs and qualities differ in length: {costs.size} vs {qualities.size}")
    keep = np.isfinite(costs) & np.isfinite(qualities)  # NaN quality: a λ that routed nothing observed
    costs, qualities = costs[keep], qualities[keep]
    if costs.size == 0:
        raise ValueError("aiq needs at least one finite (cost, quality) point")
    lo, hi = (costs.min(), costs.max()) if cost_range is None else map(float, cost_range)
    if hi <= lo:
        return float("nan")
    if lo < costs.min() - _EPS:
        raise ValueError(f"cost range starts at {lo}, below the cheapest point {costs.min()}")
    hx, hy = nondecreasing_hull(costs, qualities)
    grid = np.unique(np.concatenate([[lo, hi], hx[(hx > lo) & (hx < hi)]]))
    return float(np.trapezoid(np.interp(grid, hx, hy), grid) / (hi - lo))


# ---- pairwise battles --------------------------------------------------------------------------

def opponent_adjusted_strengths(win_logits: np.ndarray, battle_counts: np.ndarray) -> np.ndarray:
    """Per-prompt strengths [n, m] on one scale from per-model win-rate logits [n, m].

    A model's win rate is measured against the opponents it met: under Bradley-Terry, to first order,
    logit p_j = s_j - sum_k W_jk s_k, with W_jk the share of j's battles fought against k
    (`battle_counts`, symmetric [m, m]). Solving (I - W) s = logit p (least squares, minimum norm)
    puts every model on the same scale. In a round robin W is uniform and s is logit p minus its mean:
    the same order as comparing win rates directly. Against a single reference model (AlpacaEval) it
    is not: a model that beats the reference 55% of the time ranks above it, though the reference wins
    89% of its battles against the field."""
    c = np.asarray(battle_counts, dtype=np.float64)
    w = c / np.maximum(c.sum(1, keepdims=True), 1.0)
    return np.asarray(win_logits, dtype=np.float64) @ np.linalg.pinv(np.eye(len(c)) - w).T


def win_accuracy(p_a_wins, outcomes, ties: str = "exclude") -> float:
    """Accuracy of predicting each battle's winner: model a when P(a wins) > 0.5.

    `outcomes` is score_a (1 = a won, 0.5 tie, 0 = b won). Ties are left out (`ties="exclude"`) or
    earn half a point whatever the prediction (`ties="half"`). A prediction of exactly 0.5 earns half.
    """
    p = np.asarray(p_a_wins, dtype=np.float64).ravel()
    y = np.asarray(outcomes, dtype=np.float64).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"p_a_wins and outcomes must be non-empty and of equal length, got {p.size}, {y.size}")
    if ties not in ("exclude", "half"):
        raise ValueError(f"ties must be 'exclude' or 'half', got {ties!r}")
    decided = y != 0.5
    credit = np.where(p == 0.5, 0.5, ((p > 0.5) == (y > 0.5)).astype(np.float64))
    credit = np.where(decided, credit, 0.5)
    if ties == "exclude":
        credit = credit[decided]
    return float(credit.mean()) if credit.size else float("nan")
