"""Turn the canonical dataset's outcomes into training targets (docs/contracts.md, "Labels").

Per prompt and model, `target` in [0, 1]:
- 0/1 correctness (or its mean over duplicate prompts) is kept;
- numeric scores are normalised to [0, 1] with `score_range` when given, else with an inferred
  scale: values already in [0, 1] are kept, values in [1, 10] are a 1-10 judge (MT-Bench:
  (s - 1) / 9), anything else is min-max scaled (printed as a note);
- pairwise outcomes are already the mean battle score on the prompt (win 1, tie 0.5, loss 0). When one
  model is in every battle (a reference, AlpacaEval-style), its target is 0.5, a tie with itself: every
  other model's target is its score against the reference, and the reference's own mean score against
  the field would not compare with them (routing by it picks the reference for beating weak models);
- `threshold`, when set, then binarises every target (target >= threshold -> 1).

Per dataset: Bradley-Terry strengths for pairwise data (ties count half a win each way), tiers
(models ranked by strength, or by mean target without battles, cut into `tiers` equal groups:
weak, mid1..., strong), and the routing pair (`weak`/`strong`, or the lowest and highest ranked that
were both observed on enough train prompts, `_pair`).
The ranking reads the train split only (all prompts when it is empty): which models make the pair is
part of what every router is scored on, and must not come from test outcomes.
Per prompt: `difficulty` = 1 - mean target over observed models, and the Hybrid-LLM soft label
P[q(weak) >= q(strong) - t], which with one (averaged) observation per model is the indicator
target_weak >= target_strong - t. Splits follow the hash rule of docs/contracts.md, unless ingest
recorded the user's own (`--split-column`, or `--test-data` with train/val left to the hash rule).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .common import (ConfigError, DataError, arrow_table, atomic_dir, console, labels_dir, processed_dir, prompt_hash,
                     read_json, sha256_json, write_json)
from .baselines import ranked_rates
from .config import TEST_FRACTION, VAL_FRACTION, Config, LabelConfig, load_config
from .ingest import list_column, list_matrix

LABEL_VERSION = 7  # bump when labels for the same dataset and options change
MIN_PAIR_PROMPTS = 20  # train prompts on which both models of the default routing pair are observed
JUDGE_SCALE = (1.0, 10.0)
SMALL_SPLIT = 200  # fewer validation or test prompts than this and the label stage says its numbers are noisy
# With more models than this, the label table shows the weakest few, the strongest ten and the pair, and says
# where the rest is (a 150-model table was 150 console lines).
SHOWN_MODELS, SHOWN_WEAKEST, SHOWN_STRONGEST = 20, 5, 10


def split_of(prompt: str, test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION) -> str:
    """train | val | test for one prompt, by its sha256 (the rule in docs/contracts.md)."""
    h = prompt_hash(prompt)
    if int(h[:8], 16) / 0xFFFFFFFF < test_fraction:
        return "test"
    return "val" if int(h[8:16], 16) / 0xFFFFFFFF < val_fraction else "train"


def _splits(prompt_ids: list[str], test_fraction: float, val_fraction: float) -> np.ndarray:
    """`split_of` for many prompts at once: prompt_id is the first 16 hex digits of the same sha256."""
    words = np.frombuffer(bytes.fromhex("".join(prompt_ids)), dtype=">u4").reshape(-1, 2).astype(np.float64)
    test = words[:, 0] / 0xFFFFFFFF < test_fraction
    val = words[:, 1] / 0xFFFFFFFF < val_fraction
    return np.where(test, "test", np.where(val, "val", "train"))


def _dataset_splits(table: pa.Table, cfg: LabelConfig) -> tuple[np.ndarray, bool]:
    """The dataset's own `split` column where ingest wrote one (null: train or val by the hash rule,
    never test), else the hash rule; and whether validation was drawn from the column's train prompts.
    A user split with no val prompts (train and test only, the usual shape) gets them that way, by the
    hash rule, instead of a training that cannot start."""
    ids = table.column("prompt_id").to_pylist()
    if "split" not in table.column_names:
        return _splits(ids, cfg.test_fraction, cfg.val_fraction), False
    hashed = _splits(ids, 0.0, cfg.val_fraction)
    given = table.column("split").to_pylist()
    val_from_train = "val" not in given and "train" in given
    return np.array([h if g is None or (val_from_train and g == "train") else g
                     for g, h in zip(given, hashed)]), val_from_train


SPLIT_RULES = {"hash": "prompt hash", "column": "column {split_column!r}", "test_data": "test file {test_data[source]}"}


def split_by(manifest: dict) -> str:
    """How the dataset is split, in words (`hash` for datasets ingested before user splits existed)."""
    return SPLIT_RULES[manifest.get("split_rule") or "hash"].format(**manifest)


def training_split(split, prompt_ids, cfg: Config) -> np.ndarray:
    """Each prompt's split as training reads it: with `train.limit_train_prompts` = N, the N train prompts
    with the smallest prompt ids are kept and the others are "unused" (training, evaluate and report all
    fit on the same train prompts). Ids are content hashes, so the kept ones are a random sample whatever
    the file's order (a file sorted by task keeps every task), and a smaller N keeps a subset of a larger one."""
    split = np.array(split)
    if cfg.train.limit_train_prompts:
        train = np.flatnonzero(split == "train")
        by_id = train[np.argsort(np.asarray(prompt_ids, dtype=object)[train], kind="stable")]
        split[by_id[cfg.train.limit_train_prompts:]] = "unused"
    return split


def require_test_split(name: str) -> dict:
    """NAME's label stats, or a one-line DataError when its test split is empty (nothing to evaluate or report)."""
    _, stats = load_labels(name)
    if not stats["splits"].get("test"):
        raise DataError(f"the test split of {name!r} is empty (split by {stats.get('split_by', 'prompt hash')}): "
                        "nothing to evaluate or report")
    return stats


def battle_counts(a: np.ndarray, b: np.ndarray, n_models: int) -> np.ndarray:
    """[n_models, n_models] float: how many battles each pair of models fought (symmetric, either side)."""
    a, b, m = np.asarray(a, np.int64), np.asarray(b, np.int64), n_models
    games = np.bincount(a * m + b, minlength=m * m).reshape(m, m).astype(np.float64)
    return games + games.T


def bradley_terry(a: np.ndarray, b: np.ndarray, score_a: np.ndarray, n_models: int,
                  max_iter: int = 1000, tol: float = 1e-9) -> np.ndarray:
    """Log Bradley-Terry strengths (mean 0) from battles a vs b with a's score 1 / 0.5 / 0.

    The battles are summed once into an n_models x n_models table with `np.bincount`, so each MM
    iteration (Hunter 2004) costs O(n_models^2) whatever the number of battles. Each model also
    plays one virtual tie against a fixed reference of strength 1: it keeps strengths finite for a
    model that never wins (or never loses) and pins the scale; with real data it is negligible.
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    score_a = np.asarray(score_a, np.float64)
    m = n_models
    wins = np.bincount(a, weights=score_a, minlength=m) + np.bincount(b, weights=1 - score_a, minlength=m) + 0.5
    games = battle_counts(a, b, m)
    p = np.ones(m)
    for _ in range(max_iter):
        new = wins / ((games / (p[:, None] + p[None, :])).sum(axis=1) + 1.0 / (p + 1.0))
        done = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if done:
            break
    log_p = np.log(p)
    return log_p - log_p.mean()


def _normalise(outcome: np.ndarray, mask: np.ndarray, manifest: dict, cfg: LabelConfig, where) -> tuple[np.ndarray, dict]:
    """Targets in [0, 1] and a description of the scale used."""
    kind = manifest["outcome_kind"]
    seen = outcome[mask]
    lo, hi = float(seen.min()), float(seen.max())
    if kind == "winrate":
        scale = {"range": [0.0, 1.0], "rule": "mean battle score"}
    elif cfg.score_range is not None:
        rlo, rhi = cfg.score_range
        if rhi <= rlo:
            raise ConfigError(f"label.score_range must be increasing, got {list(cfg.score_range)}")
        if lo < rlo or hi > rhi:
            bad = np.flatnonzero(((outcome < rlo) | (outcome > rhi)).any(axis=1) & mask.any(axis=1))[0]
            raise DataError(f"outcome {lo:g}..{hi:g} outside label.score_range {list(cfg.score_range)} "
                            f"(first at prompt row {bad + 1})", file=where)
        scale = {"range": [rlo, rhi], "rule": "declared"}
    elif lo >= 0.0 and hi <= 1.0:
        scale = {"range": [0.0, 1.0], "rule": "already in [0, 1]"}
    elif lo >= JUDGE_SCALE[0] and hi <= JUDGE_SCALE[1]:
        scale = {"range": list(JUDGE_SCALE), "rule": "1-10 judge scale, (s - 1) / 9"}
    else:
        if hi == lo:
            raise DataError(f"every outcome is {lo:g}: nothing to learn", file=where)
        scale = {"range": [lo, hi], "rule": "min-max over the data"}
        console.print(f"[yellow]note:[/] scores in [{lo:g}, {hi:g}] are neither 0-1 nor a 1-10 judge scale; "
                      "min-max scaled (set label.score_range to declare the scale)")
    rlo, rhi = scale["range"]
    target = (outcome - rlo) / (rhi - rlo)
    if cfg.threshold is not None:
        target = (target >= cfg.threshold).astype(np.float64)
        scale["threshold"] = cfg.threshold
    return np.where(mask, target, 0.0), scale


def reference_model(in_battles: np.ndarray, n_battles: int) -> int | None:
    """The model in every battle (`in_battles`: battles per model), if there is one and it is not the only model."""
    if n_battles == 0 or len(in_battles) < 2:
        return None
    every = np.flatnonzero(in_battles == n_battles)
    return int(every[0]) if every.size == 1 else None


def _tiers(rank: np.ndarray, models: list[str], n_tiers: int) -> dict[str, str]:
    """Models ranked by `rank` cut into equal groups: weak, mid1, ..., strong."""
    n_tiers = min(n_tiers, len(models))
    names = ["weak"] + [f"mid{i}" for i in range(1, n_tiers - 1)] + ["strong"]
    tiers = {}
    for name, group in zip(names, np.array_split(np.argsort(rank, kind="stable"), n_tiers)):
        tiers.update({models[j]: name for j in group})
    return {m: tiers[m] for m in models}


def _priced(costs: Mapping[str, float | None] | None, models: list[str]) -> bool:
    return bool(costs) and all(costs.get(m) is not None for m in models)


def _pair(rank: np.ndarray, models: list[str], cfg: LabelConfig, costs: Mapping[str, float | None] | None,
          shared: np.ndarray) -> tuple[int, int, str]:
    """The routing pair and why it is that pair: the strongest model, and the weakest one or, when every
    model has a cost, the cheapest one (the weakest of equally cheap ones). A weakest model that costs
    more than a better one would make every weak call pay more for less.

    `shared` [m, m] counts the prompts (train split) on which both models are observed. In sparse data
    (votes between many models) the extremes of the ranking are often rare models that never met, and
    the pair's APGR would have no prompts to be measured on. So the pair must share MIN_PAIR_PROMPTS of
    them: the strongest model with the weakest (cheapest) partner that does, else the next strongest;
    when no pair does, the pair that shares the most. A model named by label.weak / label.strong is kept.
    """
    for chosen in (cfg.weak, cfg.strong):
        if chosen is not None and chosen not in models:
            raise ConfigError(f"label pair model {chosen!r} is not in the dataset (models: {', '.join(models)})")
    weak = models.index(cfg.weak) if cfg.weak is not None else None
    strong = models.index(cfg.strong) if cfg.strong is not None else None
    if weak is not None and weak == strong:
        raise ConfigError(f"label.weak and label.strong are the same model {cfg.weak!r}")
    if weak is not None and strong is not None:
        return weak, strong, "as named"
    order = [int(j) for j in np.argsort(rank, kind="stable")]  # weakest first
    priced = _priced(costs, models)
    # Stable sort: the weakest of equally cheap ones first.
    partners = sorted(order, key=lambda j: costs[models[j]]) if priced else order
    pairs = [(w, s) for s in ([strong] if strong is not None else reversed(order))
             for w in ([weak] if weak is not None else partners) if w != s]
    w, s = next(((w, s) for w, s in pairs if shared[w, s] >= MIN_PAIR_PROMPTS),
                max(pairs, key=lambda p: shared[p]))  # max keeps the first of equal counts
    if weak is not None or strong is not None:
        why = "as named"
    else:
        why = "the cheapest -> the strongest model" if priced else "the weakest -> the strongest model"
    if (w, s) != pairs[0]:
        why += (f" that share {MIN_PAIR_PROMPTS}+ train prompts" if shared[w, s] >= MIN_PAIR_PROMPTS
                else f" sharing the most train prompts ({shared[w, s]}; none share {MIN_PAIR_PROMPTS})")
    return w, s, why


def bundle_label_config(options: Mapping | None) -> LabelConfig | None:
    """A bundle's own label options (router.json `training_config.label`), so that data labeled for its
    report or comparison means what it meant in training; None (the defaults) when they no longer load."""
    try:
        return load_config(base={"label": dict(options or {})}).label
    except ConfigError:
        console.print("[yellow]note:[/] the bundle's label options do not load; labeling with the defaults")
        return None


def label(name: str, cfg: Optional[LabelConfig] = None, force: bool = False) -> dict:
    """Write data/processed/NAME/labels/ (dataset/, label_stats.json) and return the statistics."""
    cfg = cfg or LabelConfig()
    where = processed_dir(name)
    if not (where / "manifest.json").is_file():
        raise DataError(f"no ingested dataset {name!r} (run `prerouter ingest` first)", file=where)
    # One version of the dataset whatever an ingest of the same name does meanwhile (common.atomic_dir):
    # the manifest, prompts and battles are read from it, and the labels are written beside them.
    src = where.resolve()
    manifest = read_json(src / "manifest.json")
    options = cfg.model_dump(mode="json")
    content_hash = sha256_json({"dataset": manifest["content_hash"], "options": options, "version": LABEL_VERSION})
    stats_path = src / "labels" / "label_stats.json"
    if not force and stats_path.is_file():
        try:
            old = read_json(stats_path)
        except (OSError, ValueError):
            old = {}
        if old.get("content_hash") == content_hash:
            console.print(f"{name}: labels unchanged, skipping")
            return old

    import datasets

    datasets.disable_progress_bars()
    table = arrow_table(datasets.load_from_disk(str(src / "dataset")))
    models = manifest["models"]
    outcome = list_matrix(table, "outcome", np.float64)
    mask = list_matrix(table, "mask", bool)
    target, scale = _normalise(outcome, mask, manifest, cfg, where / "dataset")

    split, val_from_train = _dataset_splits(table, cfg)
    ranked = split == "train" if (split == "train").any() else np.ones(len(split), bool)
    observed = mask.sum(axis=0)
    mean_target = target.sum(axis=0) / np.maximum(observed, 1)
    strengths = reference = None
    per_model = {m: {"rate": float(mean_target[j]), "n": int(observed[j])} for j, m in enumerate(models)}
    rank = ranked_rates(target[ranked], mask[ranked])
    if manifest["layout"] == "pairwise":
        bt = arrow_table(datasets.load_from_disk(str(src / "battles")))
        a, b = (bt.column(c).to_numpy().astype(np.int64) for c in ("model_a", "model_b"))
        score_a = bt.column("score_a").to_numpy().astype(np.float64)
        row = pc.index_in(bt.column("prompt_id"), value_set=table.column("prompt_id")).to_numpy()
        in_ranked = ranked[row]
        log_p = bradley_terry(a[in_ranked], b[in_ranked], score_a[in_ranked], len(models))
        strengths = {m: float(log_p[j]) for j, m in enumerate(models)}
        # Pairwise rate: the share of its battles a model won, ties counting half.
        n = np.bincount(a, minlength=len(models)) + np.bincount(b, minlength=len(models))
        won = np.bincount(a, weights=score_a, minlength=len(models)) + np.bincount(b, weights=1 - score_a,
                                                                                minlength=len(models))
        per_model = {m: {"rate": float(won[j] / max(n[j], 1)), "n": int(n[j])} for j, m in enumerate(models)}
        rank = log_p
        reference = reference_model(n, len(a))
        if reference is not None:
            target[:, reference] = np.where(mask[:, reference], 0.5, 0.0)
    tiers = _tiers(rank, models, cfg.tiers)
    seen = mask[ranked].astype(np.int64)
    weak, strong, why = _pair(rank, models, cfg, manifest.get("costs"), shared=seen.T @ seen)

    n_obs = mask.sum(axis=1)
    difficulty = 1.0 - target.sum(axis=1) / np.maximum(n_obs, 1)
    both = mask[:, weak] & mask[:, strong]
    tw, ts = target[:, weak], target[:, strong]
    soft = np.where(both, (tw >= ts - cfg.relaxation - 1e-9).astype(np.float64), np.nan)
    # Fractions treat (possibly averaged) targets as success probabilities; exact for 0/1 data.
    balance = None
    if both.any():
        w, s = tw[both], ts[both]
        balance = {"both_right": float(np.mean(w * s)), "both_wrong": float(np.mean((1 - w) * (1 - s))),
                   "strong_only": float(np.mean(s * (1 - w))), "weak_only": float(np.mean(w * (1 - s))),
                   "n": int(both.sum()), "soft_label_mean": float(np.nanmean(soft))}

    ids = table.column("prompt_id").to_pylist()
    columns = {"prompt_id": table.column("prompt_id"), "prompt": table.column("prompt"),
               "target": list_column(target, pa.float32()), "mask": table.column("mask"),
               "split": pa.array(split, pa.string()), "difficulty": pa.array(difficulty.astype(np.float32)),
               "soft_label": pa.array(soft.astype(np.float32))}
    for col in manifest.get("metadata_columns", []):
        columns[col] = table.column(col)

    stats = {
        "name": name, "models": models, "n_prompts": int(len(ids)),
        "splits": {s: int((split == s).sum()) for s in ("train", "val", "test")},
        "split_rule": manifest.get("split_rule") or "hash", "split_by": split_by(manifest)
        + (", val drawn from its train prompts by prompt hash" if val_from_train else ""),
        "per_model": per_model, "strengths": strengths, "tiers": tiers,
        "reference": None if reference is None else models[reference],
        "pair": {"weak": models[weak], "strong": models[strong]}, "pair_rule": why, "balance": balance,
        "outcome_kind": manifest["outcome_kind"], "scale": scale,
        "dropped": manifest.get("dropped", {}), "costs": manifest.get("costs", {}),
        "options": options, "content_hash": content_hash,
    }
    with atomic_dir(src / "labels") as tmp:
        datasets.Dataset(pa.table(columns)).save_to_disk(str(tmp / "dataset"))
        write_json(tmp / "label_stats.json", stats)
    print_stats(stats)
    return stats


def labels_of(name: str, label_options: Mapping | None):
    """(labels Dataset, label stats) of the ingested dataset `name` for a bundle's report or comparison: its
    labels as they are, or, when it has none yet, labeled with the bundle's `label_options`. A name that is
    not an ingested dataset is a DataError."""
    if not (processed_dir(name) / "manifest.json").is_file():
        raise DataError(f"{name!r} is neither a data file nor a dataset under {processed_dir(name).parent}")
    if not (labels_dir(name) / "label_stats.json").is_file():
        label(name, bundle_label_config(label_options))
    return load_labels(name)


def load_labels(name: str, dataset_dir: Path | None = None):
    """(datasets.Dataset of labels, label_stats dict) written by `label(name)`, from one version.

    `dataset_dir`: the processed dataset's folder as the caller resolved it (`processed_dir(name).resolve()`),
    so that what it reads beside the labels (manifest, battles) is of the same version."""
    import datasets

    path = labels_dir(name)
    pinned = ((dataset_dir or path.parent.resolve()) / "labels").resolve()
    if not (pinned / "label_stats.json").is_file():
        raise DataError(f"no labels for {name!r} (run `prerouter label {name}` first)", file=path)
    return datasets.load_from_disk(str(pinned / "dataset")), read_json(pinned / "label_stats.json")


def shown_models(order: list[str], pair: tuple[str, str]) -> list[str]:
    """The models the label table shows, weakest first: all of them, or (past SHOWN_MODELS) the weakest
    SHOWN_WEAKEST, the strongest SHOWN_STRONGEST and the routing pair."""
    if len(order) <= SHOWN_MODELS:
        return list(order)
    keep = set(order[:SHOWN_WEAKEST]) | set(order[-SHOWN_STRONGEST:]) | set(pair)
    return [m for m in order if m in keep]


def print_stats(stats: dict) -> None:
    from rich.table import Table

    pair = stats["pair"]
    table = Table(title=f"labels: {stats['name']} ({stats['n_prompts']:,} prompts, {stats['outcome_kind']})")
    for col in ("model", "n", "rate", "cost", "tier") + (("BT strength",) if stats["strengths"] else ()):
        table.add_column(col, justify="left" if col in ("model", "tier") else "right")
    order = sorted(stats["models"], key=lambda m: (stats["strengths"] or {}).get(m, stats["per_model"][m]["rate"]))
    shown = shown_models(order, (pair["weak"], pair["strong"]))
    if len(shown) < len(order):
        table.caption = f"{len(shown)} of {len(order)} models shown; label_stats.json has every one"
    for i, m in enumerate(shown):
        skipped = order.index(m) - (order.index(shown[i - 1]) + 1 if i else 0)
        if skipped:
            table.add_row(f"… {skipped} more", *[""] * (len(table.columns) - 1))
        cost = stats["costs"].get(m)
        role = " (weak)" if m == pair["weak"] else " (strong)" if m == pair["strong"] else ""
        row = [m + role, f"{stats['per_model'][m]['n']:,}", f"{stats['per_model'][m]['rate']:.3f}",
               "-" if cost is None else f"{cost:.3g}", stats["tiers"][m]]
        if stats["strengths"]:
            row.append(f"{stats['strengths'][m]:+.3f}")
        table.add_row(*row)
    console.print(table)
    console.print("splits: " + ", ".join(f"{k} {v:,}" for k, v in stats["splits"].items())
                  + f" (by {stats.get('split_by', 'prompt hash')}); scale: {stats['scale']['rule']}")
    small = {k: n for k, n in stats["splits"].items() if k in ("val", "test") and n < SMALL_SPLIT}
    if small:
        # A mean over n prompts moves by about 1/(2√n) from chance alone (0/1 outcomes near 0.5).
        console.print("[yellow]note:[/] " + " and ".join(f"{k} has {n:,} prompts (±{0.5 / n ** 0.5:.2f})" if n
                                                        else f"{k} has no prompts" for k, n in small.items())
                      + ": what is chosen on validation and measured on test at this size moves by chance; "
                      f"a few hundred prompts per split ({SMALL_SPLIT}+) give stable numbers")
    if stats.get("reference"):
        console.print(f"reference: {stats['reference']} is in every battle; its target is 0.5 (a tie with itself), "
                      "the others' are their scores against it")
    if stats["balance"]:
        b = stats["balance"]
        console.print(f"pair {pair['weak']} -> {pair['strong']} ({stats['pair_rule']}; -s label.weak=A "
                      f"-s label.strong=B to choose) on {b['n']:,} prompts: both right {b['both_right']:.1%}, "
                      f"both wrong {b['both_wrong']:.1%}, strong only {b['strong_only']:.1%}, "
                      f"weak only {b['weak_only']:.1%}; soft label mean {b['soft_label_mean']:.3f}")
        if b["strong_only"] + b["weak_only"] < 1e-12:
            console.print(f"[yellow]note:[/] {pair['weak']} and {pair['strong']} have the same outcome on every "
                          "prompt both answered: routing between them cannot change quality (APGR is undefined)")
    if stats["dropped"]:
        console.print("dropped at ingest: " + ", ".join(f"{r} {c:,}" for r, c in stats["dropped"].items()))
