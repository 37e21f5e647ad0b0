"""The cluster prior: chosen on validation only where it routes better, and exported inside the graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import Prepared
from pipeline.encoders import StaticRouter
from pipeline.prior import ClusterPrior, blend, fit_cluster_prior
from pipeline.select import val_quality


def _prep(n: int = 3000, informative: bool = True, seed: int = 0) -> tuple[Prepared, np.ndarray]:
    """Three similar models; which one succeeds depends on the prompt's topic (8 topics, visible in the
    features) when `informative`, on nothing otherwise. Returns the data and the features."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 8, n)
    best = topic % 3
    rate = np.full((n, 3), 0.45)
    if informative:
        rate[np.arange(n), best] = 0.75
    target = (rng.random((n, 3)) < rate).astype(np.float32)
    h = rng.normal(size=(n, 32)).astype(np.float32)
    h[np.arange(n), topic] += 4.0
    split = np.where(np.arange(n) % 10 < 6, "train", np.where(np.arange(n) % 10 < 8, "val", "test"))
    prep = Prepared(name="t", models=["a", "b", "c"], costs=[None] * 3, pair=None, prompts=[""] * n,
                    prompt_ids=[str(i) for i in range(n)], target=target, mask=np.ones((n, 3), bool),
                    split=split, teacher_emb=h, data_hash="x", stats={})
    return prep, h


def test_the_torch_prior_is_the_numpy_blend_in_logit_space():
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(5, 8))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    table, h, logits = rng.random((5, 3)), rng.normal(size=(7, 8)), rng.normal(size=(7, 3))
    prior = ClusterPrior(centroids, table, beta=0.4, temperature=0.05)
    out = prior(torch.tensor(h, dtype=torch.float32), torch.tensor(logits, dtype=torch.float32)).numpy()
    expected = blend(1 / (1 + np.exp(-logits)), h, centroids, table, 0.4, 0.05)
    assert np.allclose(1 / (1 + np.exp(-out)), expected, atol=1e-5)
    none = ClusterPrior(centroids, table, beta=0.0, temperature=0.05)  # beta 0: the logits unchanged
    assert np.allclose(none(torch.tensor(h, dtype=torch.float32), torch.tensor(logits, dtype=torch.float32)).numpy(),
                       logits, atol=1e-4)


def test_a_prior_is_chosen_where_clusters_tell_the_models_apart_and_recorded():
    prep, h = _prep()
    val, train = prep.rows("val"), prep.rows("train")
    p_val = np.full((len(val), 3), 0.55, np.float32) + np.random.default_rng(2).normal(0, 0.05, (len(val), 3))
    prior, record = fit_cluster_prior(prep, h[train], h[val], p_val)
    assert prior is not None and record["chosen"] == {k: record["best"][k] for k in ("k", "temperature", "beta")}
    assert record["win_rate"] >= 0.9 and record["best"]["quality"] > record["none"] + 0.05
    blended = blend(p_val, h[val], prior.centroids.numpy(), prior.table.numpy(), float(prior.beta),
                    float(prior.temperature))
    assert val_quality(prep, blended, val) == pytest.approx(record["best"]["quality"], abs=1e-4)
    test = prep.rows("test")  # and it carries to prompts it never saw
    p_test = np.full((len(test), 3), 0.55, np.float32)
    picked = blend(p_test, h[test], prior.centroids.numpy(), prior.table.numpy(), float(prior.beta),
                   float(prior.temperature)).argmax(1)
    assert (picked == (np.argmax(h[test, :8], axis=1) % 3)).mean() > 0.9


def test_no_prior_where_clusters_carry_nothing():
    prep, h = _prep(informative=False)
    val, train = prep.rows("val"), prep.rows("train")
    p_val = np.random.default_rng(3).random((len(val), 3)).astype(np.float32)
    prior, record = fit_cluster_prior(prep, h[train], h[val], p_val)
    assert prior is None and record["chosen"] is None and "none" in record


def test_the_best_of_many_settings_is_not_kept_for_winning_on_the_prompts_that_chose_it():
    # Clusters carry nothing and validation is small: the best setting beats none on the validation prompts
    # by luck. Tested on those same prompts, the best of the 36 cluster settings was kept on 10 of these 20
    # sets; the out-of-fold choice (now among 40, with the 4 global ones) keeps it about as often as the 90%
    # rule allows.
    kept = 0
    for seed in range(20):
        prep, h = _prep(n=1000, informative=False, seed=seed)
        val, train = prep.rows("val"), prep.rows("train")
        p_val = (0.4 + 0.2 * np.random.default_rng(100 + seed).random((len(val), 3))).astype(np.float32)
        prior, record = fit_cluster_prior(prep, h[train], h[val], p_val, seed=seed)
        kept += prior is not None
    assert kept <= 3


def test_too_few_prompts_skip_the_search():
    prep, h = _prep(n=30)
    val, train = prep.rows("val"), prep.rows("train")
    prior, record = fit_cluster_prior(prep, h[train], h[val], np.full((len(val), 3), 0.5))
    assert prior is None and "skipped" in record


def test_a_student_with_a_prior_exports_and_reloads_to_the_same_logits(tmp_path):
    import onnxruntime as ort

    from pipeline.export import to_onnx

    torch.manual_seed(0)
    net = StaticRouter(2000, 16, 8, 3).eval()
    ids = torch.randint(1, 2000, (4, 9))
    mask = torch.ones_like(ids)
    before = net(ids, mask)
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(6, 16))
    net.prior = ClusterPrior(centroids / np.linalg.norm(centroids, axis=1, keepdims=True), rng.random((6, 3)),
                             beta=0.5, temperature=0.1)
    after = net(ids, mask)
    assert not torch.allclose(before, after, atol=1e-3)  # the prior changes the outputs
    session = ort.InferenceSession(str(to_onnx(net, tmp_path / "m.onnx")))
    names = [i.name for i in session.get_inputs()]
    onnx_out = session.run(None, {names[0]: ids.numpy(), names[1]: mask.numpy()})[0]
    assert np.allclose(onnx_out, after.detach().numpy(), atol=1e-4)
    reloaded = StaticRouter(2000, 16, 8, 3)
    state = net.state_dict()
    reloaded.prior = ClusterPrior.empty(*state["prior.centroids"].shape, 3)
    reloaded.load_state_dict(state)
    assert torch.allclose(reloaded.eval()(ids, mask), after, atol=1e-6)


def _pairwise_prep(n: int = 2000, seed: int = 0) -> tuple[Prepared, np.ndarray]:
    """Arena-style votes over three models: on each of 6 topics (visible in the features) a different
    model is strongest; each prompt has four battles between random pairs."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 6, n)
    strength = np.zeros((n, 3))
    strength[np.arange(n), topic % 3] = 1.5
    battles = []
    for i in range(n):
        a = rng.integers(0, 3, 4)
        b = (a + rng.integers(1, 3, 4)) % 3
        win = rng.random(4) < 1 / (1 + np.exp(-(strength[i, a] - strength[i, b])))
        battles.append(np.stack([a, b, win.astype(float)], axis=1).astype(np.float32))
    h = rng.normal(size=(n, 16)).astype(np.float32)
    h[np.arange(n), topic] += 4.0
    split = np.where(np.arange(n) % 10 < 6, "train", np.where(np.arange(n) % 10 < 8, "val", "test"))
    prep = Prepared(name="v", models=["a", "b", "c"], costs=[None] * 3, pair=None, prompts=[""] * n,
                    prompt_ids=[str(i) for i in range(n)], target=np.full((n, 3), 0.5, np.float32),
                    mask=np.ones((n, 3), bool), split=split, teacher_emb=h, data_hash="x", stats={},
                    battles=battles)
    return prep, h


def test_a_pairwise_prior_blends_strengths_so_win_probabilities_ignore_each_prompts_offset():
    rng = np.random.default_rng(2)
    centroids = rng.normal(size=(4, 8))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    table, h, logits = rng.normal(size=(4, 3)), rng.normal(size=(5, 8)), rng.normal(size=(5, 3))
    shifted = logits + rng.normal(size=(5, 1)) * 3  # the same strengths: Bradley-Terry has no zero
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    prior = ClusterPrior(centroids, table, beta=0.5, temperature=0.1, strengths=True)
    out, out_shifted = prior(t(h), t(logits)).numpy(), prior(t(h), t(shifted)).numpy()
    diff = lambda x: x[:, :, None] - x[:, None, :]  # noqa: E731
    assert np.allclose(diff(out), diff(out_shifted), atol=1e-4)
    assert np.allclose(1 / (1 + np.exp(-out)), blend(1 / (1 + np.exp(-logits)), h, centroids, table, 0.5, 0.1, True),
                       atol=1e-5)
    # Blending rates into sigmoid(logits) instead reads the arbitrary offset as evidence.
    rates = ClusterPrior(centroids, rng.random((4, 3)), beta=0.5, temperature=0.1)
    assert not np.allclose(diff(rates(t(h), t(logits)).numpy()), diff(rates(t(h), t(shifted)).numpy()), atol=1e-2)


def test_a_pairwise_prior_is_fitted_on_each_clusters_battles():
    prep, h = _pairwise_prep()
    train, val = prep.rows("train"), prep.rows("val")
    p_val = np.full((len(val), 3), 0.5)  # a student that knows nothing: every battle a coin flip
    prior, record = fit_cluster_prior(prep, h[train], h[val], p_val)
    assert prior is not None and float(prior.strengths) == 1.0 and "Bradley-Terry" in record["table"]
    # each cluster's table ranks its topic's strong model first
    topic = h[:, :6].argmax(1)
    nearest = (h[train] / np.linalg.norm(h[train], axis=1, keepdims=True)) @ prior.centroids.numpy().T
    cluster = nearest.argmax(1)
    for c in np.unique(cluster):
        assert prior.table.numpy()[c].argmax() == np.bincount(topic[train][cluster == c] % 3).argmax()
    assert record["best"]["quality"] > record["none"] + 0.1


def test_votes_whose_strengths_the_student_only_adds_noise_to_keep_the_global_ranking():
    # One ranking everywhere (c > b > a) and topics that say nothing; the student's per-prompt strengths are
    # that ranking plus noise. The one-cluster table (every train battle's strengths) removes the noise.
    rng = np.random.default_rng(4)
    n = 2000
    battles = []
    for _ in range(n):
        a = rng.integers(0, 3, 2)
        b = (a + rng.integers(1, 3, 2)) % 3
        battles.append(np.stack([a, b, (rng.random(2) < 1 / (1 + np.exp(-(a - b) * 0.8))).astype(float)], axis=1))
    h = rng.normal(size=(n, 16)).astype(np.float32)
    split = np.where(np.arange(n) % 10 < 6, "train", np.where(np.arange(n) % 10 < 8, "val", "test"))
    prep = Prepared(name="g", models=["a", "b", "c"], costs=[None] * 3, pair=None, prompts=[""] * n,
                    prompt_ids=[str(i) for i in range(n)], target=np.full((n, 3), 0.5, np.float32),
                    mask=np.ones((n, 3), bool), split=split, teacher_emb=h, data_hash="x", stats={},
                    battles=[x.astype(np.float32) for x in battles])
    train, val = prep.rows("train"), prep.rows("val")
    strengths = np.array([0.0, 0.8, 1.6]) + rng.normal(0, 1.5, (len(val), 3))
    prior, record = fit_cluster_prior(prep, h[train], h[val], 1 / (1 + np.exp(-strengths)))
    assert prior is not None and record["chosen"]["k"] == 1
    assert record["best"]["quality"] > record["none"] + 0.05
    assert np.argsort(prior.table.numpy()[0]).tolist() == [0, 1, 2]  # the global ranking
