"""The routing math, in one place: what the runtime serves, calibration fits and the reports measure.

numpy only (no other import), so the torch-free runtime, training, export, evaluation and the reports
all compute the same numbers. docs/contracts.md §2 states these rules for other languages.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

PAIR_SCORE = "(1 + p_strong - p_weak) / 2"  # router.json's decision.score, the formula of `pair_score`
WIN_PROBABILITY = "sigmoid(logit_a - logit_b)"  # router.json's decision.win_probability (pairwise data)


def sigmoid(x) -> np.ndarray:
    """1 / (1 + exp(-x)) in float64 (logits are float32; probabilities are compared in float64)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def logit(p, eps: float = 1e-6) -> np.ndarray:
    """log(p / (1 − p)) in float64, p clipped to [eps, 1 − eps]: logits (Bradley–Terry strengths on pairwise
    data) read back from probabilities."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def pair_score(p, weak: int, strong: int) -> np.ndarray:
    """Pair routing score (1 + p_strong − p_weak) / 2 over the last axis of probabilities `p`, in [0, 1]:
    the expected quality gain of the strong model mapped to [0, 1]; higher means strong is needed."""
    p = np.asarray(p, dtype=np.float64)
    return (1.0 + p[..., strong] - p[..., weak]) / 2.0


def fill_unknown_costs(costs: Sequence[float | None]) -> np.ndarray:
    """Costs in model index order, a missing (None) cost counting as index + 1 (what calibration assumes)."""
    return np.array([c if c is not None else i + 1.0 for i, c in enumerate(costs)], dtype=np.float64)


def model_costs(models: Sequence[dict]) -> np.ndarray:
    """router.json `models` → costs in index order, unknown = index + 1 (`fill_unknown_costs`)."""
    return fill_unknown_costs([m.get("cost") for m in sorted(models, key=lambda m: m["index"])])


def relative_costs(costs) -> np.ndarray:
    """Costs divided by the largest (all zeros when no cost is positive)."""
    costs = np.asarray(costs, dtype=np.float64)
    return costs / costs.max() if costs.size and costs.max() > 0 else np.zeros_like(costs)


def choose(p, rel_cost, lam: float) -> np.ndarray:
    """argmax_j p_j − λ·rel_cost_j over the last axis; exact ties go to the cheaper model (among equal
    costs, to the lower index)."""
    p, rel_cost = np.asarray(p, dtype=np.float64), np.asarray(rel_cost, dtype=np.float64)
    by_cost = np.argsort(rel_cost, kind="stable")  # argmax keeps the first maximum: the cheapest one
    return by_cost[np.argmax(p[..., by_cost] - lam * rel_cost[by_cost], axis=-1)]


def threshold_curve(thresholds: dict) -> list[tuple[float, float]]:
    """router.json's `decision.thresholds` ({strong fraction: threshold}) as sorted (fraction, threshold)
    points from "never strong" (0, 1.0) to "always strong" (1, 0.0); calibrated keys at 0 or 1 are
    replaced by those anchors."""
    cal = sorted((float(k), float(v)) for k, v in (thresholds or {}).items())
    return [(0.0, 1.0), *[c for c in cal if 0.0 < c[0] < 1.0], (1.0, 0.0)]


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear y(x) through sorted (x, y) points, clamped at both ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def threshold_for(curve: Sequence[tuple[float, float]], strong_fraction: float) -> float:
    """The pair threshold for a strong-call fraction: +inf at f ≤ 0 (never strong), −inf at f ≥ 1 (always
    strong), else `interpolate` on `threshold_curve`."""
    if strong_fraction <= 0.0:
        return float("inf")
    if strong_fraction >= 1.0:
        return float("-inf")
    return interpolate(curve, strong_fraction)


def default_cost_weight(decision: dict) -> float:
    """N models: λ from `default_cost_weight`, else the calibrated λ of the budget nearest 0.5, else 0."""
    if "default_cost_weight" in decision:
        return float(decision["default_cost_weight"])
    lambdas = {float(k): float(v) for k, v in (decision.get("cost_lambdas") or {}).items()}
    return lambdas[min(lambdas, key=lambda b: abs(b - 0.5))] if lambdas else 0.0
