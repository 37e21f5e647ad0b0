"""N-model routing: masked argmax, routed outcome, λ and α sweeps, their hull and AIQ."""
import numpy as np
import pytest

from pipeline.multi import alpha_sweep, frontier, lambda_grid, lambda_sweep, pick, routed

Y = np.array([[1.0, 0.0, 1.0],
              [0.0, 1.0, 0.0],
              [0.0, 0.0, 1.0],
              [1.0, 1.0, 1.0]])
COSTS = np.array([1.0, 2.0, 4.0])


def test_pick_skips_unobserved_models_and_prefers_the_cheaper_on_ties():
    scores = np.array([[0.2, 0.9, 0.5], [0.5, 0.5, 0.5], [0.1, 0.2, 0.3], [0.9, 0.1, 0.1]])
    mask = np.array([[True, False, True], [True, True, True], [False, False, False], [True, True, True]])
    np.testing.assert_array_equal(pick(scores, mask, COSTS), [2, 0, -1, 0])
    np.testing.assert_array_equal(pick(scores), [1, 0, 2, 0])  # no costs: the first of tied models
    np.testing.assert_array_equal(pick(scores, None, COSTS, lam=10.0), [0, 0, 0, 0])


def test_routed_scores_observed_picks_only():
    mask = np.ones(Y.shape, bool)
    mask[2, 2] = False
    cost, quality = routed(Y, Y, mask, COSTS)  # the oracle: the best observed outcome, cheapest first
    assert quality == pytest.approx(np.mean([1, 1, 0, 1]))
    assert cost == pytest.approx(np.mean([0.25, 0.5, 0.25, 0.25]))
    assert np.isnan(routed(Y, Y)[0]) and routed(Y, Y)[1] == 1.0
    assert np.isnan(routed(Y, Y, np.zeros(Y.shape, bool))[1])


def test_lambda_and_alpha_sweeps_run_from_best_to_cheapest():
    p = np.array([[0.6, 0.5, 0.9], [0.2, 0.7, 0.3], [0.1, 0.2, 0.8], [0.9, 0.8, 0.95]])
    lam = lambda_sweep(p, Y, None, COSTS)
    assert lam["lambda"][0] == 0 and len(lam["lambda"]) == len(lam["cost"]) == len(lam["quality"])
    assert lam["cost"][-1] == pytest.approx(0.25)  # all to the cheapest model at the top of the grid
    assert np.all(np.diff(lam["cost"]) <= 1e-12)  # cost never rises with λ
    assert lambda_grid(np.zeros((2, 3)), COSTS).tolist() == [0.0]
    alpha = alpha_sweep(p, Y, None, COSTS, alphas=[0.0, 1.0])
    assert alpha["cost"][0] == pytest.approx(0.25)  # α = 0: cost alone
    assert alpha["quality"][1] == pytest.approx(routed(p, Y)[1])  # α = 1: accuracy alone


def test_frontier_extends_the_hull_to_the_priciest_cost():
    f = frontier([0.25, 0.5, 0.4], [0.5, 0.8, np.nan], cheapest=0.25, budgets=(0.2, 0.5, 1.0))
    np.testing.assert_allclose(f["hull"], [[0.25, 0.5], [0.5, 0.8], [1.0, 0.8]])
    assert f["at_budget"] == [None, 0.8, 0.8]
    assert f["aiq"] == pytest.approx((0.25 * 0.65 + 0.5 * 0.8) / 0.75)
