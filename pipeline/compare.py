"""Champion against challenger: two bundles score the same labeled prompts, and a verdict says which ships.

`compare(champion, challenger, data)` scores the prompts (the dataset's test split, or every prompt of
a file given as held-out) with both bundles through the runtime, as a service would (int8 graphs),
and reports for each:

- the weak/strong pair (both bundles' routing pair when they share it, else the data's): APGR,
  CPT(50%), CPT(80%), and routed quality and cost when 20 / 50 / 80% of prompts go to the strong model
  (matched strong shares: the top share by each bundle's own score);
- N models: the mean outcome of the routed model (argmax over the observed models);
- pairwise data: per-battle win prediction, ties excluded (sigmoid of the logit difference);
- decision agreement between the two bundles.

Each difference (challenger − champion) has a paired bootstrap 95% interval: prompts are resampled
with replacement and both bundles are scored on the same resample. The verdict reads one primary
metric (APGR when there is a pair, else the routed outcome, else win accuracy): the challenger is
promoted only when the interval's lower bound is above −margin, i.e. it is not worse than the
champion by more than the margin with 95% confidence. Bundles with different model sets are compared
on the models they share (and the data has), and the report says so.

Writes compare.md and compare.json into the output folder and logs both to MLflow.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from .common import ConfigError, DataError, arrow_table, console, models_root, remove_dir, write_json
from .metrics import apgr, quality_at, routing_metrics, sent_to_strong
from .routing import model_costs, pair_score, relative_costs, sigmoid, threshold_curve, threshold_for

SHARES = (0.2, 0.5, 0.8)
METRICS = ("auto", "apgr", "routed", "win")
DEFAULT_MARGIN = 0.01
DEFAULT_RESAMPLES = 1000


# ---------------------------------------------------------------------------------------------
# The paired bootstrap


def paired_bootstrap(champion: Callable[[np.ndarray], float], challenger: Callable[[np.ndarray], float], n: int,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """Challenger − champion with a percentile interval from resampling the n prompts (paired: both
    metrics are computed on the same resample).

    `champion` and `challenger` map an index array (prompts, with repeats) to the metric on those
    prompts. Resamples where a metric is undefined (NaN, e.g. APGR without a quality gap) are left
    out and counted. Returns {champion, challenger, diff, lo, hi, level, resamples, undefined}.
    """
    if n < 1:
        raise ValueError("the bootstrap needs at least one prompt")
    every = np.arange(n)
    a, b = float(champion(every)), float(challenger(every))
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        diffs[i] = challenger(idx) - champion(idx)
    ok = np.isfinite(diffs)
    tail = (1.0 - level) / 2.0 * 100
    lo, hi = (np.percentile(diffs[ok], [tail, 100 - tail]) if ok.any() else (np.nan, np.nan))
    return {"champion": a, "challenger": b, "diff": b - a, "lo": float(lo), "hi": float(hi), "level": level,
            "resamples": int(ok.sum()), "undefined": int((~ok).sum())}


# ---------------------------------------------------------------------------------------------
# Metrics on index arrays (so the bootstrap can resample them)


# ---------------------------------------------------------------------------------------------
# Inputs


@contextlib.contextmanager
def _labeled(data: str, label_options: Mapping | None,
             read: Mapping | None = None) -> Iterator[tuple[object, dict, bool, str]]:
    """(labels Dataset, label stats, whole file held out?, dataset name) for a dataset name or a file.

    A file (or hf: id) is ingested (with `read`: ingest's layout, models, rename, prompts) and labeled under a
    temporary name, removed afterwards; every one of its prompts is held out. A name uses its test split."""
    from .common import processed_dir
    from .ingest_sources import read_options
    from .label import bundle_label_config, label, labels_of, load_labels

    if (options := read_options(data, read)) is not None:
        from .ingest import ingest

        name = f"_compare-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            ingest(data, name=name, **options)
            label(name, bundle_label_config(label_options))
            ds, stats = load_labels(name)
            yield ds, stats, True, name
        finally:
            remove_dir(processed_dir(name))
        return
    ds, stats = labels_of(data, label_options)
    yield ds, stats, False, data


def _pair_of(champion, challenger, stats: dict, shared: list[str], target, mask) -> tuple[tuple[str, str] | None, str]:
    """The (weak, strong) pair both bundles are compared on, and where it came from."""
    dc, dh = champion.decision, challenger.decision
    pc = (dc.get("weak"), dc.get("strong"))
    ph = (dh.get("weak"), dh.get("strong"))
    if pc == ph and None not in pc and set(pc) <= set(shared):
        return pc, "both bundles' routing pair"
    data_pair = stats.get("pair") or {}
    dp = (data_pair.get("weak"), data_pair.get("strong"))
    if None not in dp and set(dp) <= set(shared):
        return dp, "the data's pair (the bundles route between different pairs)"
    if len(shared) == 2:
        both = mask.all(1)
        means = target[both].mean(0) if both.any() else np.zeros(2)
        weak, strong = (0, 1) if means[0] <= means[1] else (1, 0)
        return (shared[weak], shared[strong]), "the two shared models, weaker and stronger on this data"
    return None, "no pair of models both bundles and the data share"


# ---------------------------------------------------------------------------------------------
# Sections


def _pair_section(routers: dict, probs: dict, names: list[str], pair: tuple[str, str], target, mask,
                  resamples: int, seed: int) -> dict | None:
    weak, strong = names.index(pair[0]), names.index(pair[1])
    rows = np.flatnonzero(mask[:, weak] & mask[:, strong])
    if rows.size < 2:
        return None
    yw, ys = target[rows, weak], target[rows, strong]
    score = {k: pair_score(p[rows], weak, strong) for k, p in probs.items()}
    out: dict = {"weak": pair[0], "strong": pair[1], "n": int(rows.size),
                 "per_bundle": {k: routing_metrics(s, yw, ys) for k, s in score.items()}}
    c, h = score["champion"], score["challenger"]

    def boot(fn):
        return paired_bootstrap(lambda i: fn(c[i], yw[i], ys[i]), lambda i: fn(h[i], yw[i], ys[i]), rows.size,
                                resamples, seed)

    out["diff"] = {"apgr": boot(apgr)}
    champion = routers["champion"]
    rel = relative_costs(model_costs(champion.config["models"])[[champion.models.index(n) for n in names]])
    out["shares"] = {}
    for f in SHARES:
        key = f"{f:g}"
        entry = {"cost": float((1 - f) * rel[weak] + f * rel[strong]),
                 "quality": {k: quality_at(s, yw, ys, f) for k, s in score.items()},
                 "agreement": float(np.mean(sent_to_strong(c, f) == sent_to_strong(h, f)))}
        entry["diff"] = boot(lambda s, w, st, f=f: quality_at(s, w, st, f))
        # each bundle's own calibrated threshold for this share, on these prompts
        entry["calibrated"] = {}
        for k, router in routers.items():
            d = router.decision
            if (d.get("weak"), d.get("strong")) == pair and d.get("thresholds"):
                sent = score[k] >= threshold_for(threshold_curve(d["thresholds"]), f)
                r = float(sent.mean())
                entry["calibrated"][k] = {"realised_share": r, "quality": float(np.where(sent, ys, yw).mean()),
                                          "cost": float((1 - r) * rel[weak] + r * rel[strong])}
        out["shares"][key] = entry
    out["diff"].update({f"quality@{k}": v["diff"] for k, v in out["shares"].items()})
    return out


def _multi_section(probs: dict, target, mask, resamples: int, seed: int) -> dict | None:
    from .multi import pick

    rows = np.flatnonzero(mask.any(1))
    if rows.size < 1:
        return None
    y, seen = target[rows], mask[rows]
    picked = {k: pick(p[rows], seen) for k, p in probs.items()}
    outcome = {k: y[np.arange(rows.size), j] for k, j in picked.items()}
    oracle = float(np.where(seen, y, -np.inf).max(1).mean())
    per_model = np.where(seen, y, np.nan)
    best_single = float(np.nanmax(np.nanmean(per_model, 0)))
    argmax = {k: np.argmax(p[rows], 1) for k, p in probs.items()}
    return {"n": int(rows.size), "quality": {k: float(v.mean()) for k, v in outcome.items()},
            "oracle": oracle, "best_single": best_single,
            "agreement": float(np.mean(argmax["champion"] == argmax["challenger"])),
            "diff": {"routed": paired_bootstrap(lambda i: float(outcome["champion"][i].mean()),
                                                lambda i: float(outcome["challenger"][i].mean()),
                                                rows.size, resamples, seed)}}


def _win_section(name: str, ids: list[str], logits: dict, names: list[str], data_models: list[str],
                 resamples: int, seed: int) -> dict | None:
    """Per-battle winner prediction on the compared prompts' battles between shared models (ties excluded)."""
    from datasets import load_from_disk

    from .common import processed_dir

    path = processed_dir(name) / "battles"
    if not path.exists():
        return None
    table = load_from_disk(str(path)).data
    row_of = {pid: i for i, pid in enumerate(ids)}
    bid = table.column("prompt_id").to_pylist()
    a_all, b_all = table.column("model_a").to_numpy(), table.column("model_b").to_numpy()
    score_a = table.column("score_a").to_numpy()
    to_shared = np.array([names.index(m) if m in names else -1 for m in data_models])
    row = np.array([row_of.get(p, -1) for p in bid], dtype=np.int64)
    a, b = to_shared[a_all], to_shared[b_all]
    keep = (row >= 0) & (a >= 0) & (b >= 0) & (score_a != 0.5)
    if not keep.any():
        return None
    row, a, b, won = row[keep], a[keep], b[keep], score_a[keep] > 0.5
    n = len(ids)
    per_prompt = np.bincount(row, minlength=n).astype(np.float64)
    right = {}
    for k, lg in logits.items():
        p_a = sigmoid(lg[row, a] - lg[row, b])
        right[k] = np.bincount(row, weights=((p_a > 0.5) == won).astype(np.float64), minlength=n)
    has = np.flatnonzero(per_prompt > 0)

    def acc(k):
        return lambda i: float(right[k][has[i]].sum() / per_prompt[has[i]].sum())

    return {"n_battles": int(keep.sum()), "n_prompts": int(has.size),
            "accuracy": {k: float(v.sum() / per_prompt.sum()) for k, v in right.items()},
            "diff": {"win": paired_bootstrap(acc("champion"), acc("challenger"), has.size, resamples, seed)}}


# ---------------------------------------------------------------------------------------------
# Entry point


def compare(champion: str | Path, challenger: str | Path, data: str, margin: float = DEFAULT_MARGIN,
            out: Path | None = None, metric: str = "auto", resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
            log: bool = True, read: Mapping | None = None) -> dict:
    """Score `data` with both bundles and decide; returns the result (its "verdict" is promote or keep).
    A data file is read with `read`, ingest's options ({"layout", "models", "rename", "prompts"}).

    `champion` / `challenger`: bundle folders or `models:/prerouter-NAME@ALIAS` URIs. Bad input
    (unreadable bundle, no shared models, no held-out prompts) is a DataError / ConfigError (exit 2)."""
    from .registry import resolve_bundle

    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not (0.0 <= margin < 1.0):
        raise ConfigError(f"--margin must be in [0, 1), got {margin}")
    if resamples < 100:
        raise ConfigError(f"--resamples must be at least 100, got {resamples}")
    with resolve_bundle(champion) as c_path, resolve_bundle(challenger) as h_path:
        from .runtime import Router

        routers = {"champion": Router.load(c_path), "challenger": Router.load(h_path)}
        label_options = routers["champion"].config.get("training_config", {}).get("label")
        with _labeled(data, label_options, read) as (ds, stats, held_out, name):
            result = _compare(routers, ds, stats, held_out, name, data, margin, metric, resamples, seed)
    result["champion"], result["challenger"] = str(champion), str(challenger)
    out = Path(out) if out else models_root() / "compare" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", result)
    (out / "compare.md").write_text(markdown(result))
    _print(result)
    console.print(f"report: {out / 'compare.md'}")
    if log:
        _log(result, out)
    return result


def _compare(routers: dict, ds, stats: dict, held_out: bool, name: str, data: str, margin: float, metric: str,
             resamples: int, seed: int) -> dict:
    from .ingest import list_matrix

    table = arrow_table(ds)
    data_models = list(stats["models"])
    c_models, h_models = routers["champion"].models, routers["challenger"].models
    shared = [m for m in c_models if m in h_models and m in data_models]
    notes = []
    if set(c_models) != set(h_models):
        notes.append(f"the bundles route between different models (champion: {', '.join(c_models)}; challenger: "
                     f"{', '.join(h_models)}): compared on the {len(shared)} they share"
                     + (" and the data has" if any(m not in data_models for m in c_models if m in h_models) else ""))
    elif len(shared) < len(c_models):
        notes.append(f"the data has outcomes for {len(shared)} of the bundles' {len(c_models)} models: "
                     f"compared on {', '.join(shared)}")
    if len(shared) < 2:
        raise DataError(f"fewer than two models are shared by both bundles and the data (champion: {c_models}, "
                        f"challenger: {h_models}, data: {data_models})", file=data)
    split = np.asarray(table.column("split").to_pylist())
    rows = np.arange(len(split)) if held_out else np.flatnonzero(split == "test")
    if rows.size == 0:
        raise DataError(f"dataset {name!r} has no test prompts to compare on; pass a held-out file as --data")
    cols = [data_models.index(m) for m in shared]
    target = list_matrix(table, "target", np.float64)[rows][:, cols]
    mask = list_matrix(table, "mask", bool)[rows][:, cols]
    keep = mask.any(1)
    rows, target, mask = rows[keep], target[keep], mask[keep]
    if rows.size < 2:
        raise DataError(f"fewer than two held-out prompts have an outcome for the shared models {shared}", file=data)
    prompts = table.column("prompt").to_pylist()
    ids = table.column("prompt_id").to_pylist()
    prompts, ids = [prompts[r] for r in rows], [ids[r] for r in rows]
    dataset_hash = stats.get("content_hash")
    for k, router in routers.items():
        if not held_out and router.config.get("data_hash") not in (None, dataset_hash):
            notes.append(f"the {k} was trained on other data than {name!r}: its training prompts may include "
                         "some of these test prompts")
    console.print(f"scoring {len(prompts):,} prompts with both bundles")
    logits = {k: r.logits(prompts).astype(np.float64)[:, [r.models.index(m) for m in shared]]
              for k, r in routers.items()}
    probs = {k: sigmoid(lg) for k, lg in logits.items()}

    pair, pair_source = _pair_of(routers["champion"], routers["challenger"], stats, shared, target, mask)
    result: dict = {"data": data, "dataset": None if held_out else name,
                    "prompts": "every prompt of the file (held out)" if held_out else "the test split",
                    "n_prompts": int(rows.size), "models": shared, "notes": notes, "margin": margin,
                    "resamples": resamples, "seed": seed,
                    "bundles": {k: {"name": r.config.get("name"), "models": r.models,
                                    "bundle_sha256": r.config.get("bundle_sha256"),
                                    "data_hash": r.config.get("data_hash")} for k, r in routers.items()}}
    if pair is not None:
        section = _pair_section(routers, probs, shared, pair, target, mask, resamples, seed)
        if section is not None:
            result["pair"] = section | {"source": pair_source}
    if len(shared) > 2:
        section = _multi_section(probs, target, mask, resamples, seed)
        if section is not None:
            result["multi"] = section
    win = _win_section(name, ids, logits, shared, data_models, resamples, seed)
    if win is not None:
        result["win"] = win
    result |= _verdict(result, metric, margin)
    return result


def _verdict(result: dict, metric: str, margin: float) -> dict:
    available = {"apgr": ("pair", "apgr"), "routed": ("multi", "routed"), "win": ("win", "win")}
    order = ["apgr", "routed", "win"] if metric == "auto" else [metric]
    for m in order:
        section, key = available[m]
        if section in result and key in result[section]["diff"]:
            d = result[section]["diff"][key]
            if np.isfinite(d["lo"]):
                break
    else:
        raise DataError(f"no {'metric' if metric == 'auto' else metric} can be computed on this data "
                        "(no pair with both models observed, no N-model outcomes, no battles)")
    promote = bool(d["lo"] > -margin)
    reason = (f"challenger − champion {m} = {d['diff']:+.4f}, 95% interval [{d['lo']:+.4f}, {d['hi']:+.4f}]: "
              + (f"the lower bound is above −{margin:g}, so the challenger is not worse by more than the margin"
                 if promote else f"the lower bound is at or below −{margin:g}: the challenger may be worse by more "
                                 "than the margin"))
    return {"metric": m, "verdict": "promote" if promote else "keep", "reason": reason}


# ---------------------------------------------------------------------------------------------
# Output


def _ci(d: dict) -> str:
    return f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def markdown(r: dict) -> str:
    lines = [f"# Champion vs challenger: {'**promote**' if r['verdict'] == 'promote' else '**keep the champion**'}",
             "", f"- champion: `{r['champion']}`", f"- challenger: `{r['challenger']}`",
             f"- data: `{r['data']}`, {r['prompts']}: {r['n_prompts']:,} prompts; models compared: "
             f"{', '.join(r['models'])}",
             f"- verdict on **{r['metric']}**, margin {r['margin']:g}: {r['reason']}",
             f"- intervals: paired bootstrap over prompts, {r['resamples']} resamples, 95%"]
    lines += [f"- note: {n}" for n in r["notes"]]
    if "pair" in r:
        p = r["pair"]
        lines += ["", f"## Pair {p['weak']} → {p['strong']} ({p['n']:,} prompts; {p['source']})", "",
                  "| metric | champion | challenger | challenger − champion [95% CI] |", "|---|---:|---:|---|"]
        pb = p["per_bundle"]
        lines.append(f"| APGR | {pb['champion']['apgr']:.4f} | {pb['challenger']['apgr']:.4f} | {_ci(p['diff']['apgr'])} |")
        for key in ("cpt50", "cpt80"):
            lines.append(f"| {key.upper().replace('CPT', 'CPT(')}%) | {pb['champion'][key]:.3f} | "
                         f"{pb['challenger'][key]:.3f} | |")
        lines += ["", "Routed quality and cost at matched strong shares (each bundle sends its own top share):", "",
                  "| strong share | cost (of the priciest) | champion quality | challenger quality | "
                  "difference [95% CI] | decisions agree |", "|---:|---:|---:|---:|---|---:|"]
        for k, s in p["shares"].items():
            lines.append(f"| {float(k):.0%} | {s['cost']:.3f} | {s['quality']['champion']:.4f} | "
                         f"{s['quality']['challenger']:.4f} | {_ci(s['diff'])} | {s['agreement']:.1%} |")
        calibrated = [(k, b, v) for k, s in p["shares"].items() for b, v in s["calibrated"].items()]
        if calibrated:
            lines += ["", "At each bundle's own calibrated threshold for that share:", "",
                      "| target | bundle | realised share | quality | cost |", "|---:|---|---:|---:|---:|"]
            lines += [f"| {float(k):.0%} | {b} | {v['realised_share']:.1%} | {v['quality']:.4f} | {v['cost']:.3f} |"
                      for k, b, v in calibrated]
    if "multi" in r:
        m = r["multi"]
        lines += ["", f"## {len(r['models'])} models: mean outcome of the routed model ({m['n']:,} prompts)", "",
                  "| champion | challenger | challenger − champion [95% CI] | best single | oracle | argmax agrees |",
                  "|---:|---:|---|---:|---:|---:|",
                  f"| {m['quality']['champion']:.4f} | {m['quality']['challenger']:.4f} | {_ci(m['diff']['routed'])} | "
                  f"{m['best_single']:.4f} | {m['oracle']:.4f} | {m['agreement']:.1%} |"]
    if "win" in r:
        w = r["win"]
        lines += ["", f"## Win prediction ({w['n_battles']:,} battles on {w['n_prompts']:,} prompts, ties excluded)",
                  "", "| champion | challenger | challenger − champion [95% CI] |", "|---:|---:|---|",
                  f"| {w['accuracy']['champion']:.4f} | {w['accuracy']['challenger']:.4f} | {_ci(w['diff']['win'])} |"]
    return "\n".join(lines) + "\n"


def _print(r: dict) -> None:
    for n in r["notes"]:
        console.print(f"[yellow]note:[/] {n}")
    colour = "green" if r["verdict"] == "promote" else "red"
    console.print(f"[bold {colour}]{'promote the challenger' if r['verdict'] == 'promote' else 'keep the champion'}"
                  f"[/]: {r['reason']}")


def flat_metrics(r: dict) -> dict[str, float]:
    out = {}
    for section in ("pair", "multi", "win"):
        for key, d in r.get(section, {}).get("diff", {}).items():
            base = key.replace("@", "_at_")
            for part in ("champion", "challenger", "diff", "lo", "hi"):
                if np.isfinite(d[part]):
                    out[f"{base}_{part}"] = float(d[part])
    return out


def _log(r: dict, out: Path) -> None:
    import mlflow

    from .common import setup_mlflow

    try:
        setup_mlflow()
        nested = mlflow.active_run() is not None
        with mlflow.start_run(run_name="compare", nested=nested):
            mlflow.set_tags({"verdict": r["verdict"], "metric": r["metric"], "data": r["data"],
                             "champion": r["champion"], "challenger": r["challenger"]})
            mlflow.log_params({"margin": r["margin"], "resamples": r["resamples"], "n_prompts": r["n_prompts"]})
            mlflow.log_metrics(flat_metrics(r) | {"promote": float(r["verdict"] == "promote")})
            mlflow.log_artifacts(str(out), artifact_path="compare")
    except Exception as e:  # the tracking store is a record, never a reason to lose the verdict
        console.print(f"[yellow]MLflow logging skipped: {e}[/]")
