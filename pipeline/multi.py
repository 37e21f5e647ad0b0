"""N-model routing on labeled prompts: the routed mean outcome, cost–quality sweeps and their AIQ.

Shared by the evaluate stage and the report. Masks: a router may only pick a model whose outcome on
the prompt was observed (argmax over the observed models), and a prompt with no observed model is left
out. Every router is then scored on the same prompts, and the oracle is the best observed outcome.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .metrics import aiq, choose, nondecreasing_hull

BUDGETS = (0.25, 0.5, 0.75, 1.0)  # cost budgets: fractions of the priciest model's cost


def pick(scores, mask=None, costs=None, lam: float = 0.0) -> np.ndarray:
    """Model per prompt: argmax over its observed models of score − λ·cost / max cost, ties to the
    cheaper model (to the first without costs); -1 where no model is observed."""
    s = np.asarray(scores, np.float64)
    seen = np.ones(s.shape, bool) if mask is None else np.asarray(mask, bool)
    c = np.ones(s.shape[1]) if costs is None else np.asarray(costs, np.float64)
    chosen = choose(np.where(seen, s, -np.inf), c, lam)
    return np.where(seen.any(1), chosen, -1)


def routed(scores, outcomes, mask=None, costs=None, lam: float = 0.0) -> tuple[float, float]:
    """(mean cost relative to the priciest model, mean outcome) of the picked models; NaN cost without costs."""
    y = np.asarray(outcomes, np.float64)
    j = pick(scores, mask, costs, lam)
    ok = j >= 0
    if not ok.any():
        return float("nan"), float("nan")
    quality = float(y[np.flatnonzero(ok), j[ok]].mean())
    if costs is None:
        return float("nan"), quality
    c = np.asarray(costs, np.float64)
    return float((c / c.max())[j[ok]].mean()), quality


def lambda_grid(p, costs, n: int = 120) -> np.ndarray:
    """λ from 0 (best predicted model) to the λ above which every prompt goes to the cheapest model."""
    p = np.asarray(p, np.float64)
    c = np.asarray(costs, np.float64) / np.max(costs)
    cheap = int(np.argmin(c))
    dearer = c > c[cheap]
    hi = float(np.max((p[:, dearer] - p[:, [cheap]]) / (c[dearer] - c[cheap]), initial=0.0)) if dearer.any() else 0.0
    if hi <= 0:
        return np.array([0.0])
    return np.unique(np.r_[0.0, np.geomspace(hi * 1e-3, hi * 1.001, n)])


def lambda_sweep(p, outcomes, mask, costs, n: int = 120) -> dict:
    """Operating points of argmax_j p_j − λ·cost_j over `lambda_grid`: {"lambda", "cost", "quality"}."""
    grid = lambda_grid(p, costs, n)
    points = np.array([routed(p, outcomes, mask, costs, lam) for lam in grid])
    return {"lambda": grid, "cost": points[:, 0], "quality": points[:, 1]}


def alpha_sweep(accuracy, outcomes, mask, costs, alphas: Sequence[float] = np.linspace(0.0, 1.0, 41)) -> dict:
    """Operating points of the cluster router's α·accuracy + (1 − α)·(1 − cost / max cost):
    {"alpha", "cost", "quality"}. The same argmax as accuracy − λ·cost with λ = (1 − α) / α."""
    a = np.asarray(accuracy, np.float64)
    points = np.array([routed(alpha * a, outcomes, mask, costs, 1.0 - alpha) for alpha in alphas])
    return {"alpha": np.asarray(alphas, np.float64), "cost": points[:, 0], "quality": points[:, 1]}


def frontier(cost, quality, cheapest: float, budgets: Sequence[float] = BUDGETS) -> dict:
    """Non-decreasing convex hull of (cost, quality) points (flat up to the priciest model's cost 1),
    AIQ over [cheapest, 1], and the best quality within each budget (None when none fits)."""
    c, q = np.asarray(cost, np.float64), np.asarray(quality, np.float64)
    keep = np.isfinite(c) & np.isfinite(q)
    c, q = c[keep], q[keep]
    hx, hy = nondecreasing_hull(c, q)
    if hx[-1] < 1.0:
        hx, hy = np.r_[hx, 1.0], np.r_[hy, hy[-1]]
    at = [float(q[c <= b + 1e-12].max()) if (c <= b + 1e-12).any() else None for b in budgets]
    return {"hull": np.stack([hx, hy], 1), "at_budget": at,
            "aiq": aiq(c, q, cost_range=(cheapest, 1.0)) if cheapest < 1.0 else float("nan")}
