"""Settings that depend on the data, chosen by the pipeline on the validation split.

`train.group_by: auto` (the default): every categorical metadata column (2 or more values, at least
10 train prompts per value on average) is a candidate for group smoothing (`data.group_smoothed`);
pairwise data has none, since its nets fit the battles, not the smoothed targets.
The teacher head, seconds on cached embeddings, is fitted without smoothing and with each
candidate's, in 5-fold cross-validation over the train and validation prompts: one validation split
(10% of the prompts) is too small to see a gain of this size, and out-of-fold predictions judge on
all of them. A candidate replaces "none" only when it routes better in at least 90% of paired
bootstrap resamples of those prompts, so a noise-level gain never changes the defaults. The chosen
smoothing is then fitted on the real split. The choice and every candidate's cross-validated
quality go into the training run and into router.json (`selection`).

Validation quality (`val_quality`) is the routing measure of the data: APGR for a weak/strong pair of
two models, the mean outcome of each prompt's argmax model for more, and for pairwise data the share
of validation battles whose winner sigmoid(logit_a - logit_b) predicts.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .common import console
from .routing import logit

BOOTSTRAP = 200
MIN_WIN_RATE = 0.9
MIN_PER_GROUP = 10  # train prompts per group value, on average
FOLDS = 5  # cross-validation folds over train + validation for the group choice
CHOICE_FOLDS = 10  # validation folds of `out_of_fold_choice`: each fold's choice sees 90% of validation
NO_GROUP = "(none)"  # the no-smoothing candidate in the selection record; never a column candidate


def group_candidates(columns: dict[str, list], train: np.ndarray) -> dict[str, list[str]]:
    """Metadata columns usable as groups: string values per prompt, keyed by column name."""
    out = {}
    n_train = int(train.sum())
    for name, values in columns.items():
        if name == NO_GROUP:
            continue
        values = ["" if v is None else str(v) for v in values]
        distinct = len({v for v, t in zip(values, train) if t})
        if 2 <= distinct <= n_train / MIN_PER_GROUP:
            out[name] = values
    return out


def _battle_parts(prep, p: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per battle of `rows` (ties left out): whether the logit difference predicts the winner, and its row."""
    from .data import flat_battles

    strength = logit(p)
    owner, a, o, s = flat_battles([prep.battles[r] for r in rows])
    decided = s != 0.5
    owner, a, o, s = owner[decided], a[decided], o[decided], s[decided]
    return (strength[owner, a] > strength[owner, o]) == (s > 0.5), owner


def _battle_hits(prep, p: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `rows`: the decided battles whose winner `p` predicts, and the decided battles."""
    right, owner = _battle_parts(prep, p, rows)
    return (np.bincount(owner, weights=right.astype(float), minlength=len(rows)),
            np.bincount(owner, minlength=len(rows)).astype(float))


def val_quality(prep, p: np.ndarray, rows: np.ndarray, resample: np.ndarray | None = None) -> float:
    """The routing measure of `p` (probabilities for `rows`), optionally on resampled positions of `rows`."""
    from .metrics import apgr
    from .module import pair_score
    from .multi import routed

    i = np.arange(len(rows)) if resample is None else resample
    if prep.battles is not None:
        hits, counts = _battle_hits(prep, p, rows)
        return float(hits[i].sum() / max(counts[i].sum(), 1.0))
    t, m = prep.target[rows][i], prep.mask[rows][i]
    if len(prep.models) == 2 and prep.pair is not None:
        w, s = prep.pair
        both = m[:, w] & m[:, s]
        return float(apgr(pair_score(p[i][both], prep.pair), t[both, w], t[both, s]))
    return routed(p[i], t, m)[1]


def paired_win_rate(n: int, beats: Callable[[np.ndarray], bool], resamples: int = BOOTSTRAP,
                    seed: int = 0) -> float:
    """Share of paired bootstrap resamples of `n` validation prompts where `beats(i)` holds, `i` the
    resampled positions (the same for candidate and base). A candidate replaces the default at
    >= MIN_WIN_RATE: the rule for group smoothing, the cluster prior (`prior.py`) and a tune study's
    chosen trial (`tune_results.py`)."""
    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(resamples):
        i = rng.integers(n, size=n)
        wins += beats(i)
    return wins / resamples


def out_of_fold_choice(candidates: list[np.ndarray], quality: Callable[[np.ndarray, np.ndarray], float],
                       seed: int = 0, folds: int = CHOICE_FOLDS) -> np.ndarray:
    """`candidates[0]` (the default) with each fold's positions taken from the candidate that scores best on
    the other folds (`quality(candidate, positions)`; ties keep the default): a choice its own positions
    did not make, so it can be tested on them against the default. Testing the best of many candidates on
    the prompts that picked it instead passes by luck: the keep rule of the cluster prior and of a tune
    study's trial."""
    fold = np.random.default_rng(seed).permutation(len(candidates[0])) % folds
    out = candidates[0].copy()
    for f in range(folds):
        rest, held = np.flatnonzero(fold != f), fold == f
        best = int(np.argmax([quality(c, rest) for c in candidates]))
        out[held] = candidates[best][held]
    return out


def bootstrap_win_rate(prep, p: np.ndarray, base: np.ndarray, rows: np.ndarray, seed: int = 0) -> float:
    """Share of paired bootstrap resamples of `rows` where `p` routes better than `base`."""
    if prep.battles is not None:
        # Per-row hits once (a Python pass over the battles); both share the resample's battle count, so
        # comparing hit sums is comparing accuracies.
        hits_p, hits_base = _battle_hits(prep, p, rows)[0], _battle_hits(prep, base, rows)[0]
        return paired_win_rate(len(rows), lambda i: hits_p[i].sum() > hits_base[i].sum(), seed=seed)
    return paired_win_rate(len(rows), lambda i: val_quality(prep, p, rows, i) > val_quality(prep, base, rows, i),
                           seed=seed)


def choose_group_by(prep, cfg, workdir: Path):
    """Judge no smoothing and each candidate column by the teacher head's out-of-fold quality over the
    train and validation prompts (FOLDS folds); fit the winner on the real split.

    Returns (teacher net, config with `train.group_by` resolved, selection record). Leaves the chosen
    targets in `prep.fit_target` and the chosen teacher's probabilities in `prep.teacher_prob`."""
    from .train import fit_teacher

    candidates = [(None, None), *prep.group_columns.items()]
    if prep.battles is not None or len(candidates) == 1:  # nothing to choose
        prep.fit_target = prep.target
        why = ("pairwise data: the nets fit the battles, which smoothing outcome targets does not change"
               if prep.battles is not None else "no categorical metadata column to smooth by")
        record = {"rule": why, "candidates": {}, "group_by": None}
        resolved = cfg.model_copy(update={"train": replace_group(cfg.train, None)})
        return fit_teacher(prep, cfg, workdir), resolved, record
    with tempfile.TemporaryDirectory(prefix="prerouter-select-") as scratch:  # the folds' heads are not kept
        pool, oof = _out_of_fold(prep, cfg, Path(scratch), candidates)
    quality = {name: val_quality(prep, p, pool) for name, p in oof.items()}
    record = {"rule": f"teacher head, {_measure(prep)} of its out-of-fold predictions ({FOLDS} folds over the "
                      f"train and validation prompts); a group replaces none when it wins in >= {MIN_WIN_RATE:.0%} "
                      f"of {BOOTSTRAP} paired bootstrap resamples",
              "candidates": {NO_GROUP if k is None else k: round(v, 4) for k, v in quality.items()}, "win_rate": {}}
    chosen = None
    for name in prep.group_columns:
        if quality[name] <= quality[chosen]:
            continue
        rate = bootstrap_win_rate(prep, oof[name], oof[None], pool)
        record["win_rate"][name] = rate
        if rate >= MIN_WIN_RATE:
            chosen = name
    prep.fit_target = _fit_target(prep, dict(candidates)[chosen], prep.split == "train", cfg)
    net = fit_teacher(prep, cfg, workdir)
    record["group_by"] = chosen
    console.print(f"group smoothing chosen by {FOLDS}-fold cross-validation: [bold]{chosen or 'none'}[/] "
                  f"({', '.join(f'{_shown(k)}: {v:.4f}' for k, v in record['candidates'].items())})")
    resolved = cfg.model_copy(update={"train": replace_group(cfg.train, chosen)})
    return net, resolved, record


def _out_of_fold(prep, cfg, workdir: Path, candidates) -> tuple[np.ndarray, dict]:
    """(the train and validation rows, each candidate's teacher probabilities for them), every row
    predicted by a head that did not train on it. Smoothing uses each fold's own train rows only."""
    from .train import fit_teacher

    real = prep.split
    pool = np.flatnonzero((real == "train") | (real == "val"))
    fold = np.random.default_rng(cfg.train.seed).permutation(len(pool)) % FOLDS
    oof = {name: np.zeros((len(pool), len(prep.models)), np.float32) for name, _ in candidates}
    try:
        for f in range(FOLDS):
            split = real.copy()
            split[pool] = "train"
            split[pool[fold == f]] = "val"  # early stopping and prediction on the held-out fold
            prep.split = split
            for name, groups in candidates:
                prep.fit_target = _fit_target(prep, groups, split == "train", cfg)
                fit_teacher(prep, cfg, workdir / f"{name or 'none'}-fold{f}")
                oof[name][fold == f] = prep.teacher_prob[pool[fold == f]]
    finally:
        prep.split = real
    return pool, oof


def _fit_target(prep, groups: list[str] | None, train: np.ndarray, cfg) -> np.ndarray:
    """What the nets fit: the raw targets, or with `groups`, the `train` rows smoothed toward their group's rate."""
    from .data import group_smoothed

    return prep.target if groups is None else group_smoothed(prep.target, prep.mask, groups, train,
                                                             cfg.train.group_smoothing)


def _shown(candidate: str) -> str:
    return "no smoothing" if candidate == NO_GROUP else candidate


def replace_group(train_cfg, column: str | None):
    return train_cfg.model_copy(update={"group_by": column})


def _measure(prep) -> str:
    if prep.battles is not None:
        return "win prediction on battles"
    return "APGR" if len(prep.models) == 2 and prep.pair is not None else "mean outcome of the argmax model"
