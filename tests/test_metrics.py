import math

import numpy as np
import pytest

from pipeline.metrics import (aiq, apgr, calibrate_lambdas, calibrate_thresholds, choose, cost_quality_points,
                              cpt, opponent_adjusted_strengths, quality_at_budgets, quality_curve,
                              realised_fractions, routing_metrics, win_accuracy)


def planted_pair(n=100, n_gain=20):
    """Weak always wrong; strong right on the first n_gain prompts only."""
    weak = np.zeros(n)
    strong = np.zeros(n)
    strong[:n_gain] = 1.0
    return weak, strong


def test_quality_curve_by_hand():
    weak = np.array([0, 1, 0, 1.0])
    strong = np.array([1, 1, 1, 0.0])
    fractions, quality = quality_curve(strong - weak, weak, strong, n_points=5)
    np.testing.assert_allclose(fractions, [0, 0.25, 0.5, 0.75, 1])
    # order by score (stable): prompts 0, 2 (gain 1 each), 1 (no change), 3 (loses 1)
    np.testing.assert_allclose(quality, [0.5, 0.75, 1.0, 1.0, 0.75])


def test_fraction_rounding_halves_go_up():
    weak, strong = np.zeros(3), np.ones(3)
    _, quality = quality_curve(np.arange(3.0), weak, strong, n_points=3)
    # f = 0.5 of 3 prompts = 1.5 → 2 prompts to strong
    np.testing.assert_allclose(quality, [0, 2 / 3, 1])


def test_perfect_and_reversed_router():
    weak, strong = planted_pair()
    perfect = np.linspace(1, 0, 100)  # the 20 gain prompts score highest
    # quality(f) = min(f, 0.2): area 0.02 + 0.16 = 0.18 over a gap of 0.2
    assert apgr(perfect, weak, strong) == pytest.approx(0.9)
    assert cpt(perfect, weak, strong, 0.5) == pytest.approx(0.1)
    assert cpt(perfect, weak, strong, 0.8) == pytest.approx(0.16)
    # reversed: quality(f) = max(0, f − 0.8): area 0.02
    assert apgr(-perfect, weak, strong) == pytest.approx(0.1)
    assert cpt(-perfect, weak, strong, 0.5) == pytest.approx(0.9)


def test_random_router_averages_one_half():
    rng = np.random.default_rng(0)
    weak = (rng.random(500) < 0.6).astype(float)
    strong = (rng.random(500) < 0.8).astype(float)
    values = [apgr(np.random.default_rng(s).random(500), weak, strong) for s in range(200)]
    assert np.mean(values) == pytest.approx(0.5, abs=0.02)
    assert np.std(values) > 0.01  # the seeds really differ


def test_constant_scores_keep_input_order():
    weak, strong = planted_pair()
    constant = np.zeros(100)
    # stable sort: ties are taken in input order, where the gains happen to come first
    assert apgr(constant, weak, strong) == pytest.approx(0.9)
    assert apgr(constant[::-1], weak[::-1], strong[::-1]) == pytest.approx(0.1)


def test_no_gap_and_bad_input():
    same = np.array([1.0, 0.0, 1.0])
    assert math.isnan(apgr([0.1, 0.2, 0.3], same, same))
    with pytest.raises(ValueError, match="same length"):
        apgr([0.1, 0.2], same, same)
    with pytest.raises(ValueError, match="finite"):
        apgr([0.1, float("nan"), 0.3], same, same)


def test_routing_metrics_keys_and_oracle_quality():
    weak = np.array([0, 1, 0, 1.0])
    strong = np.array([1, 1, 0, 0.0])
    out = routing_metrics(strong - weak, weak, strong)
    assert out["weak_quality"] == 0.5 and out["strong_quality"] == 0.5
    assert out["oracle_quality"] == 0.75
    assert out["n"] == 4 and math.isnan(out["apgr"])


def test_thresholds_realise_the_asked_fractions():
    rng = np.random.default_rng(1)
    val = rng.normal(size=2000)
    thresholds = calibrate_thresholds(val)
    assert list(thresholds) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    realised = realised_fractions(val, thresholds)
    for key, frac in realised.items():
        assert frac == pytest.approx(float(key), abs=1 / 2000)
    # thresholds fall as the strong fraction grows
    assert all(a > b for a, b in zip(list(thresholds.values()), list(thresholds.values())[1:]))
    # new data from the same distribution stays close; shifted scores drift upwards
    fresh = realised_fractions(rng.normal(size=5000), thresholds)
    assert all(abs(fresh[k] - float(k)) < 0.03 for k in fresh)
    shifted = realised_fractions(rng.normal(size=5000) + 0.5, thresholds)
    assert all(shifted[k] > float(k) + 0.05 for k in shifted)


def test_choose_by_hand():
    p = np.array([[0.5, 0.9], [0.5, 0.5]])
    costs = [1.0, 10.0]
    np.testing.assert_array_equal(choose(p, costs, 0.0), [1, 0])  # tie goes to the cheaper model
    # λ = 0.5: 0.5 − 0.05 = 0.45 beats 0.9 − 0.5 = 0.4
    np.testing.assert_array_equal(choose(p, costs, 0.5), [0, 0])
    np.testing.assert_array_equal(choose(p[:, ::-1], costs[::-1], 0.0), [0, 1])
    with pytest.raises(ValueError, match="positive cost"):
        choose(p, [0.0, 0.0], 0.1)


def test_lambda_calibration_meets_budgets_and_is_monotone():
    rng = np.random.default_rng(2)
    p = rng.random((400, 4)) * np.array([0.4, 0.6, 0.8, 1.0])  # dearer models tend to be better
    costs = np.array([1.0, 2.0, 5.0, 10.0])
    lambdas = calibrate_lambdas(p, costs)
    assert list(lambdas) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1"]
    values = list(lambdas.values())
    assert all(a >= b for a, b in zip(values, values[1:]))  # more budget, smaller λ
    assert values[0] > values[-2] and lambdas["1"] == 0.0
    norm = costs / costs.max()
    for key, lam in lambdas.items():
        mean_cost = norm[choose(p, costs, lam)].mean()
        assert mean_cost <= float(key) + 1e-9
        if lam > 0:  # smallest such λ: a slightly smaller one overspends
            assert norm[choose(p, costs, lam * (1 - 1e-6))].mean() > float(key)


def test_unreachable_budget_routes_everything_to_the_cheapest():
    p = np.array([[0.1, 0.9], [0.2, 0.8]])
    lam = calibrate_lambdas(p, [2.0, 10.0], budgets=(0.1,))["0.1"]
    np.testing.assert_array_equal(choose(p, [2.0, 10.0], lam), [0, 0])


def test_cost_quality_points_and_budgets():
    p = np.array([[0.2, 0.9], [0.6, 0.7], [0.1, 0.8]])
    outcomes = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    mask = np.array([[True, True], [True, True], [True, False]])
    costs = [1.0, 4.0]
    cost, quality = cost_quality_points(p, outcomes, mask, costs, [0.0, 10.0])
    # λ = 0: all three pick model 1; prompt 2 is unobserved there → quality over prompts 0, 1
    np.testing.assert_allclose(cost, [1.0, 0.25])
    np.testing.assert_allclose(quality, [1.0, 1 / 3])
    at = quality_at_budgets(p, outcomes, mask, costs, {"1": 0.0})
    assert at["1"]["coverage"] == pytest.approx(2 / 3) and at["1"]["lambda"] == 0.0


def test_aiq_on_a_hand_made_hull():
    costs = [0.0, 1.0, 0.5]
    assert aiq(costs, [0.5, 0.9, 0.6]) == pytest.approx(0.7)  # (0.5, 0.6) lies below the hull line
    # a point above the line becomes a hull vertex: area 0.325 + 0.425
    assert aiq(costs, [0.5, 0.9, 0.8]) == pytest.approx(0.75)
    # a dearer, worse point is dominated; beyond the best point the hull stays flat
    costs4, q4 = [0.0, 1.0, 0.5, 2.0], [0.5, 0.9, 0.8, 0.4]
    assert aiq(costs4, q4) == pytest.approx((0.75 + 0.9) / 2)
    assert aiq(costs4, q4, cost_range=(0.0, 1.0)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="below the cheapest"):
        aiq(costs, [0.5, 0.9, 0.8], cost_range=(-1.0, 1.0))


def test_win_accuracy_tie_conventions():
    p = [0.9, 0.2, 0.6, 0.5]
    y = [1.0, 0.0, 0.0, 0.5]
    assert win_accuracy(p, y) == pytest.approx(2 / 3)
    assert win_accuracy(p, y, ties="half") == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert win_accuracy([0.5], [1.0]) == 0.5


def test_opponent_adjusted_strengths_in_a_round_robin_keep_the_win_rate_order():
    logits = np.array([[0.3, -1.0, 2.0, 0.1]])
    s = opponent_adjusted_strengths(logits, np.ones((4, 4)) - np.eye(4))
    np.testing.assert_allclose(s[0] - s[0].mean(), (logits[0] - logits[0].mean()) * 3 / 4, atol=1e-9)  # (I - W) = 4/3 I on centred s


def test_opponent_adjusted_strengths_against_one_reference_recover_bradley_terry():
    # model 0 is a reference that meets every other model; the others meet only it (AlpacaEval's design)
    true = np.array([0.0, 0.3, -3.0, -2.5, -4.0])  # model 1 is a little stronger than the reference
    p_vs_ref = 1 / (1 + np.exp(-(true[1:] - true[0])))
    p_ref = np.mean(1 / (1 + np.exp(-(true[0] - true[1:]))))
    logits = np.log(np.r_[p_ref, p_vs_ref] / (1 - np.r_[p_ref, p_vs_ref]))[None]
    counts = np.zeros((5, 5))
    counts[0, 1:] = counts[1:, 0] = 10
    s = opponent_adjusted_strengths(logits, counts)[0]
    assert np.argsort(-s).tolist() == np.argsort(-true).tolist()
    # exact for the one-opponent models; the reference's own rate is only first-order, which shifts them all a little
    np.testing.assert_allclose(s[1:] - s[0], true[1:] - true[0], atol=0.2)
    assert logits[0, 0] > logits[0, 1]  # raw win rates (89% vs the field, 57% vs the reference) say otherwise


def test_logit_inverts_sigmoid_and_clips_the_ends():
    from pipeline.routing import logit, sigmoid

    x = np.array([-5.0, -0.5, 0.0, 0.5, 5.0])
    np.testing.assert_allclose(logit(sigmoid(x)), x, atol=1e-9)
    ends = logit(np.array([0.0, 1.0], dtype=np.float32))
    np.testing.assert_allclose(ends, [-math.log(1e6 - 1), math.log(1e6 - 1)], rtol=1e-9)
    assert ends.dtype == np.float64


def test_quality_at_a_share_is_a_point_of_the_curve_and_sends_the_top_scores():
    from pipeline.metrics import quality_at, sent_to_strong

    scores = np.array([0.9, 0.1, 0.5, 0.5, 0.7])
    weak = np.array([0.0, 1.0, 0.0, 1.0, 0.0])
    strong = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    # 40% of 5 = 2 prompts to strong: 0.9 and 0.7; 50% rounds 2.5 up to 3: the first 0.5 of the tie
    np.testing.assert_array_equal(sent_to_strong(scores, 0.4), [True, False, False, False, True])
    np.testing.assert_array_equal(sent_to_strong(scores, 0.5), [True, False, True, False, True])
    assert quality_at(scores, weak, strong, 0.4) == pytest.approx((1 + 1 + 0 + 1 + 0) / 5)
    assert quality_at(scores, weak, strong, 0.5) == pytest.approx((1 + 1 + 1 + 1 + 0) / 5)
    fractions, curve = quality_curve(scores, weak, strong, n_points=11)
    for f, q in zip(fractions, curve):
        assert quality_at(scores, weak, strong, f) == pytest.approx(q)
