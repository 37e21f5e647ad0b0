"""Simple routers to beat: random, prompt length, TF-IDF + logistic regression, kNN, matrix
factorisation and a cluster router (Avengers-Pro) on text embeddings, and the oracle; for N models
also the best single model and TF-IDF + ridge regression per model.

Each one fits on the train prompts and returns one score per test prompt; for a weak/strong pair a
higher score means "send to the strong model" (see `pipeline.metrics`). The N-model routers return
one score per test prompt and model, routed by argmax.

Label convention ("strong needed"): y = strong outcome > weak outcome, i.e. the strong model is right
where the weak one is wrong. With TF-IDF (word 1–2-grams, sublinear tf, min_df=2) + logistic
regression (C=1) this reproduces the README's APGR on the fixed split (MMLU 0.654, GSM8K 0.638);
"weak is wrong" as the label does much worse (0.574 / 0.552), because it also fires on prompts that
both models fail, where the strong call buys nothing.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .metrics import routing_metrics


def strong_needed(weak, strong) -> np.ndarray:
    """1 where the strong model does better than the weak one on the prompt, else 0."""
    return (np.asarray(strong, dtype=np.float64) > np.asarray(weak, dtype=np.float64)).astype(np.int64)


def oracle_scores(weak, strong) -> np.ndarray:
    """The router that knows the outcomes: strong − weak (best prompts to upgrade first)."""
    return np.asarray(strong, dtype=np.float64) - np.asarray(weak, dtype=np.float64)


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def length_scores(prompts: Sequence[str]) -> np.ndarray:
    """Longer prompts are assumed harder: the score is the length in characters."""
    return np.array([len(p) for p in prompts], dtype=np.float64)


def tfidf_lr(train_prompts: Sequence[str], train_y, test_prompts: Sequence[str], C: float = 1.0) -> np.ndarray:
    """P(strong needed) from logistic regression on TF-IDF word 1–2-grams.

    `train_y` values above 0.5 count as positive. With a single class in train there is nothing to
    learn: every test prompt gets the positive rate (a constant, uninformative score).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    y = (np.asarray(train_y, dtype=np.float64) > 0.5).astype(np.int64)
    if len(train_prompts) != y.size:
        raise ValueError(f"{len(train_prompts)} train prompts but {y.size} labels")
    if y.min() == y.max():
        return np.full(len(test_prompts), float(y.mean()))
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, dtype=np.float32)
    x_train = vectorizer.fit_transform(train_prompts)
    # lbfgs leaves the intercept unpenalised (liblinear does not, and lands 0.001 APGR lower on GSM8K)
    model = LogisticRegression(C=C, solver="lbfgs", max_iter=1000).fit(x_train, y)
    return model.predict_proba(vectorizer.transform(test_prompts))[:, 1]


def _unit_rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [n, dim] array, got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_scores(train_emb, train_y, test_emb, k: int = 20, chunk: int = 1024) -> np.ndarray:
    """Mean label of the k most cosine-similar train prompts ([n_test] or [n_test, m] for 2-D labels)."""
    train, test = _unit_rows(train_emb), _unit_rows(test_emb)
    y = np.asarray(train_y, dtype=np.float64)
    if y.shape[0] != train.shape[0] or train.shape[1] != test.shape[1]:
        raise ValueError(f"train embeddings {train.shape}, labels {y.shape} and test embeddings "
                         f"{test.shape} do not match")
    k = max(1, min(k, train.shape[0]))
    out = []
    for start in range(0, test.shape[0], chunk):  # bounded memory: chunk × n_train similarities
        sims = test[start:start + chunk] @ train.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out.append(y[top].mean(axis=1))
    return np.concatenate(out) if out else np.zeros((0,) + y.shape[1:])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def matrix_factorization(train_emb, train_outcomes, train_mask, test_emb, dim: int = 32,
                         epochs: int = 150, lr: float = 0.02, weight_decay: float = 1e-4,
                         seed: int = 0) -> np.ndarray:
    """RouteLLM's matrix-factorisation router family: P(model j succeeds on prompt e) =
    sigmoid(w·(v_j ⊙ W e) + b_j), trained with logistic loss on the observed outcomes in [0, 1].

    w·(v_j ⊙ W e) = (w ⊙ v_j)·(W e), so the classifier w is folded into the model embeddings v_j. A
    per-model bias b_j carries the base success rate so the text projection only has to explain the
    per-prompt differences. Text embeddings are L2-normalised. Full-batch Adam, numpy only.
    Returns p: [n_test, m].
    """
    e_train, e_test = _unit_rows(train_emb), _unit_rows(test_emb)
    y = np.asarray(train_outcomes, dtype=np.float64)
    mask = np.asarray(train_mask, dtype=bool)
    if y.ndim != 2 or y.shape[0] != e_train.shape[0] or mask.shape != y.shape:
        raise ValueError(f"outcomes {y.shape} and mask {mask.shape} must be [n_train={e_train.shape[0]}, m]")
    if e_train.shape[1] != e_test.shape[1]:
        raise ValueError(f"train and test embeddings differ in width: {e_train.shape[1]} vs {e_test.shape[1]}")
    if not mask.any():
        raise ValueError("no observed outcome to train on")
    y = np.where(mask, np.clip(y, 0.0, 1.0), 0.0)
    e_train = e_train.astype(np.float64)
    rng = np.random.default_rng(seed)
    m, d = y.shape[1], e_train.shape[1]
    rate = np.clip((y * mask).sum(0) / np.maximum(mask.sum(0), 1), 1e-3, 1 - 1e-3)
    params = {
        "W": rng.normal(0.0, 1.0, (dim, d)),  # rows of unit-norm inputs → projections of scale ~1
        "V": rng.normal(0.0, 0.1, (m, dim)),
        "b": np.log(rate / (1 - rate)),
    }
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    n_obs = mask.sum()
    beta1, beta2 = 0.9, 0.999
    for step in range(1, epochs + 1):
        z = e_train @ params["W"].T
        g = mask * (_sigmoid(z @ params["V"].T + params["b"]) - y) / n_obs
        grads = {
            "V": g.T @ z + weight_decay * params["V"],
            "W": (g @ params["V"]).T @ e_train + weight_decay * params["W"],
            "b": g.sum(0),
        }
        for k, grad in grads.items():
            m1, m2 = moments[k]
            m1 *= beta1
            m1 += (1 - beta1) * grad
            m2 *= beta2
            m2 += (1 - beta2) * grad * grad
            params[k] -= lr * (m1 / (1 - beta1 ** step)) / (np.sqrt(m2 / (1 - beta2 ** step)) + 1e-8)
    z_test = e_test.astype(np.float64) @ params["W"].T
    return _sigmoid(z_test @ params["V"].T + params["b"])


def _mean_metrics(runs: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in runs])) if k != "n" else runs[0][k] for k in runs[0]}


def baseline_table(train: Mapping, test: Mapping, embeddings: tuple | None = None,
                   random_seeds: int = 10) -> dict[str, dict]:
    """routing_metrics of every applicable baseline for a weak/strong pair, plus the oracle.

    `train` and `test` map "prompts" (list of str), "weak" and "strong" (outcomes in [0, 1], one per
    prompt). `embeddings` = (train_emb, test_emb) adds the kNN, matrix-factorisation and cluster routers.
    Random is averaged over `random_seeds` seeds, like RouteLLM's repeated random runs.
    """
    for name, part in (("train", train), ("test", test)):
        missing = {"prompts", "weak", "strong"} - set(part)
        if missing:
            raise ValueError(f"{name} is missing {sorted(missing)}")
    weak, strong = np.asarray(test["weak"], np.float64), np.asarray(test["strong"], np.float64)
    y_train = strong_needed(train["weak"], train["strong"])
    n = len(test["prompts"])
    table = {
        "random": _mean_metrics([routing_metrics(random_scores(n, s), weak, strong) for s in range(random_seeds)]),
        "length": routing_metrics(length_scores(test["prompts"]), weak, strong),
        "tfidf_lr": routing_metrics(tfidf_lr(train["prompts"], y_train, test["prompts"]), weak, strong),
    }
    if embeddings is not None:
        train_emb, test_emb = embeddings
        table["knn"] = routing_metrics(knn_scores(train_emb, y_train, test_emb), weak, strong)
        outcomes = np.stack([train["weak"], train["strong"]], axis=1).astype(np.float64)
        p = matrix_factorization(train_emb, outcomes, np.ones(outcomes.shape, bool), test_emb)
        table["mf"] = routing_metrics(p[:, 1] - p[:, 0], weak, strong)
        s = cluster_router(train_emb, outcomes, np.ones(outcomes.shape, bool), test_emb)
        table["cluster"] = routing_metrics(s[:, 1] - s[:, 0], weak, strong)
    table["oracle"] = routing_metrics(oracle_scores(weak, strong), weak, strong)
    return table


# ---- N models: one score per prompt and model, routed by argmax -----------------------------------

def observed_rates(outcomes, mask) -> np.ndarray:
    """Each model's mean observed outcome ([m]); 0 for a model never observed."""
    y, seen = np.asarray(outcomes, np.float64), np.asarray(mask, bool)
    return np.where(seen, y, 0.0).sum(0) / np.maximum(seen.sum(0), 1)


MIN_RANKED_PROMPTS = 20  # a model observed on fewer train prompts ranks below every model observed on this many


def ranked_rates(outcomes, mask) -> np.ndarray:
    """Each model's observed rate as a ranking ([m]): a model observed on fewer than MIN_RANKED_PROMPTS
    prompts ranks below every model observed on that many (its rate − 2; outcomes lie in [0, 1]), so a model
    right on its three prompts is not the best single model. Plain rates when no model has that many."""
    rates = observed_rates(outcomes, mask)
    enough = np.asarray(mask, bool).sum(0) >= MIN_RANKED_PROMPTS
    return np.where(enough | ~enough.any(), rates, rates - 2.0)


def best_single_scores(train_outcomes, train_mask, n_test: int) -> np.ndarray:
    """Every test prompt scored with each model's train rate, as ranked by `ranked_rates`: argmax is the best
    single model."""
    return np.tile(ranked_rates(train_outcomes, train_mask), (n_test, 1))


def tfidf_ridge(train_prompts: Sequence[str], train_outcomes, train_mask, test_prompts: Sequence[str],
                alpha: float = 3.0) -> np.ndarray:
    """Predicted outcome [n_test, m]: one ridge regression per model on TF-IDF word 1–2-grams (sublinear
    tf, min_df=2). α = 3 reproduces the shared README's RouterDC figure (0.522; α = 1 gives 0.517, and
    α from 2 to 10 gives 0.520–0.523, so the baseline is not tuned to a lucky spike).

    Each model's regression sees only the train prompts where it was observed; a model observed on
    fewer than two of them gets its observed rate everywhere.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    y, seen = np.asarray(train_outcomes, np.float64), np.asarray(train_mask, bool)
    if y.shape != seen.shape or y.ndim != 2 or y.shape[0] != len(train_prompts):
        raise ValueError(f"outcomes {y.shape} and mask {seen.shape} must be [n_train={len(train_prompts)}, m]")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, dtype=np.float32)
    x_train = vectorizer.fit_transform(train_prompts)
    x_test = vectorizer.transform(test_prompts)
    out = np.tile(observed_rates(y, seen), (len(test_prompts), 1))
    for j in range(y.shape[1]):
        rows = np.flatnonzero(seen[:, j])
        if rows.size >= 2:
            out[:, j] = Ridge(alpha=alpha).fit(x_train[rows], y[rows, j]).predict(x_test)
    return out


def knn_outcomes(train_emb, train_outcomes, train_mask, test_emb, k: int = 20) -> np.ndarray:
    """Per-model mean observed outcome of the k nearest train prompts [n_test, m]; a model observed on
    none of them gets its overall train rate."""
    y, seen = np.asarray(train_outcomes, np.float64), np.asarray(train_mask, bool)
    m = y.shape[1]
    both = knn_scores(train_emb, np.concatenate([np.where(seen, y, 0.0), seen], axis=1), test_emb, k=k)
    hits, counts = both[:, :m], both[:, m:]
    rate = observed_rates(y, seen)
    return np.where(counts > 0, hits / np.maximum(counts, 1e-12), rate)


# ---- cluster router (Avengers-Pro) -------------------------------------------------------------

TIE_BREAK = 1e-3  # pull toward the next-nearest cluster: orders the prompts of one cluster (see below)


def cluster_accuracy(labels: np.ndarray, outcomes, mask, k: int, prior: float = 5.0) -> np.ndarray:
    """[k, m] mean observed outcome of each model on each cluster's train prompts, shrunk toward the
    model's overall rate by `prior` pseudo-prompts so that a cluster of three prompts does not decide
    on three coin flips."""
    y, seen = np.asarray(outcomes, np.float64), np.asarray(mask, bool)
    n = np.zeros((k, y.shape[1]))
    hits = np.zeros_like(n)
    np.add.at(n, labels, seen)
    np.add.at(hits, labels, np.where(seen, y, 0.0))
    return (hits + prior * observed_rates(y, seen)) / (n + prior)


def cluster_utility(accuracy, costs=None, alpha: float = 1.0) -> np.ndarray:
    """Avengers-Pro's score α·accuracy + (1 − α)·(1 − cost / max cost); accuracy alone without costs."""
    accuracy = np.asarray(accuracy, np.float64)
    if costs is None or alpha >= 1.0:
        return accuracy
    c = np.asarray(costs, np.float64)
    return alpha * accuracy + (1.0 - alpha) * (1.0 - c / c.max())


def nearest_cluster_scores(distances, cluster_scores, top_p: int = 1) -> np.ndarray:
    """Per-prompt scores [n, m] from the mean score of its `top_p` nearest clusters.

    Every prompt of a cluster would get the same score, and APGR would order those ties by input
    position (an arbitrary order). Instead a prompt leans, with weight TIE_BREAK · d_p / d_{p+1}, toward
    the next-nearest cluster: inside a cluster the prompts nearest the border of a cluster that prefers
    the strong model are upgraded first, while the order across clusters changes only where their
    scores differ by less than TIE_BREAK (practically tied).
    """
    d = np.asarray(distances, np.float64)
    s = np.asarray(cluster_scores, np.float64)
    top_p = max(1, min(top_p, d.shape[1]))
    order = np.argsort(d, axis=1, kind="stable")
    primary = s[order[:, :top_p]].mean(axis=1)
    if d.shape[1] == top_p:
        return primary
    rows, nxt = np.arange(d.shape[0]), order[:, top_p]
    lean = d[rows, order[:, top_p - 1]] / np.maximum(d[rows, nxt], 1e-12)
    return primary + TIE_BREAK * lean[:, None] * (s[nxt] - primary)


def cluster_router(train_emb, train_outcomes, train_mask, test_emb, k: int = 20, top_p: int = 1,
                   alpha: float = 1.0, costs=None, prior: float = 5.0, seed: int = 0) -> np.ndarray:
    """Avengers-Pro's cluster router: k-means over the train prompts' (unit-length) embeddings, each
    model scored per cluster (`cluster_accuracy`, `cluster_utility`), each test prompt scored by its
    nearest cluster(s) (`nearest_cluster_scores`). Returns [n_test, m]: argmax routes N models, the
    strong − weak difference ranks prompts for a pair.

    Routing averages cluster scores, so it commutes with the utility: the α trade-off can be applied
    afterwards to the α = 1 output with `cluster_utility`, without refitting.
    """
    from sklearn.cluster import KMeans

    train, test = _unit_rows(train_emb), _unit_rows(test_emb)
    y = np.asarray(train_outcomes, np.float64)
    if y.ndim != 2 or y.shape[0] != train.shape[0] or train.shape[1] != test.shape[1]:
        raise ValueError(f"train embeddings {train.shape}, outcomes {y.shape} and test embeddings "
                         f"{test.shape} do not match")
    k = max(1, min(k, train.shape[0]))
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(train)
    accuracy = cluster_accuracy(km.labels_, y, train_mask, k, prior)
    return nearest_cluster_scores(km.transform(test), cluster_utility(accuracy, costs, alpha), top_p)


def multi_baselines(train_prompts: Sequence[str], train_outcomes, train_mask, test_prompts: Sequence[str],
                    embeddings: tuple | None = None) -> dict[str, np.ndarray]:
    """Per-model test scores [n_test, m] of the N-model baselines, each routed by argmax: the best
    single model on train, TF-IDF + ridge and, with `embeddings` = (train_emb, test_emb), kNN and the
    cluster router."""
    out = {"best_single": best_single_scores(train_outcomes, train_mask, len(test_prompts)),
           "tfidf_ridge": tfidf_ridge(train_prompts, train_outcomes, train_mask, test_prompts)}
    if embeddings is not None:
        train_emb, test_emb = embeddings
        out["knn"] = knn_outcomes(train_emb, train_outcomes, train_mask, test_emb)
        out["cluster"] = cluster_router(train_emb, train_outcomes, train_mask, test_emb)
    return out
