import numpy as np
import pytest

from pipeline.baselines import (MIN_RANKED_PROMPTS, TIE_BREAK, baseline_table, best_single_scores, cluster_accuracy,
                                cluster_router, cluster_utility, knn_outcomes, knn_scores, length_scores,
                                matrix_factorization, multi_baselines, nearest_cluster_scores, observed_rates,
                                oracle_scores, random_scores, ranked_rates, strong_needed, tfidf_lr, tfidf_ridge)
from pipeline.metrics import apgr

TOPICS_HARD = ["integral of", "prove that", "eigenvalues of", "asymptotic bound on"]
TOPICS_EASY = ["capital of", "colour of", "opposite of", "plural of"]
FILLER = ["the", "a", "this", "some", "river", "matrix", "city", "number", "word", "sky"]


def synthetic_pair(n, seed):
    """Prompts whose topic decides whether the strong model is needed."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n) < 0.4
    prompts = []
    for h in hard:
        topic = rng.choice(TOPICS_HARD if h else TOPICS_EASY)
        prompts.append(" ".join([*rng.choice(FILLER, 3), topic, *rng.choice(FILLER, 4)]))
    weak = np.where(hard, rng.random(n) < 0.2, rng.random(n) < 0.9).astype(float)
    strong = np.where(hard, rng.random(n) < 0.9, rng.random(n) < 0.9).astype(float)
    return {"prompts": prompts, "weak": weak, "strong": strong, "hard": hard}


def clustered_embeddings(hard, seed, dim=24):
    """Two directions in embedding space, one per label, plus noise."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(2, dim))
    return centres[hard.astype(int)] + 0.6 * rng.normal(size=(hard.size, dim))


def test_simple_scores():
    np.testing.assert_array_equal(random_scores(5, seed=3), random_scores(5, seed=3))
    assert not np.array_equal(random_scores(5, seed=3), random_scores(5, seed=4))
    np.testing.assert_array_equal(length_scores(["ab", "", "héllo"]), [2, 0, 5])
    np.testing.assert_array_equal(strong_needed([0, 1, 0, 1], [1, 1, 0, 0]), [1, 0, 0, 0])
    np.testing.assert_array_equal(oracle_scores([0, 1], [1, 0]), [1, -1])


def test_tfidf_lr_learns_a_planted_keyword():
    train, test = synthetic_pair(600, seed=0), synthetic_pair(300, seed=1)
    scores = tfidf_lr(train["prompts"], train["hard"].astype(int), test["prompts"])
    assert scores.shape == (300,)
    assert scores[test["hard"]].min() > scores[~test["hard"]].max()  # the keyword separates perfectly
    # one class only: a constant score, not a crash
    flat = tfidf_lr(train["prompts"], np.zeros(600), test["prompts"])
    assert np.all(flat == 0.0)
    with pytest.raises(ValueError, match="labels"):
        tfidf_lr(train["prompts"], np.zeros(5), test["prompts"])


def test_knn_recovers_cluster_labels():
    train, test = synthetic_pair(500, seed=0), synthetic_pair(200, seed=1)
    emb_train, emb_test = clustered_embeddings(train["hard"], 0), clustered_embeddings(test["hard"], 1)
    scores = knn_scores(emb_train, train["hard"], emb_test, k=15, chunk=64)
    assert np.mean((scores > 0.5) == test["hard"]) > 0.95
    # 2-D labels give one mean per column
    both = knn_scores(emb_train, np.stack([train["hard"], ~train["hard"]], 1), emb_test, k=15)
    np.testing.assert_allclose(both.sum(1), 1.0)


def test_matrix_factorization_learns_per_model_signal_and_ignores_masked_cells():
    rng = np.random.default_rng(0)
    n, dim = 800, 16
    emb = rng.normal(size=(n, dim))
    u = rng.normal(size=(2, dim))
    # model 0 succeeds on one half-space, model 1 on another: the outcome depends on the prompt and the model
    truth = (emb @ u.T > 0).astype(float)
    mask = rng.random((n, 2)) < 0.7
    train, test = slice(0, 600), slice(600, n)
    p = matrix_factorization(emb[train], truth[train], mask[train], emb[test], dim=8, epochs=200)
    assert p.shape == (200, 2) and np.all((p >= 0) & (p <= 1))
    accuracy = np.mean((p > 0.5) == truth[test].astype(bool), axis=0)
    assert np.all(accuracy > 0.85), accuracy
    garbage = np.where(mask[train], truth[train], 1 - truth[train])
    p_again = matrix_factorization(emb[train], garbage, mask[train], emb[test], dim=8, epochs=200)
    np.testing.assert_allclose(p_again, p)  # unobserved cells play no part in training


def test_baseline_table_ranks_planted_signal():
    train, test = synthetic_pair(600, seed=0), synthetic_pair(300, seed=1)
    emb = (clustered_embeddings(train["hard"], 0), clustered_embeddings(test["hard"], 1))
    table = baseline_table(train, test, embeddings=emb)
    assert set(table) == {"random", "length", "tfidf_lr", "knn", "mf", "cluster", "oracle"}
    assert table["random"]["apgr"] == pytest.approx(0.5, abs=0.08)
    for name in ("tfidf_lr", "knn", "mf", "cluster"):
        assert table[name]["apgr"] > 0.75, (name, table[name])
        assert table[name]["cpt50"] < table["random"]["cpt50"]
    assert table["oracle"]["apgr"] >= max(v["apgr"] for k, v in table.items() if k != "oracle")
    assert table["oracle"]["apgr"] == pytest.approx(
        apgr(test["strong"] - test["weak"], test["weak"], test["strong"]))
    assert "knn" not in baseline_table(train, test)
    with pytest.raises(ValueError, match="missing"):
        baseline_table({"prompts": []}, test)


# ---- N models ------------------------------------------------------------------------------------

TOPICS = ["integral of", "capital of", "translate into french", "sort the list"]


def synthetic_multi(n, seed, m=3):
    """Prompts in m topic clusters (text keyword and embedding direction); model j succeeds 90% of the
    time on cluster j and 20% elsewhere, and the last model is a bit better overall (the best single)."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, m, n)
    prompts = [" ".join([*rng.choice(FILLER, 3), TOPICS[t], *rng.choice(FILLER, 4)]) for t in topic]
    centres = np.random.default_rng(7).normal(size=(m, 24))
    emb = centres[topic] + 0.5 * rng.normal(size=(n, 24))
    p = np.where(topic[:, None] == np.arange(m), 0.9, 0.2)
    p[:, -1] += 0.1
    outcomes = (rng.random((n, m)) < p).astype(float)
    return {"prompts": prompts, "emb": emb, "y": outcomes, "topic": topic}


def routed(scores, y):
    return float(y[np.arange(len(y)), scores.argmax(1)].mean())


def test_a_model_seen_on_few_prompts_is_not_the_best_single_model():
    rng = np.random.default_rng(0)
    n = 500
    y = np.stack([rng.random(n) < 0.6, rng.random(n) < 0.8, np.ones(n), np.ones(n)], 1).astype(float)
    mask = np.ones(y.shape, bool)
    mask[3:, 2] = False  # model 2: right on its 3 prompts
    mask[MIN_RANKED_PROMPTS:, 3] = False  # model 3: right on exactly MIN_RANKED_PROMPTS prompts
    assert ranked_rates(y, mask).argmax() == 3 and best_single_scores(y, mask, 7)[0].argmax() == 3
    mask[MIN_RANKED_PROMPTS - 1:, 3] = False  # one fewer: now both are rare, and the 0.8 model is best
    rank = ranked_rates(y, mask)
    assert rank.argmax() == 1 and set(np.argsort(rank)[:2]) == {2, 3}  # the rare ones at the bottom
    assert np.array_equal(ranked_rates(y[:10], mask[:10]), observed_rates(y[:10], mask[:10]))  # none has enough


def test_cluster_router_sends_each_cluster_to_its_model():
    train, test = synthetic_multi(600, 0), synthetic_multi(300, 1)
    mask = np.ones(train["y"].shape, bool)
    s = cluster_router(train["emb"], train["y"], mask, test["emb"], k=6)
    assert s.shape == (300, 3)
    assert np.mean(s.argmax(1) == test["topic"]) > 0.95
    best = best_single_scores(train["y"], mask, 300)
    assert (best.argmax(1) == 2).all()
    assert routed(s, test["y"]) > routed(best, test["y"]) + 0.3
    # no costs: α plays no part; with costs, α = 0 sends everything to the cheapest model
    np.testing.assert_array_equal(cluster_router(train["emb"], train["y"], mask, test["emb"], k=6, alpha=0.0), s)
    cheap = cluster_router(train["emb"], train["y"], mask, test["emb"], k=6, alpha=0.0, costs=[3.0, 1.0, 2.0])
    assert (cheap.argmax(1) == 1).all()
    # the utility commutes with routing: applied afterwards it gives the same scores
    np.testing.assert_allclose(cluster_utility(s, [3.0, 1.0, 2.0], 0.4),
                               cluster_router(train["emb"], train["y"], mask, test["emb"], k=6, alpha=0.4,
                                              costs=[3.0, 1.0, 2.0]))


def test_cluster_router_pair_scores_rank_and_are_not_constant_within_a_cluster():
    train, test = synthetic_pair(600, seed=0), synthetic_pair(300, seed=1)
    emb_train, emb_test = clustered_embeddings(train["hard"], 0), clustered_embeddings(test["hard"], 1)
    y = np.stack([train["weak"], train["strong"]], 1)
    s = cluster_router(emb_train, y, np.ones(y.shape, bool), emb_test, k=8)
    score = s[:, 1] - s[:, 0]
    assert apgr(score, test["weak"], test["strong"]) > 0.75
    assert len(np.unique(score)) == len(score)  # the next-nearest cluster breaks every tie


def test_cluster_router_ignores_masked_cells_and_clamps_k():
    train, test = synthetic_multi(300, 0), synthetic_multi(50, 1)
    mask = np.random.default_rng(3).random(train["y"].shape) < 0.7
    s = cluster_router(train["emb"], train["y"], mask, test["emb"], k=6)
    garbage = np.where(mask, train["y"], 1 - train["y"])
    np.testing.assert_array_equal(cluster_router(train["emb"], garbage, mask, test["emb"], k=6), s)
    tiny = cluster_router(train["emb"][:4], train["y"][:4], mask[:4], test["emb"], k=20)  # k clamped to 4
    assert tiny.shape == (50, 3) and np.isfinite(tiny).all()
    with pytest.raises(ValueError, match="do not match"):
        cluster_router(train["emb"], train["y"][:10], mask, test["emb"])


def test_cluster_accuracy_shrinks_small_clusters_toward_the_overall_rate():
    labels = np.array([0] * 8 + [1])
    y = np.array([[1.0]] * 8 + [[0.0]])
    acc = cluster_accuracy(labels, y, np.ones_like(y, bool), k=3, prior=2.0)
    overall = 8 / 9
    np.testing.assert_allclose(acc[:, 0], [(8 + 2 * overall) / 10, (0 + 2 * overall) / 3, overall])


def test_nearest_cluster_scores_break_ties_toward_the_next_cluster_only():
    s = np.array([[0.2], [0.9], [0.5]])  # three clusters, one model
    d = np.array([[0.1, 0.9, 0.5],   # in cluster 0, far from 1
                  [0.4, 0.5, 0.9],   # in cluster 0, near the border of cluster 1 (better)
                  [0.2, 0.9, 0.3],   # in cluster 0, near cluster 2
                  [0.5, 0.1, 0.9]])  # in cluster 1
    out = nearest_cluster_scores(d, s)[:, 0]
    assert out[1] > out[2] > out[0] and out[3] > out[1]  # inside a cluster by the neighbour; across by cluster
    assert np.all(np.abs(out - s[[0, 0, 0, 1], 0]) <= TIE_BREAK)
    np.testing.assert_allclose(nearest_cluster_scores(d, s, top_p=3)[:, 0], 1.6 / 3)  # all clusters: their mean


def test_tfidf_ridge_and_knn_outcomes_learn_per_model_signal():
    train, test = synthetic_multi(600, 0), synthetic_multi(300, 1)
    mask = np.random.default_rng(1).random(train["y"].shape) < 0.8
    ridge = tfidf_ridge(train["prompts"], train["y"], mask, test["prompts"])
    knn = knn_outcomes(train["emb"], train["y"], mask, test["emb"], k=15)
    for s in (ridge, knn):
        assert s.shape == (300, 3) and np.mean(s.argmax(1) == test["topic"]) > 0.9
    # a model with no observed train outcome: its overall rate (0), not a crash
    mask[:, 0] = False
    assert np.all(tfidf_ridge(train["prompts"], train["y"], mask, test["prompts"])[:, 0] == 0)
    assert np.all(knn_outcomes(train["emb"], train["y"], mask, test["emb"])[:, 0] == 0)
    out = multi_baselines(train["prompts"], train["y"], np.ones(train["y"].shape, bool), test["prompts"],
                          (train["emb"], test["emb"]))
    assert set(out) == {"best_single", "tfidf_ridge", "knn", "cluster"}
    assert set(multi_baselines(train["prompts"], train["y"], mask, test["prompts"])) == {"best_single", "tfidf_ridge"}
