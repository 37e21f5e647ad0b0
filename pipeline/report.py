"""Routing report: how a bundle routes a labeled test set, scored the way a service would score it.

`report(bundle, data)` writes `report.md` with PNG figures (and `report.json` with every number)
into a folder beside the bundle, and logs the folder to MLflow:

- pair routing: quality vs strong-call share of the router beside random, prompt-length, TF-IDF +
  logistic regression, k-nearest-neighbour, matrix-factorisation and cluster-router baselines; APGR,
  CPT(50%), CPT(80%); always-weak, always-strong and the oracle marked;
- N models: the λ sweep's cost–quality points (the cluster router's α sweep), RouterBench's AIQ,
  quality at cost budgets, the best single model and the oracle;
- calibration drift: each calibrated target (strong-call share, cost budget) against what it
  realises on this data;
- a breakdown by metadata column (subject, category, eval_name, family, dataset);
- router vs cascade vs ensemble economics from `pipeline.simulate`, with the bundle's measured
  decision latency.

The tables and figures are drawn by `pipeline.report_figures`; the bundle's model card is written by
`pipeline.model_card` (re-exported here, where the exporter imports it from).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from .common import DataError, arrow_table, flatten
from .multi import BUDGETS
from .routing import model_costs, pair_score, relative_costs
from .report_figures import (breakdown_rows, breakdown_table, drift_table, multi_table, pair_table, plot_cost_quality,
                             plot_pair_curves)

PAIR_FRACTIONS = np.linspace(0.0, 1.0, 51)  # operating points of the pair router in the simulation
RANDOM_SEEDS = 10  # the random router is averaged over this many seeds


def _load_data(data: str, training_config: Mapping, read: Mapping | None = None):
    """(name, labels Dataset, label stats): a labeled dataset name, or a data file ingested (with `read`:
    ingest's layout, models, rename, prompts) and labeled here."""
    from .ingest_sources import read_options
    from .label import bundle_label_config, label, labels_of, load_labels

    if (options := read_options(data, read)) is None:
        return data, *labels_of(data, training_config.get("label"))
    from .ingest import ingest

    name = ingest(data, **options).name
    label(name, bundle_label_config(training_config.get("label")))
    return name, *load_labels(name)


class _Columns:
    """The labeled table as arrays, with target and mask columns in the bundle's model order."""

    def __init__(self, ds, stats: Mapping, models: Sequence[str], metadata: Sequence[str] = ()):
        table = arrow_table(ds)
        missing = [m for m in models if m not in stats["models"]]
        if missing:
            raise DataError(f"the bundle routes between {list(models)} but the data has no outcomes for {missing} "
                            f"(its models: {stats['models']})")
        cols = [stats["models"].index(m) for m in models]

        def matrix(name, dtype):
            col = table.column(name).combine_chunks()
            return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(table), -1)[:, cols]

        self.prompts = table.column("prompt").to_pylist()
        self.ids = table.column("prompt_id").to_pylist()
        self.target = matrix("target", np.float64)
        self.mask = matrix("mask", bool)
        self.split = np.asarray(table.column("split").to_pylist())
        # Scalar columns only: a nested one (Arena's `openai_moderation` record) would print as dict text.
        self.meta = {c: table.column(c).to_pylist() for c in metadata if c in table.column_names
                     and not pa.types.is_nested(table.column(c).type)}


def _model_costs(router_json: Mapping) -> np.ndarray:
    """Bundle costs in model order; unknown costs count as index + 1, as the decision rule assumed."""
    return model_costs(router_json["models"])


def _embeddings(cols: _Columns, cfg) -> tuple[np.ndarray, str]:
    """Teacher embeddings of every prompt, read as training and evaluate read it (shared templates
    shortened, so the cache training filled has them), else TF-IDF + SVD features."""
    try:
        from .encoders import teacher_embeddings, teacher_inputs

        _, texts, ids = teacher_inputs(cols.prompts, cols.ids, cols.split, cfg)
        t = cfg.teacher  # the bundle's: its device is the training machine's, so this one picks its own (auto)
        return teacher_embeddings(texts, ids, t.path, t.max_tokens, t.batch_size,
                                  pooling=t.pooling), "teacher embeddings"
    except ImportError:  # a serving-only install without torch
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        x = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit_transform(cols.prompts)
        dim = max(2, min(128, x.shape[1] - 1))
        return TruncatedSVD(dim, random_state=0).fit_transform(x), "TF-IDF + SVD features (no torch for the teacher)"


def _pair_section(cols, p, train, test, weak, strong, emb, costs, known_costs: bool, figdir: Path,
                  title: str) -> tuple[list[str], dict]:
    from . import baselines as bl
    from .metrics import quality_curve, routing_metrics

    both_te = test[cols.mask[test, weak] & cols.mask[test, strong]]
    both_tr = train[cols.mask[train, weak] & cols.mask[train, strong]]
    if len(both_te) < 2:
        return ["_Too few test prompts with both pair models observed for a quality curve._"], {}
    yw, ys = cols.target[both_te, weak], cols.target[both_te, strong]
    pos = {r: i for i, r in enumerate(test)}
    pt = p[[pos[r] for r in both_te]]
    prompts_te = [cols.prompts[r] for r in both_te]
    scores = {"router": pair_score(pt, weak, strong),
              "random": [bl.random_scores(len(both_te), seed) for seed in range(RANDOM_SEEDS)],
              "prompt length": bl.length_scores(prompts_te)}
    if len(both_tr):
        y_tr = bl.strong_needed(cols.target[both_tr, weak], cols.target[both_tr, strong])
        scores["TF-IDF + LR"] = bl.tfidf_lr([cols.prompts[r] for r in both_tr], y_tr, prompts_te)
        scores["kNN"] = bl.knn_scores(emb[both_tr], y_tr, emb[both_te])
        mf = bl.matrix_factorization(emb[both_tr], cols.target[both_tr][:, [weak, strong]],
                                     np.ones((len(both_tr), 2), bool), emb[both_te])
        scores["matrix factorisation"] = mf[:, 1] - mf[:, 0]
        cl = bl.cluster_router(emb[both_tr], cols.target[both_tr][:, [weak, strong]],
                               np.ones((len(both_tr), 2), bool), emb[both_te])
        scores["cluster router"] = cl[:, 1] - cl[:, 0]
    scores["oracle"] = bl.oracle_scores(yw, ys)
    rows, curves = {}, {}
    for name, s in scores.items():
        runs = s if isinstance(s, list) else [s]  # random: averaged over seeds
        ms = [routing_metrics(r, yw, ys) for r in runs]
        q = np.mean([quality_curve(r, yw, ys)[1] for r in runs], axis=0)
        curves[name] = q
        rows[name] = {k: float(np.mean([m[k] for m in ms])) for k in ("apgr", "cpt50", "cpt80")} | {"q50": float(q[50])}
    plot_pair_curves(curves, float(yw.mean()), float(ys.mean()), figdir / "quality_curves.png",
                     costs=(costs[weak], costs[strong]) if known_costs else None, title=title,
                     apgr={k: v["apgr"] for k, v in rows.items()})
    md = [f"Test prompts with both models observed: {len(both_te)}. Random is averaged over {RANDOM_SEEDS} seeds; the "
          "oracle knows the outcomes. CPT(x) is the share of strong calls needed to recover x of the weak→strong gap.", "",
          pair_table(rows), "", "![quality vs strong-call share](quality_curves.png)"]
    return md, {"n": int(len(both_te)), "weak_quality": float(yw.mean()), "strong_quality": float(ys.mean()),
                "methods": rows}


def _sweep(points: Mapping[str, np.ndarray], cheapest: float) -> dict:
    """A method's swept (cost, quality) points with their hull, AIQ and quality within each budget."""
    from .multi import frontier

    return {"points": np.stack([points["cost"], points["quality"]], 1)} | frontier(points["cost"], points["quality"],
                                                                                    cheapest, BUDGETS)


def _multi_section(cols, p, test, train, emb, costs, known_costs: bool, models, figdir: Path,
                   title: str) -> tuple[list[str], dict]:
    from . import baselines as bl
    from .multi import alpha_sweep, lambda_sweep

    full = cols.mask[test].all(1)
    if full.sum() < 2:
        return ["_Too few test prompts with every model observed for the N-model analysis._"], {}
    rows_te = test[full]
    y = cols.target[rows_te]
    pm = p[full]
    c = relative_costs(costs)
    methods = {"router": pm, "random": np.random.default_rng(0).random(pm.shape)}
    full_tr = train[cols.mask[train].all(1)]
    if len(full_tr):
        methods["kNN"] = bl.knn_scores(emb[full_tr], cols.target[full_tr], emb[rows_te])
    if len(train):
        methods["matrix factorisation"] = bl.matrix_factorization(emb[train], cols.target[train], cols.mask[train],
                                                                  emb[rows_te])
    sweeps = {name: _sweep(lambda_sweep(pr, y, None, costs), c.min()) for name, pr in methods.items()}
    if len(train):
        accuracy = bl.cluster_router(emb[train], cols.target[train], cols.mask[train], emb[rows_te])
        sweeps["cluster router"] = _sweep(alpha_sweep(accuracy, y, None, costs), c.min())
    singles = {m: (float(c[j]), float(y[:, j].mean())) for j, m in enumerate(models)}
    # Oracle: per prompt the best outcome, from the cheapest model that reaches it.
    by_cost = np.argsort(c, kind="stable")
    pick = by_cost[np.argmax(y[:, by_cost], axis=1)]
    oracle = (float(c[pick].mean()), float(y[np.arange(len(y)), pick].mean()))
    best = max(singles, key=lambda k: singles[k][1])
    table = {name: {"aiq": s["aiq"], "at_budget": s["at_budget"]} for name, s in sweeps.items()}
    table[f"best single model ({best})"] = {"aiq": None, "at_budget": [
        max((q for cc, q in singles.values() if cc <= b + 1e-12), default=None) for b in BUDGETS]}
    table["oracle"] = {"aiq": None, "at_budget": [oracle[1] if oracle[0] <= b + 1e-12 else None for b in BUDGETS]}
    plot_cost_quality(sweeps["router"]["points"], sweeps["router"]["hull"], singles, oracle, figdir / "cost_quality.png",
                      cost_unit="fraction of the priciest model's cost" + (
                          "" if known_costs else "; costs unknown: model j taken to cost j + 1"),
                      baselines={k: v["hull"] for k, v in sweeps.items() if k != "router"},
                      aiq={k: v["aiq"] for k, v in sweeps.items()}, title=title)
    md = [f"Test prompts with every model observed: {len(rows_te)}. Each method picks argmax_j p_j − λ·cost_j over a "
          "sweep of λ (the cluster router: argmax of α·accuracy + (1 − α)·(1 − cost) over a sweep of α); AIQ "
          "(RouterBench) is the area under the non-decreasing convex hull of its (cost, quality) points "
          "over the cost range from the cheapest to the priciest model, divided by that range. Costs are "
          "relative to the priciest model" + (" (unknown costs: model j is taken to cost j + 1, as the decision rule "
                                              "assumed)" if not known_costs else "")
          + ". Quality at a budget is the best swept point within it.", "",
          multi_table(table, BUDGETS), "", "![cost vs quality](cost_quality.png)"]
    return md, {"n": int(len(rows_te)), "methods": table, "singles": singles, "oracle": oracle}


def group_best_outcomes(values: Sequence, train: np.ndarray, rows: np.ndarray, target: np.ndarray,
                        mask: np.ndarray) -> np.ndarray:
    """Per prompt of `rows`: the outcome of the model with the best mean observed outcome on the train
    prompts of the prompt's group (`values`, one per prompt of the table); NaN where that model is not
    observed or the group has no train prompt."""
    from .baselines import cluster_accuracy

    _, group = np.unique(["(missing)" if v is None else str(v) for v in values], return_inverse=True)
    k = group.max() + 1
    with np.errstate(invalid="ignore"):  # 0 / 0: a model never observed on a group's train prompts
        rates = cluster_accuracy(group[train], target[train], mask[train], k, prior=0.0)  # unshrunk
    known = np.isfinite(rates)
    best = np.where(known, rates, -np.inf).argmax(1)[group[rows]]
    fitted = known.any(1)[group[rows]]
    return np.where(fitted & mask[rows, best], target[rows, best], np.nan)


def _decision_ms(router, router_json: Mapping, prompts: Sequence[str]) -> tuple[float, str]:
    """The bundle's p50 decision latency in ms: from router.json, else timed here."""
    lat = router_json.get("latency") or {}
    p50 = (lat.get("overall") or {}).get("p50")
    if p50 is not None:
        return float(p50), f"p50 recorded at export ({lat.get('model', 'int8')}, batch 1, {lat.get('threads', 1)} thread)"
    from .latency import time_decisions

    sample = [prompts[i % len(prompts)] for i in range(300)]
    ms = time_decisions(router, sample, warmup=50)
    return float(np.median(ms)), f"p50 of {len(sample)} single decisions timed now on this data's test prompts"


def _economics(cols, test, p, choices, costs, sim_costs, models, kind, weak, strong, decision_ms, profile, figdir,
               title, sweep: bool = True):
    """Simulate router, cascade and ensemble: (result, its Markdown table), or (None, why) when no test
    prompt has every model observed. `sim_costs` (None = unknown) only rank models missing from the
    profile, while `costs` are the ones the routing decision uses; `sweep=False` leaves out the router's
    λ sweep (its λs trade against stand-in costs the simulation does not price)."""
    from .metrics import choose
    from .multi import lambda_grid
    from .simulate import economics_table, plot_economics, simulate

    if kind == "pair":
        use = [weak, strong]
        score = pair_score(p, weak, strong)
        order = np.argsort(-score, kind="stable")
        curve = {}
        for f in PAIR_FRACTIONS:
            top = np.zeros(len(test), int)
            top[order[:int(round(f * len(test)))]] = 1
            curve[float(f)] = top
        router_choices, knob = (choices == strong).astype(int), "strong fraction"
    else:
        use = list(range(len(models)))
        curve = {float(lam): choose(p, costs, lam) for lam in lambda_grid(p, costs, n=60)} if sweep else {}
        router_choices, knob = choices, "λ"
    if not cols.mask[test][:, use].all(1).any():  # e.g. arena battles: two models observed per prompt
        return None, (f"no test prompt has an outcome for all {len(use)} models the strategies would call (a "
                      "cascade or an ensemble needs each model's answer to the same prompt)")
    res = simulate(cols.target[test][:, use], cols.mask[test][:, use], [sim_costs[j] for j in use], profile,
                   models=[models[j] for j in use], router_choices=router_choices, router_curve=curve, knob=knob,
                   decision_ms=decision_ms)
    plot_economics(res, figdir / "economics.png", title=title)
    return res, economics_table(res)


def _metric_name(key: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", key)


def _log_mlflow(out: Path, name: str, bundle: Path, numbers: Mapping) -> None:
    import mlflow

    from .common import setup_mlflow

    setup_mlflow()
    flat = {_metric_name(k): float(v) for k, v in flatten(numbers, lists=False).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    with mlflow.start_run(run_name=f"report-{name}", nested=mlflow.active_run() is not None):
        mlflow.set_tags({"dataset": name, "bundle": str(bundle)})
        mlflow.log_metrics(flat)
        mlflow.log_artifacts(str(out), artifact_path="report")


def report(bundle: str | Path, data: str, out: str | Path | None = None,
           profile: str | Path | Mapping | None = None, read: Mapping | None = None) -> Path:
    """Score `data`'s test split with the bundle and write OUT/report.md (+ PNGs, report.json); returns report.md.

    `data`: a labeled dataset name, or a data file (ingested with `read`, ingest's options {"layout", "models",
    "rename", "prompts"}, and labeled with the bundle's label options).
    `out` defaults to BUNDLE/../report. `profile`: the model profile of the economics simulation.
    """
    from .common import ConfigError, atomic_dir, console, processed_dir, read_json, write_json
    from .config import load_config
    from .label import training_split
    from .select import group_candidates
    from .metrics import choose, realised_fractions
    from .runtime import Router
    from .simulate import economics_rows

    bundle = Path(bundle)
    router = Router.load(bundle)
    rj = router.config
    out = Path(out) if out else bundle.parent / "report"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").is_file())):
        raise ConfigError(f"{out} exists and is not a report folder; choose another --out")
    training_config = rj.get("training_config") or {}
    name, ds, stats = _load_data(str(data), training_config, read)
    # the ingested file's metadata columns (task, subject, ...): the breakdown's groups
    manifest = processed_dir(name) / "manifest.json"
    metadata = read_json(manifest).get("metadata_columns", []) if manifest.is_file() else []
    cols = _Columns(ds, stats, router.models, metadata)
    # The train prompts the router was trained on: its baselines and learned templates use the same ones.
    cfg = load_config(base={k: dict(training_config.get(k, {})) for k in ("teacher", "student", "train")})
    cols.split = training_split(cols.split, cols.ids, cfg)
    test, train = np.flatnonzero(cols.split == "test"), np.flatnonzero(cols.split == "train")
    if len(test) == 0:
        raise DataError(f"dataset {name!r} has no test prompts")
    categorical = group_candidates(cols.meta, cols.split == "test")  # not ids or free text
    cols.meta = {c: v for c, v in cols.meta.items() if c in categorical}
    models, costs, decision = router.models, _model_costs(rj), rj["decision"]
    kind = decision["kind"]
    pair_names = (decision.get("weak"), decision.get("strong")) if decision.get("weak") else \
        (stats["pair"]["weak"], stats["pair"]["strong"])
    if all(n in models for n in pair_names):
        weak, strong = models.index(pair_names[0]), models.index(pair_names[1])
    else:  # the data's pair is not among the bundle's models: compare the cheapest with the priciest
        weak, strong = int(np.argmin(costs)), int(np.argmax(costs))
    p = router.scores([cols.prompts[r] for r in test])
    score = pair_score(p, weak, strong)
    if kind == "pair":
        default = float(decision.get("default_strong_fraction", 0.5))
        choices = np.where(score >= router.threshold_for(default), strong, weak)
        default_note = f"strong-call share target {default:g}"
    else:
        lam = router.default_cost_weight()
        choices = choose(p, costs, lam)
        default_note = f"λ = {lam:.4g}"
    emb, emb_note = _embeddings(cols, cfg) if len(train) else (None, "")
    decision_ms, latency_note = _decision_ms(router, rj, [cols.prompts[r] for r in test])
    label = f"{name} test split"
    numbers: dict = {"dataset": name, "bundle": str(bundle), "n_test": int(len(test)), "n_train": int(len(train)),
                     "models": models, "kind": kind, "decision_ms": decision_ms}

    with atomic_dir(out) as tmp:
        md = [f"# Routing report: `{rj.get('name') or bundle.parent.name}` on `{name}`", "",
              f"Bundle `{bundle}` ({kind} routing, {len(models)} models: {', '.join(f'`{m}`' for m in models)}) "
              f"scored {len(test)} test prompts of `{name}` through the ONNX runtime, as a service would. "
              f"Baselines were fitted on its {len(train)} train prompts"
              + (f"; kNN and matrix factorisation use {emb_note}." if emb_note else ".")]

        md += ["", f"## Pair routing: `{models[weak]}` → `{models[strong]}`", ""]
        known = all(m.get("cost") is not None for m in rj["models"])
        pair_md, numbers["pair"] = _pair_section(cols, p, train, test, weak, strong, emb, costs, known, tmp,
                                                 f"{label}: {models[weak]} → {models[strong]}")
        md += pair_md
        if len(models) > 2:
            md += ["", f"## {len(models)} models: cost vs quality", ""]
            multi_md, numbers["multi"] = _multi_section(cols, p, test, train, emb, costs, known, models, tmp,
                                                        f"{label}: {len(models)} models")
            md += multi_md

        md += ["", "## Calibration drift", ""]
        drift = []
        if decision.get("thresholds"):
            real = realised_fractions(score, decision["thresholds"])
            drift = [{"target": float(k), "setting": float(t), "realised": real[k]}
                     for k, t in sorted(decision["thresholds"].items(), key=lambda kv: float(kv[0]))]
            md += ["Share of test prompts sent to the strong model by each threshold calibrated on the training "
                   "data's validation split:", "", drift_table(drift, "target strong share", "threshold"), ""]
        lam_drift = []
        if decision.get("cost_lambdas"):
            c = relative_costs(costs)
            lam_drift = [{"target": float(b), "setting": float(lam), "realised": float(c[choose(p, costs, lam)].mean())}
                         for b, lam in sorted(decision["cost_lambdas"].items(), key=lambda kv: float(kv[0]))]
            md += ["Mean cost (relative to the priciest model) realised by each calibrated λ:", "",
                   drift_table(lam_drift, "cost budget", "λ", budget=True), ""]
        numbers["drift"] = {"thresholds": drift, "cost_lambdas": lam_drift}

        numbers["breakdown"] = {}
        if kind == "pair":
            refs, share_of, rel_cost = {"weak": weak, "strong": strong}, strong, None
            share_label, intro = "strong share", f"strong share is the share routed to `{models[strong]}`"
        else:
            from .baselines import ranked_rates

            ranked = train if len(train) else test  # chosen on train, as evaluate's best single model is
            best = int(ranked_rates(cols.target[ranked], cols.mask[ranked]).argmax())
            cheap = int(np.argmin(costs))
            refs = {f"cheapest ({models[cheap]})": cheap, f"best single ({models[best]})": best}
            share_of, rel_cost = best, relative_costs(costs)
            share_label = "best-model share"
            intro = f"best-model share is the share routed to `{models[best]}`, mean cost relative to the priciest model"
        used = [*refs.values(), share_of]
        usable = cols.mask[test][:, used].all(1) & cols.mask[test, choices]
        if cols.meta and usable.any():
            if kind != "pair":
                intro += ("; group best: each prompt sent to the model with the best mean outcome on its "
                          "group's train prompts (routing by the column alone, which a service does not know)")
            md += ["## Breakdown", "", f"At the default operating point ({default_note}); {intro}; "
                   f"{int(usable.sum())} test prompts with the models involved observed.", ""]
            for column, values in cols.meta.items():
                strategies = None if kind == "pair" else {
                    "group best": group_best_outcomes(values, train, test[usable], cols.target, cols.mask)}
                rows = breakdown_rows([values[r] for r in test[usable]], choices[usable], cols.target[test[usable]],
                                      refs, share_of, rel_cost, strategies=strategies)
                numbers["breakdown"][column] = rows
                md += [f"### by `{column}`", "", breakdown_table(column, rows, share_label), ""]

        md += ["## Router vs cascade vs ensemble (simulated)", ""]
        sim_costs = [m.get("cost") for m in sorted(rj["models"], key=lambda m: m["index"])]
        cost_note = ""
        if kind == "pair" and None in (sim_costs[weak], sim_costs[strong]):
            # Unknown pair costs: the strong model is taken to be the pricier one, as routing assumes.
            sim_costs[weak], sim_costs[strong] = 1.0, 2.0
            cost_note = " The bundle has no costs: the strong model is taken to be the pricier one."
        elif not known:
            cost_note = (" Models with unknown cost and no profile entry get the middle default profile. The "
                         "router's λ sweep is left out: its λs trade against stand-in costs (model j costs j + 1) "
                         "that the simulation does not price.")
        res, econ_md = _economics(cols, test, p, choices, costs, sim_costs, models, kind, weak, strong, decision_ms,
                                  profile, tmp, f"{label}: router vs cascade vs ensemble (simulated)",
                                  sweep=kind == "pair" or known)
        if res is None:
            why = econ_md  # the reason, instead of the table
            numbers["economics"] = {"skipped": why}
            md += [f"Skipped: {why}.", ""]
            console.print(f"[yellow]report: router vs cascade vs ensemble skipped: {why}[/]")
        else:
            numbers["economics"] = {"n": res["n"], "ladder": res["ladder"], "judge": res["judge"],
                                    "profile": res["profile"],
                                    "rows": [{k: v for k, v in r.items()} for r in economics_rows(res)]}
            md += [f"Per prompt: the router's decision ({decision_ms:.3f} ms, {latency_note}) plus one generation; a "
                   f"cascade over {' → '.join(f'`{m}`' for m in res['ladder'])} that asks an LLM judge (accuracy "
                   f"{res['judge']['accuracy']:.2f}, {res['judge']['latency_ms']:g} ms, "
                   f"${res['judge']['cost']:g} per call) "
                   "whether to escalate; an ensemble that asks every model of that ladder in parallel and lets the "
                   "judge pick. Output lengths are drawn once per prompt (one factor for every model and "
                   "strategy); time to first token, speed and price come from the model profile (table below). "
                   "Matched rows are the router's "
                   f"operating points ({res['knob']}) whose quality or cost matches the cascade's or ensemble's. "
                   f"{res['n']} test prompts with every simulated model observed.{cost_note}", "",
                   econ_md, "", "![economics](economics.png)", "", "Model profile:", "",
                   "| model | time to first token (s) | tokens / s | typical output tokens | USD / 1k output tokens |",
                   "|---|---:|---:|---:|---:|"]
            # The models the strategies use: the ladder and the router's default picks.
            shown = set(res["ladder"]) | {models[c] for c in np.unique(choices)}
            md += [f"| {m} | {v['ttft_s']:.2f} | {v['tokens_per_s']:.0f} | {v['output_tokens']:.0f} "
                   f"| {v['price_per_1k']:.4g} |" for m, v in res["profile"].items() if m in shown]
            if len(res["profile"]) > len(shown):
                md += ["", f"{len(res['profile']) - len(shown)} other models (on the router's λ sweep only) are in "
                       "`report.json`."]
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        write_json(tmp / "report.json", numbers)
    _log_mlflow(out, name, bundle, numbers)
    console.print(f"[green]report[/] {out / 'report.md'}")
    return out / "report.md"
