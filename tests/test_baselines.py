import numpy as np
import pytest

from pipeline.baselines import (baseline_table, knn_scores, length_scores, matrix_factorization, oracle_scores,
                                random_scores, strong_needed, tfidf_lr)
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
    assert set(table) == {"random", "length", "tfidf_lr", "knn", "mf", "oracle"}
    assert table["random"]["apgr"] == pytest.approx(0.5, abs=0.08)
    for name in ("tfidf_lr", "knn", "mf"):
        assert table[name]["apgr"] > 0.75, (name, table[name])
        assert table[name]["cpt50"] < table["random"]["cpt50"]
    assert table["oracle"]["apgr"] >= max(v["apgr"] for k, v in table.items() if k != "oracle")
    assert table["oracle"]["apgr"] == pytest.approx(
        apgr(test["strong"] - test["weak"], test["weak"], test["strong"]))
    assert "knn" not in baseline_table(train, test)
    with pytest.raises(ValueError, match="missing"):
        baseline_table({"prompts": []}, test)
