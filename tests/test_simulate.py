"""Router vs cascade vs ensemble simulation: hand-checked cases and the invariants every run keeps."""
import numpy as np
import pytest

from pipeline.common import ConfigError, DataError
from pipeline.simulate import (Judge, default_ladder, economics_rows, economics_table, load_profile, model_profiles,
                               plot_economics, simulate)

# Two models with fixed output lengths (sigma 0): a generation of `a` takes 0.1 + 100/100 = 1.1 s
# and costs 100 * 0.001 / 1000 = 1e-4 USD; one of `b` takes 0.5 + 100/50 = 2.5 s and costs 1e-3.
PROFILE = {
    "output_tokens_sigma": 0.0,
    "models": {"a": {"ttft_s": 0.1, "tokens_per_s": 100, "output_tokens": 100, "price_per_1k": 0.001},
               "b": {"ttft_s": 0.5, "tokens_per_s": 50, "output_tokens": 100, "price_per_1k": 0.01}},
}
OUT = np.array([[1, 1], [0, 1], [0, 1], [1, 0]], dtype=float)  # a right on 0 and 3, b on 0, 1, 2


def _sim(judge, outcomes=OUT, **kw):
    kw.setdefault("router_choices", [0, 1, 1, 0])
    return simulate(outcomes, None, [0.1, 1.0], PROFILE, models=["a", "b"], judge=judge, **kw)


def test_perfect_judge_two_models_by_hand():
    judge = Judge(accuracy=1.0, latency_ms=200, cost=5e-5)
    r = _sim(judge, decision_ms=0.5)
    s = r["strategies"]
    cas = s["cascade (judge acc 1.00)"]
    # a answers everything and is judged; b answers the two prompts a got wrong: oracle quality.
    assert cas["quality"] == pytest.approx(1.0)
    assert cas["cost"] == pytest.approx(1e-4 + 5e-5 + 0.5 * 1e-3)
    assert cas["calls"] == pytest.approx(1.5)
    np.testing.assert_allclose(cas["latency_s"], [1.3, 3.8, 3.8, 1.3])
    assert cas["p50_s"] == pytest.approx(2.55)
    ens = s["ensemble (judge pick)"]
    np.testing.assert_allclose(ens["latency_s"], 2.5 + 0.2)
    assert ens["cost"] == pytest.approx(1.1e-3 + 5e-5)
    assert ens["quality"] == pytest.approx(1.0) and s["ensemble (best-of, upper bound)"]["quality"] == 1.0
    rt = s["router"]
    np.testing.assert_allclose(rt["latency_s"], [1.1005, 2.5005, 2.5005, 1.1005])
    assert rt["quality"] == 1.0 and rt["cost"] == pytest.approx(0.5 * 1e-4 + 0.5 * 1e-3)
    assert s["always a"]["quality"] == 0.5 and s["always b"]["quality"] == 0.75
    assert r["ladder"] == ["a", "b"]


def test_always_wrong_judge_by_hand():
    r = _sim(Judge(accuracy=0.0, latency_ms=0, cost=0))
    # The judge rejects a's right answers (0 -> b right, 3 -> b wrong) and accepts its wrong ones.
    assert r["strategies"]["cascade (judge acc 0.00)"]["quality"] == pytest.approx(0.25)
    # The ensemble judge picks the worse answer whenever the two differ: only prompt 0 stays right.
    assert r["strategies"]["ensemble (judge pick)"]["quality"] == pytest.approx(0.25)


def test_router_latency_is_decision_plus_one_generation_and_invariants():
    rng = np.random.default_rng(3)
    n, m = 400, 3
    out = (rng.random((n, m)) < [0.4, 0.6, 0.8]).astype(float)
    choices = rng.integers(0, m, n)
    r = simulate(out, None, [1.0, 2.0, 5.0], {"output_tokens_sigma": 0.7}, router_choices=choices,
                 decision_ms=3.0, seed=1)
    s = r["strategies"]
    singles = np.stack([s[f"always model{j}"]["latency_s"] for j in range(m)], 1)
    single_cost = [s[f"always model{j}"]["cost"] for j in range(m)]
    np.testing.assert_allclose(s["router"]["latency_s"], singles[np.arange(n), choices] + 0.003)
    ens = s["ensemble (judge pick)"]
    assert np.all(ens["latency_s"] >= singles.max(1))
    assert ens["cost"] >= sum(single_cost)
    cas = s["cascade (judge acc 0.85)"]
    assert cas["cost"] >= min(single_cost)
    assert np.all(cas["latency_s"] >= singles[:, 0])  # every prompt waits for the cheapest model
    assert 1.0 <= cas["calls"] <= m
    assert s["ensemble (best-of, upper bound)"]["quality"] >= max(v["quality"] for v in s.values())
    assert r["seed"] == 1 and r["n"] == n


def test_seeded_and_output_lengths_vary():
    out = (np.random.default_rng(0).random((200, 2)) < 0.6).astype(float)
    kw = dict(router_choices=np.zeros(200, int), profile={"output_tokens_sigma": 0.5})
    a, b, c = (simulate(out, seed=s, **kw) for s in (0, 0, 1))
    key = "cascade (judge acc 0.85)"
    np.testing.assert_array_equal(a["strategies"][key]["latency_s"], b["strategies"][key]["latency_s"])
    assert not np.array_equal(a["strategies"][key]["latency_s"], c["strategies"][key]["latency_s"])
    assert a["strategies"]["router"]["p95_s"] > a["strategies"]["router"]["p50_s"]


def test_models_alike_in_profile_cost_alike_on_every_prompt():
    """Output lengths come from one draw per prompt: two models with the same profile generate the same
    length, so a router that alternates between them pays exactly what always calling one of them pays."""
    rng = np.random.default_rng(0)
    out = (rng.random((300, 3)) < [0.5, 0.55, 0.6]).astype(float)
    r = simulate(out, None, [None, None, 5.0], {"output_tokens_sigma": 0.8}, router_choices=rng.integers(0, 2, 300))
    router = r["strategies"]["router"]
    alike = simulate(out, None, [None, None, 5.0], {"output_tokens_sigma": 0.8}, router_choices=np.ones(300, int))
    assert router["cost"] == pytest.approx(alike["strategies"]["router"]["cost"], rel=1e-12)
    np.testing.assert_allclose(router["latency_s"], alike["strategies"]["router"]["latency_s"])
    assert router["p95_s"] > router["p50_s"]  # the lengths still vary from prompt to prompt


def test_masked_prompts_are_dropped():
    mask = np.array([[1, 1], [1, 0], [1, 1], [1, 1]], bool)
    r = simulate(OUT, mask, None, PROFILE, models=["a", "b"], router_choices=[1, 1, 0, 1])
    assert r["n"] == 3 and r["n_dropped"] == 1
    assert r["strategies"]["router"]["quality"] == pytest.approx(1 / 3)  # rows 0, 2, 3 -> b 1, a 0, b 0
    with pytest.raises(DataError, match="every model"):
        simulate(OUT, np.zeros((4, 2), bool), router_choices=[0, 0, 0, 0])


def test_matched_operating_points():
    # Curve of strong fractions over the four prompts: routing 1 and 2 to b reaches quality 1.
    curve = {0.0: [0, 0, 0, 0], 0.25: [0, 1, 0, 0], 0.5: [0, 1, 1, 0], 1.0: [1, 1, 1, 1]}
    r = _sim(Judge(accuracy=1.0, latency_ms=200, cost=5e-5), router_curve=curve, router_choices=None)
    m = r["matched"]
    assert m["router @ cascade quality"]["knob"] == 0.5 and m["router @ cascade quality"]["reached"]
    assert m["router @ cascade quality"]["cost"] < r["strategies"]["cascade (judge acc 1.00)"]["cost"]
    # Cascade costs 6.5e-4: the best point within it is 0.5 (5.5e-4); 1.0 costs 1e-3.
    assert m["router @ cascade cost"]["knob"] == 0.5
    assert m["router @ ensemble cost"]["knob"] == 1.0 or m["router @ ensemble cost"]["quality"] == 1.0
    assert "router" not in r["strategies"]


def test_ladder_skips_a_pricier_worse_model():
    out = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 1], [1, 1, 1]], float)
    assert default_ladder(out, np.array([1.0, 2.0, 3.0])) == [0, 2]
    assert default_ladder(out, np.array([1.0, 1.0, 1.0])) == [2]  # same price: only the best
    assert default_ladder(out, np.array([1.0, 3.0, 1.0])) == [2]
    r = simulate(out, router_choices=[0, 0, 0, 0], costs=[1, 2, 3])
    assert r["ladder"] == ["model0", "model2"]
    assert r["strategies"]["ensemble (judge pick)"]["calls"] == 2


def test_unknown_models_interpolate_by_cost_rank():
    prof = load_profile({"defaults": {"cheapest": {"ttft_s": 0.1, "tokens_per_s": 100, "output_tokens": 100,
                                                   "price_per_1k": 0.001},
                                      "priciest": {"ttft_s": 0.4, "tokens_per_s": 25, "output_tokens": 400,
                                                   "price_per_1k": 0.1}},
                         "models": {"known": {"price_per_1k": 0.5}}})
    p = model_profiles(["x", "y", "z", "known", "gpt-4-1106-preview"], [1.0, 2.0, 3.0, 3.0, None], prof)
    # Ranks among the four known costs: x 0, y 1/3, z and known tie at (2 + 0.5) / 3; no cost: 0.5.
    assert p["ttft_s"][0] == pytest.approx(0.1) and p["price_per_1k"][0] == pytest.approx(0.001)
    r = 2.5 / 3
    assert p["tokens_per_s"][2] == pytest.approx(100 ** (1 - r) * 25 ** r)
    assert p["price_per_1k"][3] == 0.5  # its own price, other fields from its rank
    assert p["ttft_s"][3] == pytest.approx(p["ttft_s"][2])
    assert p["price_per_1k"][4] == pytest.approx(0.03)  # listed in the packaged profile


def test_profile_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown keys"):
        load_profile({"modles": {}})
    with pytest.raises(ConfigError, match="tokens_per_s"):
        load_profile({"models": {"a": {"tokens_per_s": 0}}})
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "missing.yaml")
    f = tmp_path / "p.yaml"
    f.write_text("judge: {accuracy: 1.5}\n")
    with pytest.raises(ConfigError, match="accuracy"):
        load_profile(f)
    f.write_text("judge: {accuracy: 0.7, latency_ms: 100}\n")
    assert load_profile(f)["judge"]["accuracy"] == 0.7


def test_table_and_figure(tmp_path):
    curve = {f: np.r_[np.zeros(4 - k, int), np.ones(k, int)][[3, 0, 1, 2]] for k, f in enumerate([0, .25, .5, .75, 1])}
    r = _sim(Judge(accuracy=0.9), router_curve=curve, seed=2)
    table = economics_table(r)
    rows = economics_rows(r)
    assert len(table.splitlines()) == 2 + len(rows) == 2 + len(r["strategies"]) + len(r["matched"])
    cas = r["strategies"]["cascade (judge acc 0.90)"]
    line = next(ln for ln in table.splitlines() if ln.startswith("| cascade"))
    assert f"{cas['quality']:.3f}" in line and f"{1000 * cas['cost']:.2f}" in line and f"{cas['p95_s']:.2f}" in line
    assert "strong fraction = " in table
    png = plot_economics(r, tmp_path / "econ.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert png.stat().st_size > 20_000 and img.shape[1] > 1000 and img[..., :3].std() > 0.05
