"""Label-free recalibration: refit a bundle's decision rules on unlabeled production prompts.

Strong-share thresholds (pair) and cost λs (N models) depend only on the distribution of the router's
scores, not on outcomes, so when traffic shifts they can be refitted on the traffic itself without
retraining. `calibrate(bundle, prompts, out)`:

1. scores the traffic with the bundle (int8, as served);
2. measures the shift between the scores the bundle was calibrated on and the traffic's, per output
   (each model's probability and the pair score): PSI over the reference's deciles and the KS
   statistic (largest gap between the two CDFs);
3. measures how far the old decision rules drift on the traffic (realised strong share per target,
   realised mean cost per budget);
4. refits thresholds at the same strong shares and λs at the same budgets, and writes a new bundle
   with the same model files, `decision` refitted, `decision.reference` the traffic's score
   quantiles (what the next calibration compares against), `calibration` recording the source,
   its sha256 and the previous bundle's seal, and conformance.jsonl written again (its decisions
   follow the thresholds and λs); the bundle is re-sealed and must verify on load.

The reference: training stores 101 quantiles of the validation scores per output in
`decision.reference` (`score_reference`); a bundle made before that falls back to its thresholds,
which are the validation pair score's deciles.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import DataError, atomic_dir, console, sha256_file, write_json
from .routing import model_costs, pair_score, relative_costs

LEVELS = 101  # quantiles 0, 1, ..., 100 %
PAIR_SCORE = "pair_score"
PSI_FLOOR = 1e-4  # an empty bin counts as this share (PSI is infinite otherwise)


# ---------------------------------------------------------------------------------------------
# The score reference (stored in router.json) and the shift statistics


def _quantiles(x: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in np.quantile(np.asarray(x, np.float64), np.linspace(0, 1, LEVELS))]


def score_reference(p: np.ndarray, models: Sequence[str], pair: tuple[int, int] | None, source: str = "validation") -> dict:
    """`decision.reference`: 101 quantiles of each output's probability (and of the pair score) on the
    prompts the decision rules were calibrated on."""
    p = np.asarray(p, np.float64)
    outputs = {m: _quantiles(p[:, j]) for j, m in enumerate(models)}
    if pair is not None:
        outputs[PAIR_SCORE] = _quantiles(pair_score(p, *pair))
    return {"source": source, "n": int(p.shape[0]), "levels": LEVELS, "quantiles": outputs}


def _reference_cdf(q: Sequence[float], levels: Sequence[float] | None = None):
    """F(x) of a distribution known by its quantiles q at `levels` (default 0..1 evenly): the share ≤ x."""
    q = np.asarray(q, np.float64)
    lv = np.linspace(0, 1, q.size) if levels is None else np.asarray(levels, np.float64)

    def cdf(x):
        # right-continuous on ties (the last level whose quantile is <= x), linear between quantiles,
        # clamped to the first / last level outside them
        x = np.asarray(x, np.float64)
        idx = np.searchsorted(q, x, side="right")
        lo, hi = np.clip(idx - 1, 0, q.size - 1), np.clip(idx, 0, q.size - 1)
        gap = q[hi] - q[lo]
        frac = np.where(gap > 0, (x - q[lo]) / np.where(gap > 0, gap, 1.0), 0.0)
        return np.where(idx == 0, lv[0], lv[lo] + frac * (lv[hi] - lv[lo]))
    return cdf


def shift(reference_q: Sequence[float], x: np.ndarray, levels: Sequence[float] | None = None) -> dict:
    """PSI (bins: the reference's deciles, so each holds a tenth of it) and KS between a reference known
    by its quantiles and a sample `x`."""
    q = np.asarray(reference_q, np.float64)
    lv = np.linspace(0, 1, q.size) if levels is None else np.asarray(levels, np.float64)
    x = np.sort(np.asarray(x, np.float64))
    cdf = _reference_cdf(q, lv)
    edges = np.interp(np.linspace(0.1, 0.9, 9), lv, q)
    expected = np.diff(np.r_[0.0, cdf(edges), 1.0])
    actual = np.diff(np.r_[0.0, np.searchsorted(x, edges, side="right") / x.size, 1.0])
    e, a = np.maximum(expected, PSI_FLOOR), np.maximum(actual, PSI_FLOOR)
    psi = float(np.sum((a - e) * np.log(a / e)))
    points = np.unique(np.r_[q, x])
    ks = float(np.max(np.abs(cdf(points) - np.searchsorted(x, points, side="right") / x.size)))
    return {"psi": psi, "ks": ks, "reference_median": float(np.interp(0.5, lv, q)), "traffic_median": float(np.median(x))}


def _psi_label(psi: float) -> str:
    return "none" if psi < 0.1 else "moderate" if psi < 0.25 else "large"


# ---------------------------------------------------------------------------------------------
# Traffic


def read_prompts(path: Path) -> list[str]:
    """The prompts of a traffic file, read as `prerouter score` reads its input (`read_prompt_records`: JSON
    lines, a JSON array, csv or parquet, with a `prompt` or `messages`)."""
    from .prompt_files import read_prompt_records

    path = Path(path)
    if not path.is_file():
        raise DataError("prompts file not found", file=path)
    prompts = [rec["prompt"] for rec in read_prompt_records(path)]
    if len(prompts) < 2:
        raise DataError(f"{len(prompts)} prompt(s): calibration needs a sample of traffic", file=path)
    return prompts


# ---------------------------------------------------------------------------------------------
# Entry point


def _mean_cost(p: np.ndarray, rel: np.ndarray, lam: float) -> float:
    from .metrics import choose

    return float(rel[choose(p, rel, lam)].mean())


def calibrate(bundle: str | Path, prompts: Path, out: Path, report: Path | None = None, log: bool = True) -> dict:
    """Refit `bundle`'s thresholds and λs on the unlabeled `prompts`; write the new bundle to `out` and
    calibration.md / calibration.json to `report` (default OUT.calibration beside it). Returns the report."""
    from .conformance import CONFORMANCE, seal_bundle, with_conformance
    from .export import check_bundle_dir
    from .metrics import calibrate_lambdas, calibrate_thresholds, realised_fractions, unreachable_fractions
    from .registry import resolve_bundle
    from .runtime import Router

    out = check_bundle_dir(Path(out))
    prompts = Path(prompts)
    texts = read_prompts(prompts)
    with resolve_bundle(bundle) as src:
        router = Router.load(src, verify=True)
        config = json.loads(json.dumps(router.config))
        decision = config["decision"]
        pair = None
        if decision.get("weak") in router.models and decision.get("strong") in router.models:
            pair = (router.models.index(decision["weak"]), router.models.index(decision["strong"]))
        if not decision.get("thresholds") and not decision.get("cost_lambdas"):
            raise DataError("the bundle's decision has no thresholds or cost λs to calibrate", file=src)
        console.print(f"scoring {len(texts):,} prompts of {prompts}")
        p = router.scores(texts)
        score = pair_score(p, *pair) if pair is not None else None

        result: dict = {"bundle": str(bundle), "out": str(out), "source": str(prompts), "n_prompts": len(texts),
                        "sha256": sha256_file(prompts)}
        # 1. score shift against the reference
        ref = decision.get("reference")
        shifts = {}
        if ref and ref.get("quantiles"):
            result["reference"] = {"source": ref.get("source"), "n": ref.get("n")}
            for name, q in ref["quantiles"].items():
                j = router.models.index(name) if name in router.models else None
                x = score if name == PAIR_SCORE else p[:, j] if j is not None else None
                if x is not None:
                    shifts[name] = shift(q, x)
        elif decision.get("thresholds") and score is not None:  # thresholds are the reference's pair-score deciles
            keys = sorted(decision["thresholds"], key=float)
            levels = np.array([1.0 - float(k) for k in keys])[::-1]
            q = np.array([decision["thresholds"][k] for k in keys])[::-1]
            result["reference"] = {"source": "the calibrated thresholds (deciles of the pair score)", "n": None}
            shifts[PAIR_SCORE] = shift(q, score, levels)
        result["shift"] = shifts

        # 2. drift of the old rules, 3. the refit
        new = dict(decision)
        if decision.get("thresholds") and score is not None:
            old = decision["thresholds"]
            fractions = sorted(float(k) for k in old)
            refit = calibrate_thresholds(score, fractions)
            before, after = realised_fractions(score, old), realised_fractions(score, refit)
            result["thresholds"] = {k: {"target": float(k), "old_threshold": old[k], "old_realised": before[k],
                                        "new_threshold": refit[k], "new_realised": after[k]} for k in refit}
            new["thresholds"] = refit
            missed = unreachable_fractions(after)
            new.pop("unreachable_fractions", None)
            if missed:
                new["unreachable_fractions"] = missed
        if decision.get("cost_lambdas"):
            rel = relative_costs(model_costs(config["models"]))
            old = decision["cost_lambdas"]
            refit = calibrate_lambdas(p, rel, sorted(float(k) for k in old))
            result["cost_lambdas"] = {k: {"budget": float(k), "old_lambda": old[k], "old_cost": _mean_cost(p, rel, old[k]),
                                          "new_lambda": refit[k], "new_cost": _mean_cost(p, rel, refit[k])}
                                      for k in refit}
            new["cost_lambdas"] = refit
            # λs over the index + 1 stand-ins mean little; say so (the default decision stays λ = 0 then)
            result["assumed_costs"] = [m["name"] for m in config["models"] if m.get("cost") is None]
        new["reference"] = score_reference(p, router.models, pair, source=f"calibrate: {prompts.name}")
        config["decision"] = new
        config["calibration"] = {"source": str(prompts), "sha256": result["sha256"], "n_prompts": len(texts),
                                 "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                 "previous_bundle_sha256": router.config.get("bundle_sha256"),
                                 "previous": router.config.get("calibration")}

        with atomic_dir(out) as tmp:
            for f in sorted(src.iterdir()):
                if f.is_file() and f.name not in ("router.json", CONFORMANCE):
                    shutil.copyfile(f, tmp / f.name)
            # The conformance vectors record decisions at the bundle's settings, which follow the refitted
            # thresholds and λs: written again from the new bundle, as export writes them.
            config = with_conformance(tmp, config)
            try:
                from .model_card import write_model_card

                write_model_card(tmp, config)
            except Exception as e:  # the card is documentation; the decision rules are what matter
                console.print(f"[yellow]model card not rewritten: {e}[/]")
            sealed = seal_bundle(tmp, config)
            Router.load(tmp, verify=True)  # a bundle that does not verify never replaces `out`
    result["bundle_sha256"] = sealed["bundle_sha256"]
    report = Path(report) if report else out.parent / f"{out.name}.calibration"
    report.mkdir(parents=True, exist_ok=True)
    write_json(report / "calibration.json", result)
    (report / "calibration.md").write_text(markdown(result))
    _print(result)
    console.print(f"[green]calibrated bundle[/] {out} (report {report / 'calibration.md'})")
    if log:
        _log(result, report)
    return result


def markdown(r: dict) -> str:
    lines = [f"# Recalibration on {r['n_prompts']:,} unlabeled prompts", "",
             f"- bundle: `{r['bundle']}` → `{r['out']}` (bundle_sha256 {r['bundle_sha256']})",
             f"- traffic: `{r['source']}` (sha256 {r['sha256']})"]
    if r.get("reference"):
        ref = r["reference"]
        lines.append(f"- reference: {ref['source']}" + (f", {ref['n']:,} prompts" if ref.get("n") else ""))
    if r["shift"]:
        lines += ["", "## Score shift, reference → traffic", "",
                  "PSI over the reference's deciles (< 0.1 none, 0.1–0.25 moderate, > 0.25 large) and the KS statistic.",
                  "", "| output | PSI | shift | KS | reference median | traffic median |", "|---|---:|---|---:|---:|---:|"]
        lines += [f"| {k} | {s['psi']:.3f} | {_psi_label(s['psi'])} | {s['ks']:.3f} | {s['reference_median']:.4f} | "
                  f"{s['traffic_median']:.4f} |" for k, s in r["shift"].items()]
    if "thresholds" in r:
        lines += ["", "## Strong-share thresholds", "", "| target share | old threshold | old realised on traffic | "
                  "new threshold | new realised |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {t['target']:.0%} | {t['old_threshold']:.4f} | {t['old_realised']:.1%} | {t['new_threshold']:.4f} | "
                  f"{t['new_realised']:.1%} |" for t in r["thresholds"].values()]
    if "cost_lambdas" in r:
        lines += ["", "## Cost λs (mean cost as a share of the priciest model's)", "",
                  "| budget | old λ | old cost on traffic | new λ | new cost |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['budget']:g} | {c['old_lambda']:.4f} | {c['old_cost']:.3f} | {c['new_lambda']:.4f} | "
                  f"{c['new_cost']:.3f} |" for c in r["cost_lambdas"].values()]
        if r.get("assumed_costs"):
            lines += ["", f"No known cost for {', '.join(r['assumed_costs'])}: the budgets above use index + 1 in "
                          "their place (router.json `models` order), so they rank by column order, not by price."]
    return "\n".join(lines) + "\n"


def _print(r: dict) -> None:
    for k, s in r["shift"].items():
        console.print(f"shift {k}: PSI {s['psi']:.3f} ({_psi_label(s['psi'])}), KS {s['ks']:.3f}")
    for t in r.get("thresholds", {}).values():
        console.print(f"strong share {t['target']:.0%}: old threshold realises {t['old_realised']:.1%}, "
                      f"refitted {t['new_realised']:.1%}")
    if r.get("assumed_costs"):
        console.print(f"[yellow]cost λs refitted over assumed costs (index + 1): no known cost for "
                      f"{', '.join(r['assumed_costs'])}[/]")


def _log(r: dict, report: Path) -> None:
    import mlflow

    from .common import setup_mlflow

    try:
        setup_mlflow()
        with mlflow.start_run(run_name="calibrate", nested=mlflow.active_run() is not None):
            mlflow.set_tags({"bundle": r["bundle"], "out": r["out"], "source": r["source"], "source_sha256": r["sha256"]})
            metrics = {f"shift_{k}_{s_k}": v for k, s in r["shift"].items() for s_k, v in s.items()
                       if s_k in ("psi", "ks")}
            metrics |= {f"share_{k}_{w}": t[f"{w}_realised"] for k, t in r.get("thresholds", {}).items()
                        for w in ("old", "new")}
            mlflow.log_metrics({k.replace("|", "_"): float(v) for k, v in metrics.items() if np.isfinite(v)})
            mlflow.log_artifacts(str(report), artifact_path="calibration")
    except Exception as e:
        console.print(f"[yellow]MLflow logging skipped: {e}[/]")
