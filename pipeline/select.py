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
of decided validation battles whose winner sigmoid(logit_a - logit_b) predicts (half a battle for equal
strengths, as in `evaluate`). It is built from per-prompt parts (`prompt_parts`, `measure`), so a choice
among candidates can mix them prompt by prompt and resample them without predicting again; group
smoothing, the cluster prior and a tune study's trials are all chosen by it.
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


def _battle_hits(prep, p: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `rows`: the decided battles (ties left out) whose winner the logit difference of `p`
    predicts, and the decided battles. Equal strengths earn half a battle, as in `metrics.win_accuracy`."""
    from .data import flat_battles

    strength = logit(p)
    owner, a, o, s = flat_battles([prep.battles[r] for r in rows])
    decided = s != 0.5
    owner, a, o, s = owner[decided], a[decided], o[decided], s[decided]
    winner, loser = np.where(s > 0.5, a, o), np.where(s > 0.5, o, a)
    w, lo = strength[owner, winner], strength[owner, loser]
    right = np.where(w == lo, 0.5, (w > lo).astype(float))
    return (np.bincount(owner, weights=right, minlength=len(rows)),
            np.bincount(owner, minlength=len(rows)).astype(float))


def outcome_parts(p: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`prompt_parts` of an N-model table: [the outcome of the observed model `p` ranks first, 1], or
    [0, 0] where no model is observed."""
    from .multi import pick

    j = pick(p, mask)
    ok = j >= 0
    return np.column_stack([np.where(ok, target[np.arange(len(p)), np.maximum(j, 0)], 0.0), ok])


def is_pair_measure(n_models: int, pair, pairwise: bool) -> bool:
    """The routing measure is the pair's APGR: outcomes (not battles) of exactly two models, a weak/strong pair."""
    return not pairwise and n_models == 2 and pair is not None


def parts_of(p: np.ndarray, target: np.ndarray, mask: np.ndarray, pair, battle_parts: np.ndarray | None = None):
    """`prompt_parts` from arrays (probabilities, targets and mask of the same prompts): `battle_parts`
    ([battles predicted, battles decided] per prompt) for pairwise data, the pair score for a weak/strong
    pair, else the argmax model's [outcome, 1]."""
    from .module import pair_score

    if battle_parts is not None:
        return battle_parts
    if is_pair_measure(target.shape[1], pair, False):
        return pair_score(p, pair)
    return outcome_parts(p, target, mask)


def measure_of(target: np.ndarray, mask: np.ndarray, pair, pairwise: bool) -> Callable[[np.ndarray, np.ndarray], float]:
    """quality(parts, positions) for `parts_of` those prompts: the pair's APGR, else a ratio of summed parts."""
    return pair_measure(target, mask, pair) if is_pair_measure(target.shape[1], pair, pairwise) else ratio_measure


def prompt_parts(prep, p: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per prompt of `rows`, what the routing measure of `p` (probabilities for `rows`) is made of: the pair
    score for a weak/strong pair; else [value, count] columns whose sums' ratio is the measure (the argmax
    model's outcome; pairwise data: battles predicted, battles decided). Candidates' parts can be mixed
    prompt by prompt (`out_of_fold_choice`) and resampled without predicting again."""
    battles = np.column_stack(_battle_hits(prep, p, rows)) if prep.battles is not None else None
    return parts_of(p, prep.target[rows], prep.mask[rows], prep.pair, battles)


def measure(prep, rows: np.ndarray) -> Callable[[np.ndarray, np.ndarray], float]:
    """quality(parts, positions): the routing measure on those positions of `rows` from their `prompt_parts`."""
    return measure_of(prep.target[rows], prep.mask[rows], prep.pair, prep.battles is not None)


def pair_measure(target: np.ndarray, mask: np.ndarray, pair: tuple[int, int]) -> Callable:
    """quality(pair scores, positions): APGR on the positions where both models are observed."""
    from .metrics import apgr

    w, s = pair
    both = mask[:, w] & mask[:, s]
    return lambda scores, i: float(apgr(scores[i][both[i]], target[i, w][both[i]], target[i, s][both[i]]))


def ratio_measure(parts: np.ndarray, i: np.ndarray) -> float:
    """quality([value, count] parts, positions): summed values over summed counts (0 with no count)."""
    count = parts[i, 1].sum()
    return float(parts[i, 0].sum() / count) if count else 0.0


def val_quality(prep, p: np.ndarray, rows: np.ndarray, resample: np.ndarray | None = None) -> float:
    """The routing measure of `p` (probabilities for `rows`), optionally on resampled positions of `rows`."""
    i = np.arange(len(rows)) if resample is None else resample
    return measure(prep, rows)(prompt_parts(prep, p, rows), i)


def measure_name(prep) -> str:
    if prep.battles is not None:
        return "win prediction on battles"
    return "APGR" if is_pair_measure(len(prep.models), prep.pair, False) else "mean outcome of the argmax model"


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


def parts_win_rate(quality: Callable[[np.ndarray, np.ndarray], float], parts: np.ndarray, base_parts: np.ndarray,
                   resamples: int = BOOTSTRAP, seed: int = 0) -> float:
    """Share of paired bootstrap resamples of the prompts where `parts` route better than `base_parts`
    (`prompt_parts` of the same rows; `quality` is their `measure`)."""
    a, b = np.asarray(parts), np.asarray(base_parts)
    return paired_win_rate(len(a), lambda i: quality(a, i) > quality(b, i), resamples, seed)


def bootstrap_win_rate(prep, p: np.ndarray, base: np.ndarray, rows: np.ndarray, seed: int = 0) -> float:
    """Share of paired bootstrap resamples of `rows` where `p` routes better than `base`."""
    return parts_win_rate(measure(prep, rows), prompt_parts(prep, p, rows), prompt_parts(prep, base, rows), seed=seed)


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
    record = {"rule": f"teacher head, {measure_name(prep)} of its out-of-fold predictions ({FOLDS} folds over the "
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
    passed_over = [f"{k} wins {r:.1%} of {BOOTSTRAP} paired resamples, under the {MIN_WIN_RATE:.0%} needed"
                   for k, r in record["win_rate"].items() if k != chosen and r < MIN_WIN_RATE]
    console.print(f"group smoothing chosen by {FOLDS}-fold cross-validation: [bold]{chosen or 'none'}[/] "
                  f"(the teacher head's out-of-fold {measure_name(prep)}: "
                  f"{', '.join(f'{_shown(k)} {v:.4f}' for k, v in record['candidates'].items())}"
                  + "".join(f"; {why}" for why in passed_over) + ")")
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
