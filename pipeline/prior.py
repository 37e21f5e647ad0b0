"""The cluster prior: each model's success rate on the train prompts nearest a prompt, blended into the
student's probabilities, inside the exported graph.

The cluster router (Avengers-Pro; `baselines.cluster_router`) is training-free and hard to beat on
tables of similar models: a per-prompt head's argmax is noisy where models differ little, while a
cluster's rate pools dozens of prompts. The prior brings that pooling into the student: k-means over
the student's own pooled features of the train prompts, a [k, m] table of each model's rate per
cluster (shrunk toward its overall rate), and at serving time

    p = (1 - beta) * sigmoid(logits) + beta * softmax(cos(features, centroids) / tau) @ table

returned as logits again, so the runtime, calibration and every decision rule stay as they are. For
pairwise data the student's logits are per-prompt Bradley-Terry strengths, defined up to a constant per
prompt, and a rate against whoever a model met is on no scale of theirs; there the table holds each
cluster's Bradley-Terry strengths (fitted on its train battles, shrunk toward all train battles') and
the blend is in strength space, `(1 - beta) * logits + beta * weights @ table`, so that P(a beats b)
stays a function of strength differences only. k = 1 is one of the candidates: a
single cluster's table is every train prompt's rates (or strengths), so that blend shrinks a noisy student
toward the global ranking, which is what a student that adds only noise to "the stronger model wins" needs.
k, tau and beta are chosen on the validation split (`select.val_quality`). Whether to keep a prior at all
is judged out of fold: each of 10 folds of the validation prompts gets the setting (or none) best on
the other nine, and beta = 0 (no prior) stays unless those predictions route validation better than
none in at least 90% of paired bootstrap resamples, as for group smoothing. (Testing the best of the
36 cluster settings on the prompts that picked it kept a prior that carries nothing about half the time.)
The choice goes into the run and `router.json` (`selection.cluster_prior`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .baselines import cluster_accuracy
from .common import console
from .routing import logit, sigmoid
from .select import (BOOTSTRAP, CHOICE_FOLDS, MIN_WIN_RATE, measure, measure_name, out_of_fold_choice,
                     parts_win_rate, prompt_parts)

KS = (1, 10, 20, 40)  # 1: the global table (shrinkage toward all train prompts)
TEMPERATURES = (0.02, 0.05, 0.1)
BETAS = (0.25, 0.5, 0.75, 1.0)
MIN_PER_CLUSTER = 20  # train prompts per cluster, on average
EPS = 1e-6


class ClusterPrior(nn.Module):
    """features, logits -> logits of the blend of sigmoid(logits) with the nearest clusters' rates, or
    (`strengths`, pairwise data) of the logits with the nearest clusters' Bradley-Terry strengths."""

    def __init__(self, centroids: np.ndarray, table: np.ndarray, beta: float, temperature: float,
                 strengths: bool = False):
        super().__init__()
        self.register_buffer("centroids", torch.as_tensor(np.asarray(centroids, np.float32)))
        self.register_buffer("table", torch.as_tensor(np.asarray(table, np.float32)))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        # A 0/1 weight rather than a Python branch: one traced graph, and the kind loads with the state dict.
        self.register_buffer("strengths", torch.tensor(float(strengths)))

    @classmethod
    def empty(cls, k: int, dim: int, n_models: int) -> "ClusterPrior":
        """A prior of the right shapes, for `load_state_dict`."""
        return cls(np.zeros((k, dim)), np.zeros((k, n_models)), 0.0, 1.0)

    def forward(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        unit = h / (h.norm(dim=-1, keepdim=True) + EPS)
        nearest = torch.softmax(unit @ self.centroids.T / self.temperature, dim=-1) @ self.table
        p = ((1 - self.beta) * torch.sigmoid(logits) + self.beta * nearest).clamp(EPS, 1 - EPS)
        rates = torch.log(p) - torch.log1p(-p)
        strengths = (1 - self.beta) * logits + self.beta * nearest
        return self.strengths * strengths + (1 - self.strengths) * rates


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + EPS)


def blend(p: np.ndarray, h: np.ndarray, centroids: np.ndarray, table: np.ndarray, beta: float,
          temperature: float, strengths: bool = False) -> np.ndarray:
    """`ClusterPrior` in numpy, on probabilities (the sigmoid of its logits): what the grid search scores."""
    sim = _unit(h) @ centroids.T / temperature
    w = np.exp(sim - sim.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    if strengths:
        return sigmoid((1 - beta) * logit(p, EPS) + beta * (w @ table))
    return np.clip((1 - beta) * p + beta * (w @ table), EPS, 1 - EPS)


def cluster_strengths(labels: np.ndarray, battles: list[np.ndarray], k: int, n_models: int,
                      prior_games: int = 5) -> np.ndarray:
    """[k, m] Bradley-Terry strengths of each cluster's battles (`battles[i]`: prompt i's rows of model a,
    model b, a's score; `labels[i]`: its cluster). Each cluster also gets `prior_games` pseudo-battles per
    pair of models met anywhere, scored at the strengths of all battles: a cluster with few battles of a
    pair keeps that pair near the overall picture, as `baselines.cluster_accuracy` shrinks rates."""
    from .data import flat_battles
    from .label import bradley_terry

    row, a, b, score = flat_battles(battles)
    cluster = np.asarray(labels)[row]
    overall = bradley_terry(a, b, score, n_models)
    pairs = np.unique(np.stack([a, b], axis=1), axis=0).repeat(prior_games, axis=0)
    expected = sigmoid(overall[pairs[:, 0]] - overall[pairs[:, 1]])
    table = np.zeros((k, n_models))
    for c in range(k):
        mine = cluster == c
        table[c] = bradley_terry(np.concatenate([a[mine], pairs[:, 0]]), np.concatenate([b[mine], pairs[:, 1]]),
                                 np.concatenate([score[mine], expected]), n_models)
    return table


def fit_cluster_prior(prep, h_train: np.ndarray, h_val: np.ndarray, p_val: np.ndarray,
                      seed: int = 0) -> tuple[ClusterPrior | None, dict]:
    """Choose k, tau and beta on validation; returns (the prior or None, the selection record).

    `h_*` are the student's pooled features of the train and validation rows, `p_val` its validation
    probabilities. Train targets are the raw observed outcomes (`prep.target`, `prep.mask`)."""
    from sklearn.cluster import KMeans

    train, val = prep.rows("train"), prep.rows("val")
    pairwise = prep.battles is not None
    # per-prompt parts of the measure, once per candidate: the out-of-fold choice mixes and resamples them
    quality_of, everything = measure(prep, val), np.arange(len(val))
    base_parts = prompt_parts(prep, p_val, val)
    base = quality_of(base_parts, everything)
    what = measure_name(prep)  # for the console lines
    record = {"rule": f"cluster prior on the student's features, validation quality; kept when the out-of-fold "
                      f"choice (each of {CHOICE_FOLDS} validation folds predicted with the setting best on the other "
                      f"{CHOICE_FOLDS - 1}) beats none in >= {MIN_WIN_RATE:.0%} of {BOOTSTRAP} paired bootstrap resamples",
              "table": "Bradley-Terry strengths per cluster, blended with the logits" if pairwise
              else "success rate per cluster, blended with the probabilities",
              "none": round(base, 4), "chosen": None}
    ks = [k for k in KS if len(train) / k >= MIN_PER_CLUSTER]
    if not ks or len(val) < 2 * CHOICE_FOLDS:
        record["skipped"] = "too few train or validation prompts"
        return None, record
    unit_train = _unit(h_train)
    settings = []  # (k, tau, beta, centroids, table, blended validation probabilities)
    for k in ks:
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(unit_train)
        centroids = _unit(km.cluster_centers_)
        if pairwise:
            table = cluster_strengths(km.labels_, [prep.battles[r] for r in train], k, len(prep.models))
        else:
            table = cluster_accuracy(km.labels_, prep.target[train], prep.mask[train], k)
        taus = TEMPERATURES if k > 1 else TEMPERATURES[1:2]  # one centroid: every temperature is the same blend
        settings += [(k, tau, beta, centroids, table, blend(p_val, h_val, centroids, table, beta, tau, pairwise))
                     for tau in taus for beta in BETAS]
    parts = [base_parts, *(prompt_parts(prep, s[-1], val) for s in settings)]
    quality = [quality_of(x, everything) for x in parts[1:]]
    best = int(np.argmax(quality))
    if quality[best] <= base:
        console.print(f"cluster prior chosen on validation: [bold]none[/] (no setting beats the student's "
                      f"{what}, {base:.4f})")
        return None, record
    k, tau, beta, centroids, table, _ = settings[best]
    rate = parts_win_rate(quality_of, out_of_fold_choice(parts, quality_of, seed), parts[0], seed=seed)
    record.update(best={"k": k, "temperature": tau, "beta": beta, "quality": round(quality[best], 4)},
                  win_rate=rate)
    if rate < MIN_WIN_RATE:
        console.print(f"cluster prior chosen on validation: [bold]none[/] (best k={k} tau={tau} beta={beta}: "
                      f"{what} {quality[best]:.4f} vs {base:.4f}; chosen out of fold, wins {rate:.1%} of resamples)")
        return None, record
    record["chosen"] = {"k": k, "temperature": tau, "beta": beta}
    console.print(f"cluster prior chosen on validation: [bold]k={k} tau={tau} beta={beta}[/] "
                  f"({what} {quality[best]:.4f} vs {base:.4f} without)")
    return ClusterPrior(centroids, table, beta, tau, strengths=pairwise), record
