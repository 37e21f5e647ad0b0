"""Evaluate stage: the router beside the simple routers an engineer would try first, on the test split.

For a weak/strong pair: APGR, CPT(50%), CPT(80%) of the student (or an exported bundle, scored through
the runtime exactly as a service would), the teacher, random, prompt length, TF-IDF + logistic
regression, kNN, matrix factorisation and the cluster router on teacher embeddings, and the oracle.
With more than two models also the mean outcome of the routed model (`multi_section`), and for pairwise
data per-battle win-prediction accuracy against the global Bradley-Terry ranking. Printed, written to
models/NAME/evaluation.json and logged to the training run in MLflow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import console, model_dir, write_json
from .config import load_config
from .data import Prepared, flat_battles, prepare
from .module import pair_score
from .routing import default_cost_weight, logit, sigmoid
from .train import load_trained, predict


def _teacher_probs(checkpoint_dir: Path, prep: Prepared, cfg) -> np.ndarray:
    from .encoders import EmbeddingRouter

    net = EmbeddingRouter(prep.teacher_emb.shape[1], cfg.teacher.head_hidden, len(prep.models), cfg.student.dropout)
    net.load_state_dict(torch.load(checkpoint_dir / "teacher_head.pt", weights_only=True))
    with torch.no_grad():
        return torch.sigmoid(net.eval()(torch.from_numpy(prep.teacher_emb))).numpy()


def battle_accuracy(prep: Prepared, rows: np.ndarray, probs: dict[str, np.ndarray],
                    strengths_in: tuple[str, ...] = ()) -> dict | None:
    """Winner prediction per battle on `rows` (ties excluded): each router's P(a beats b) =
    sigmoid(s_a - s_b). For the routers named in `strengths_in` (the student and teacher, trained as
    per-prompt Bradley-Terry models) s is the logit itself, exactly as `Router.win_probability` serves
    it; for the others (per-model win rates against whoever each model met) s are per-prompt strengths
    fitted given who each model met in the train battles (`opponent_adjusted_strengths`), against the global
    Bradley-Terry ranking of the train battles (the same winner for every prompt; like every baseline, it
    never sees a test battle). `vs_bradley_terry` counts the battles a router gets right and Bradley-Terry
    wrong, and the reverse: the difference is what beats the ranking."""
    from .label import battle_counts, bradley_terry
    from .metrics import opponent_adjusted_strengths, win_accuracy

    if prep.battles is None:
        return None
    # The battles `prepare` read with the labels, flattened; each keeps its prompt's row.
    battle_row, a, b, score_a = flat_battles(prep.battles)
    m = len(prep.models)
    train = prep.split[battle_row] == "train"
    counts = battle_counts(a[train], b[train], m)
    position = np.full(len(prep.prompt_ids), -1)
    position[rows] = np.arange(len(rows))
    at = position[battle_row]
    keep = at >= 0
    strength = bradley_terry(a[train], b[train], score_a[train], m)
    a, b, score_a, at = a[keep], b[keep], score_a[keep], at[keep]
    bt = sigmoid(strength[a] - strength[b])
    out = {"n_battles": int(keep.sum()), "bradley_terry": win_accuracy(bt, score_a), "vs_bradley_terry": {}}
    decided = score_a != 0.5
    bt_right = (bt > 0.5) == (score_a > 0.5)
    for label, p in probs.items():
        s = logit(p) if label in strengths_in else opponent_adjusted_strengths(logit(p), counts)
        p_a = sigmoid(s[at, a] - s[at, b])
        out[label] = win_accuracy(p_a, score_a)
        right = (p_a > 0.5) == (score_a > 0.5)
        out["vs_bradley_terry"][label] = [int((decided & right & ~bt_right).sum()),
                                          int((decided & bt_right & ~right).sum())]
    return out


def check_bundle_matches(config: dict, prep: Prepared, bundle: Path) -> None:
    """A bundle is evaluated only on the data it was trained on: same data hash, same models in the same order."""
    from .common import DataError

    models = [m["name"] for m in sorted(config["models"], key=lambda m: m["index"])]
    if models != prep.models:
        raise DataError(f"the bundle's models {models} are not the dataset's {prep.models} (in output order)",
                        file=bundle)
    if config.get("data_hash") != prep.data_hash:
        raise DataError(f"the bundle was trained on other data (data hash {config.get('data_hash')!r}, "
                        f"dataset {prep.name!r} has {prep.data_hash!r})", file=bundle)


def multi_section(prep: Prepared, train: np.ndarray, test: np.ndarray, probs: dict[str, np.ndarray],
                  decision: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Mean outcome on the test prompts when each goes to the argmax of a router's per-model scores.

    Routers: those in `probs` (aligned with `test`), the best single model on train, TF-IDF + ridge,
    kNN and the cluster router (fitted on the train rows' observed outcomes), and the oracle. Masks: a
    router picks only among the models observed on the prompt, and prompts with none observed are left
    out, so every router is scored on the same prompts and the oracle is the best observed outcome.
    "gap closed" = (x − best single) / (oracle − best single). With every model's cost known, also
    AIQ of the first router's argmax p − λ·cost over a λ sweep and of the cluster router over an α sweep,
    and (`served_default`) the first router's outcome and cost at the `decision`'s default λ: what a
    service calling `Router.route` without a cost weight gets. Returns the section and the baselines'
    score matrices.
    """
    from .baselines import multi_baselines
    from .multi import alpha_sweep, frontier, lambda_sweep, routed

    y, seen = prep.target[test], prep.mask[test]
    baselines = multi_baselines([prep.prompts[r] for r in train], prep.target[train], prep.mask[train],
                                [prep.prompts[r] for r in test], (prep.teacher_emb[train], prep.teacher_emb[test]))
    quality = {label: routed(s, y, seen)[1] for label, s in (probs | baselines | {"oracle": y}).items()}
    best, oracle = quality["best_single"], quality["oracle"]
    any_seen = seen.any(1)
    out = {"n": int(any_seen.sum()), "n_models": len(prep.models),
           # fewer than n_models (sparse tables, arena votes): every router picks among these, a service among all
           "observed_per_prompt": float(seen[any_seen].sum(1).mean()) if any_seen.any() else 0.0,
           "best_single_model": prep.models[int(baselines["best_single"][0].argmax())], "quality": quality,
           "gap_closed": {k: (q - best) / (oracle - best) if oracle > best else float("nan")
                          for k, q in quality.items()}}
    if all(c is not None for c in prep.costs) and max(prep.costs) > 0:
        costs = np.asarray(prep.costs, np.float64)
        first = next(iter(probs))
        sweeps = {first: lambda_sweep(probs[first], y, seen, costs),
                  "cluster": alpha_sweep(baselines["cluster"], y, seen, costs)}
        # AIQ over one cost range for both: from the cheapest cost both sweeps reach (with sparse masks,
        # e.g. pairwise data, the cheapest model is not observed on every prompt) to the priciest model
        low = max([costs.min() / costs.max()] + [float(np.nanmin(s["cost"])) for s in sweeps.values()])
        out["cost_quality"] = {k: {"aiq": frontier(s["cost"], s["quality"], low)["aiq"]}
                               | {key: v.tolist() for key, v in s.items()} for k, s in sweeps.items()}
        if decision is not None:
            lam = default_cost_weight(decision)
            cost, q = routed(probs[first], y, seen, costs, lam)
            out["served_default"] = {"cost_weight": lam, "quality": q, "relative_cost": cost}
    return out, baselines


def evaluate(name: str, bundle: Path | None = None) -> dict:
    """Routing metrics on the test split for the router, the teacher and the baselines."""
    from .baselines import baseline_table

    from .label import require_test_split

    require_test_split(name)
    trained = load_trained(name)
    cfg = load_config(base=trained.meta["config"])
    prep = prepare(name, cfg)
    train, test = prep.rows("train"), prep.rows("test")
    if bundle is not None:
        from .runtime import Router

        router = Router.load(bundle, quantized=True)
        check_bundle_matches(router.config, prep, bundle)
        router_p = router.scores([prep.prompts[r] for r in test])
        router_label = "router (int8 bundle)"
    else:
        router_p = predict(trained.student, prep, cfg, test)
        router_label = "router (student)"
    probs = {router_label: router_p, "teacher": _teacher_probs(trained.checkpoint_dir, prep, cfg)[test]}
    result: dict = {"name": name, "n_test": int(len(test)), "source": str(bundle) if bundle else "checkpoint"}

    if prep.pair is not None:
        weak, strong = prep.pair
        both_tr = prep.mask[train][:, [weak, strong]].all(1)
        both_te = prep.mask[test][:, [weak, strong]].all(1)
        tr, te = train[both_tr], test[both_te]
        result["pair"] = {"weak": prep.models[weak], "strong": prep.models[strong], "n": int(len(te))}
        if len(tr) and len(te):
            table = baseline_table(
                {"prompts": [prep.prompts[r] for r in tr], "weak": prep.target[tr, weak],
                 "strong": prep.target[tr, strong]},
                {"prompts": [prep.prompts[r] for r in te], "weak": prep.target[te, weak],
                 "strong": prep.target[te, strong]},
                embeddings=(prep.teacher_emb[tr], prep.teacher_emb[te]),
            )
            from .metrics import routing_metrics

            routers = {label: routing_metrics(pair_score(p[both_te], prep.pair), prep.target[te, weak],
                                              prep.target[te, strong]) for label, p in probs.items()}
            result["routers"] = routers | table
            if not np.isfinite(routers[router_label]["apgr"]):
                result["pair"]["note"] = (f"{prep.models[weak]} and {prep.models[strong]} have the same mean "
                                          "outcome on these test prompts, so APGR (a share of the gap between "
                                          "them) is undefined")
        else:  # sparse votes, or a named pair that never met: the other sections still say how the router does
            empty = " or ".join(split for split, rows in (("train", tr), ("test", te)) if not len(rows))
            result["pair"]["skipped"] = (f"no {empty} prompt has outcomes of both "
                                         f"{prep.models[weak]} and {prep.models[strong]}, so there is no APGR "
                                         "(-s label.weak=A -s label.strong=B names a pair that shares prompts)")
    battle_probs = probs
    if len(prep.models) > 2:
        decision = router.config["decision"] if bundle is not None else trained.meta["decision"]
        result["multi"], baselines = multi_section(prep, train, test, probs, decision)
        # baselines' win rates as probabilities (a ridge prediction can leave [0, 1])
        battle_probs = probs | {k: np.clip(baselines[k], 0.01, 0.99) for k in ("tfidf_ridge", "knn", "cluster")}
    battles = battle_accuracy(prep, test, battle_probs, strengths_in=tuple(probs))
    if battles:
        result["win_accuracy"] = battles
    _print(result)
    write_json(model_dir(name) / "evaluation.json", result)
    _log(trained.meta.get("mlflow_run_id"), result)
    return result


def _print(result: dict) -> None:
    from rich.table import Table

    for why in ("skipped", "note"):
        if why in result.get("pair", {}):
            console.print(f"[yellow]note:[/] {result['pair'][why]}")
    if "routers" in result:
        pair = result["pair"]
        table = Table(title=f"{result['name']}: test split, {pair['n']} prompts, {pair['weak']} → {pair['strong']}")
        for col in ("router", "APGR", "CPT(50%)", "CPT(80%)"):
            table.add_column(col, justify="left" if col == "router" else "right")
        for label, m in sorted(result["routers"].items(), key=lambda kv: -kv[1]["apgr"]):
            style = "bold" if label.startswith("router") else None
            table.add_row(label, f"{m['apgr']:.3f}", f"{m['cpt50']:.3f}", f"{m['cpt80']:.3f}", style=style)
        console.print(table)
    if "multi" in result:
        _print_multi(result["multi"])
    if "win_accuracy" in result:
        w = result["win_accuracy"]
        table = Table(title=f"win prediction on {w['n_battles']} test battles (ties excluded)")
        table.add_column("predictor")
        table.add_column("accuracy", justify="right")
        table.add_column("+ / − vs BT", justify="right")  # right where BT is wrong / wrong where BT is right
        for label, acc in w.items():
            if label not in ("n_battles", "vs_bradley_terry"):
                better, worse = w["vs_bradley_terry"].get(label, ("-", "-"))
                table.add_row(label, f"{acc:.3f}", f"{better} / {worse}")
        console.print(table)


def _print_multi(multi: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{multi['n_models']} models: mean outcome of the routed model on {multi['n']} test prompts "
                        f"(best single: {multi['best_single_model']})")
    for col in ("router", "mean outcome", "gap closed"):
        table.add_column(col, justify="left" if col == "router" else "right")
    for label, q in sorted(multi["quality"].items(), key=lambda kv: -kv[1]):
        style = "bold" if label.startswith("router") else None
        table.add_row(label, f"{q:.3f}", f"{multi['gap_closed'][label]:.3f}", style=style)
    console.print(table)
    observed = multi.get("observed_per_prompt", multi["n_models"])
    if observed < 0.9 * multi["n_models"]:  # a sparse table (arena votes: 2 of N), not a few missing cells
        console.print(f"[yellow]{observed:.1f} of {multi['n_models']} models observed per test prompt on average: each "
                      "router here picks among those, while a service picks among all[/]")
    if "served_default" in multi:
        d = multi["served_default"]
        console.print(f"served by default (cost weight λ = {d['cost_weight']:.4g}): mean outcome {d['quality']:.3f} "
                      f"at {d['relative_cost']:.3f} of the priciest model's cost")
    if "cost_quality" in multi:
        table = Table(title="cost vs quality (AIQ over the cheapest…priciest model's cost)")
        table.add_column("router")
        table.add_column("sweep")
        table.add_column("AIQ", justify="right")
        for label, sweep in multi["cost_quality"].items():
            table.add_row(label, "λ" if "lambda" in sweep else "α", f"{sweep['aiq']:.3f}")
        console.print(table)


def _multi_metrics(multi: dict) -> dict[str, float]:
    """eval_multi_<router>_quality / _gap_closed / _aiq, finite values only."""
    flat = {f"eval_multi_{k.split(' ')[0]}_{metric}": v for metric in ("quality", "gap_closed")
            for k, v in multi.get(metric, {}).items()}
    flat |= {f"eval_multi_{k.split(' ')[0]}_aiq": s["aiq"] for k, s in multi.get("cost_quality", {}).items()}
    return {k: float(v) for k, v in flat.items() if np.isfinite(v)}


def _log(run_id: str | None, result: dict) -> None:
    import mlflow

    from .common import setup_mlflow

    setup_mlflow()
    flat = {f"eval_{k.split(' ')[0]}_{metric}": v for k, m in result.get("routers", {}).items()
            for metric, v in m.items() if isinstance(v, float) and np.isfinite(v)}
    flat |= {f"eval_win_{k.split(' ')[0]}": v for k, v in result.get("win_accuracy", {}).items()
             if k not in ("n_battles", "vs_bradley_terry")}
    flat |= _multi_metrics(result.get("multi", {}))
    try:
        nested = mlflow.active_run() is not None
        with mlflow.start_run(run_id=run_id, nested=nested) if run_id else mlflow.start_run(run_name="evaluate",
                                                                                             nested=nested):
            mlflow.log_metrics(flat)
            mlflow.log_dict(result, "evaluation.json")
    except Exception as e:  # the tracking server is a convenience, never a reason to lose the evaluation
        console.print(f"[yellow]MLflow logging skipped: {e}[/]")
