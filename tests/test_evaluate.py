"""Evaluation stage: per-battle win prediction against the global Bradley-Terry ranking."""
from __future__ import annotations

import json

import numpy as np
import pytest


def test_win_prediction_puts_win_rates_against_different_opponents_on_one_scale(data_dir):
    """AlpacaEval's design: a reference (model 0) meets everyone, the others meet only it. Model 1 is
    stronger than the reference on these prompts, though its win rate (60%, against the reference) is
    below the reference's (70%, against the field); the rule must read it as a win for model 1."""
    from pipeline.data import Prepared
    from pipeline.evaluate import battle_accuracy

    n = 10
    split = np.array(["train"] * 4 + ["test"] * 6)
    ids = [f"p{i}" for i in range(n)]
    # per prompt (model a, model b, a's score): model 2 loses to the reference everywhere; model 1 loses to
    # it on the train prompts and beats it on the test prompts
    battles = [np.array([[1, 0, float(s == "test")], [2, 0, 0.0]], np.float32) for s in split]
    prep = Prepared(name="star", models=["ref", "one", "two"], costs=[None] * 3, pair=None, prompts=[""] * n,
                    prompt_ids=ids, target=np.zeros((n, 3), np.float32), mask=np.ones((n, 3), bool),
                    split=split, teacher_emb=np.zeros((n, 4), np.float32), data_hash="x", stats={},
                    battles=battles)
    test = prep.rows("test")
    probs = {"router": np.tile([0.7, 0.6, 0.1], (len(test), 1))}
    out = battle_accuracy(prep, test, probs)
    assert out["n_battles"] == 12  # test prompts only
    # Bradley-Terry of the train battles only: wrong about "one" (fitted on every battle it would rank
    # "one" first, 6 wins to 4, and score 1.0)
    assert out["bradley_terry"] == pytest.approx(0.5)
    assert out["router"] == pytest.approx(1.0)  # comparing 0.7 with 0.6 directly would score 0.5
    assert out["vs_bradley_terry"]["router"] == [6, 0]


def _three_models(n=400, seed=0):
    """Three models, each right on its own topic (a keyword and an embedding direction); the last is
    also a bit better overall. Model 1 is never observed on even prompts."""
    from pipeline.data import Prepared

    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 3, n)
    words = ["integral of", "capital of", "sort the list"]
    prompts = [f"{rng.choice(['the', 'a', 'some'])} {words[t]} {rng.choice(['x', 'y', 'z'])} case {i}"
               for i, t in enumerate(topic)]
    p = np.where(topic[:, None] == np.arange(3), 0.9, 0.2)
    p[:, 2] += 0.1
    target = (rng.random((n, 3)) < p).astype(np.float32)
    mask = np.ones((n, 3), bool)
    mask[::2, 1] = False
    emb = (np.random.default_rng(9).normal(size=(3, 16))[topic] + 0.5 * rng.normal(size=(n, 16))).astype(np.float32)
    split = np.where(np.arange(n) < n // 4, "test", "train")
    return Prepared(name="three", models=["a", "b", "c"], costs=[1.0, 2.0, 4.0], pair=(0, 2), prompts=prompts,
                    prompt_ids=[str(i) for i in range(n)], target=target, mask=mask, split=split,
                    teacher_emb=emb, data_hash="x", stats={}), topic


def test_multi_section_scores_every_router_on_the_observed_models():
    from pipeline.evaluate import multi_section

    prep, topic = _three_models()
    train, test = prep.rows("train"), prep.rows("test")
    y, seen = prep.target[test], prep.mask[test]
    # a router that knows the topic; model 1 picked where unobserved must fall back to an observed one
    knows = np.eye(3)[topic[test]]
    flat = np.full((len(test), 3), 0.5)
    out, baselines = multi_section(prep, train, test, {"router (student)": knows, "teacher": flat})
    q = out["quality"]
    assert out["n"] == len(test) and out["n_models"] == 3 and out["best_single_model"] == "c"
    assert out["observed_per_prompt"] == pytest.approx(2.5)  # b is missing on every other prompt
    assert set(q) == {"router (student)", "teacher", "best_single", "tfidf_ridge", "knn", "cluster", "oracle"}
    assert q["oracle"] == pytest.approx(np.where(seen, y, 0).max(1).mean())
    assert q["best_single"] == pytest.approx(y[:, 2].mean())  # c is observed everywhere
    assert q["teacher"] == pytest.approx(y[:, 0].mean())  # all tied: the cheapest observed model
    rows = np.arange(len(test))
    expected = np.where(seen[rows, topic[test]], topic[test], 0)  # b unobserved: a and c tie at 0, a is cheaper
    assert q["router (student)"] == pytest.approx(y[rows, expected].mean())
    for name in ("router (student)", "tfidf_ridge", "knn", "cluster"):
        assert q[name] > q["best_single"] + 0.1, (name, q)
    assert out["gap_closed"]["best_single"] == 0 and out["gap_closed"]["oracle"] == 1
    gap = (q["cluster"] - q["best_single"]) / (q["oracle"] - q["best_single"])
    assert out["gap_closed"]["cluster"] == pytest.approx(gap)
    assert set(baselines) == {"best_single", "tfidf_ridge", "knn", "cluster"}
    # costs known: AIQ of the router's λ sweep and of the cluster router's α sweep
    cq = out["cost_quality"]
    assert set(cq) == {"router (student)", "cluster"}
    assert "lambda" in cq["router (student)"] and "alpha" in cq["cluster"]
    assert all(0 < s["aiq"] <= 1 for s in cq.values())
    prep.costs = [1.0, None, 4.0]
    assert "cost_quality" not in multi_section(prep, train, test, {"router": knows})[0]


def test_evaluate_on_the_three_model_demo_writes_and_logs_the_multi_section(tmp_path, monkeypatch, demo_files):
    """ingest → label → train (tiny teacher and student) → evaluate on the demo set's three priced models."""
    import json

    import mlflow

    from pipeline.common import model_dir, setup_mlflow
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate
    from pipeline.train import train
    from tests.tiny import labeled_with_tiny_teacher

    teacher = labeled_with_tiny_teacher(monkeypatch, tmp_path, demo_files["wide"], "demo")
    cfg = load_config(overrides=[f"teacher.path={teacher}", "teacher.epochs=2", "teacher.head_hidden=16",
                                 "student.dim=16", "student.hidden=16", "student.max_tokens=16", "student.heads=2",
                                 "train.max_epochs=2", "train.batch_size=64"])
    train("demo", cfg)
    result = evaluate("demo")

    assert "cluster" in result["routers"] and np.isfinite(result["routers"]["cluster"]["apgr"])
    multi = result["multi"]
    assert set(multi["quality"]) == {"router (student)", "teacher", "best_single", "tfidf_ridge", "knn", "cluster",
                                     "oracle"}
    assert multi["quality"]["oracle"] >= max(multi["quality"].values()) - 1e-12
    assert set(multi["cost_quality"]) == {"router (student)", "cluster"}  # the demo manifest has costs
    assert json.loads((model_dir("demo") / "evaluation.json").read_text())["multi"]["n"] == multi["n"]

    setup_mlflow()
    run = mlflow.search_runs(filter_string="tags.mlflow.runName = 'train-demo'", output_format="list")[0]
    logged = run.data.metrics
    assert logged["eval_multi_cluster_quality"] == pytest.approx(multi["quality"]["cluster"])
    assert logged["eval_multi_router_aiq"] == pytest.approx(multi["cost_quality"]["router (student)"]["aiq"])
    assert "eval_cluster_apgr" in logged
    # the weights once: student.pt / teacher_head.pt, not Lightning's own copies beside them
    kept = ["config.yaml", "meta.json", "student.pt", "teacher_head.pt"]
    assert sorted(p.name for p in (model_dir("demo") / "checkpoint").iterdir()) == kept
    logged_files = mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoint")
    assert sorted(a.path for a in logged_files) == [f"checkpoint/{k}" for k in kept]
    assert "member2-val_loss" in logged and "val_loss" in logged  # every member's curve, in the one run

    # The default student: three members; a checkpoint written before `student.members` existed (no such
    # key in its config) holds one student and loads as one.
    import shutil

    import torch

    from pipeline.common import read_json, write_json
    from pipeline.encoders import Ensemble, StaticRouter
    from pipeline.train import load_trained

    ensemble = load_trained("demo").student
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 3
    old = shutil.copytree(model_dir("demo") / "checkpoint", tmp_path / "old_checkpoint")
    meta = read_json(old / "meta.json")
    del meta["config"]["student"]["members"]
    write_json(old / "meta.json", meta)
    state = torch.load(old / "student.pt", weights_only=True)
    torch.save({k.removeprefix("members.0."): v for k, v in state.items() if k.startswith("members.0.")},
               old / "student.pt")
    single = load_trained(old).student
    assert isinstance(single, StaticRouter)
    ids = torch.randint(1000, 5000, (3, 12))
    with torch.no_grad():
        assert torch.allclose(single(ids, torch.ones_like(ids)), ensemble.members[0](ids, torch.ones_like(ids)))


def _tiny_pipeline(tmp_path, monkeypatch, data_file, name, label_overrides=()):
    """ingest → label → train (tiny teacher and student) → export into models/NAME/bundle."""
    from pipeline.common import model_dir
    from pipeline.config import load_config
    from pipeline.export import export
    from pipeline.label import label
    from pipeline.train import train
    from tests.tiny import labeled_with_tiny_teacher

    teacher = labeled_with_tiny_teacher(monkeypatch, tmp_path, data_file, name)
    if label_overrides:
        label(name, load_config(overrides=list(label_overrides)).label)
    cfg = load_config(overrides=[*label_overrides, f"teacher.path={teacher}", "teacher.epochs=3", "teacher.head_hidden=16",
                                 "student.dim=16", "student.hidden=16", "student.max_tokens=16", "student.heads=2",
                                 "train.max_epochs=3", "train.batch_size=64", "export.latency_decisions=10"])
    train(name, cfg)
    export(name, config=cfg)
    return model_dir(name) / "bundle"


def test_pairwise_bundle_serves_the_win_predictions_evaluate_scores(tmp_path, monkeypatch, demo_files):
    """What is served is what is measured: evaluate --bundle and Router.win_probability agree battle for battle."""
    from datasets import load_from_disk

    from pipeline.common import processed_dir
    from pipeline.evaluate import evaluate
    from pipeline.runtime import Router
    from pipeline.train import load_trained

    bundle = _tiny_pipeline(tmp_path, monkeypatch, demo_files["pairwise"], "duel")
    result = evaluate("duel", bundle=bundle)
    router = Router.load(bundle)
    assert router.decision["win_probability"] == "sigmoid(logit_a - logit_b)"

    from pipeline.config import load_config
    from pipeline.data import prepare

    prep = prepare("duel", load_config(base=load_trained("duel").meta["config"]))
    test_ids = {prep.prompt_ids[r]: prep.prompts[r] for r in prep.rows("test")}
    battles = load_from_disk(str(processed_dir("duel") / "battles")).to_pandas()
    battles = battles[battles.prompt_id.isin(list(test_ids)) & (battles.score_a != 0.5)]
    right = 0
    for row in battles.itertuples():
        p = router.win_probability([test_ids[row.prompt_id]], prep.models[row.model_a], prep.models[row.model_b])[0]
        right += (p > 0.5) == (row.score_a > 0.5)
    assert result["win_accuracy"]["n_battles"] >= len(battles)
    assert result["win_accuracy"]["router (int8 bundle)"] == pytest.approx(right / len(battles))


def test_a_pair_that_never_met_skips_apgr_with_a_note_and_scores_the_rest(tmp_path, monkeypatch, capsys):
    """Sparse votes where the named pair shares no prompt: evaluate says there is no APGR (it raised
    "no prompts to evaluate" after the bundle was written) and still scores N models and win prediction."""
    import pandas as pd

    from pipeline.evaluate import evaluate

    rng = np.random.default_rng(0)
    rows = [{"prompt": f"{a} meets {b}: question {i} about {rng.choice(['maths', 'poems', 'code'])}",
             "model_a": a, "model_b": b, "winner": rng.choice(["model_a", "model_b", "tie"])}
            for a, b in (("w", "x"), ("x", "y"), ("y", "s")) for i in range(150)]
    pd.DataFrame(rows).to_parquet(tmp_path / "sparse.parquet")
    bundle = _tiny_pipeline(tmp_path, monkeypatch, tmp_path / "sparse.parquet", "sparse",
                            label_overrides=("label.weak=w", "label.strong=s"))
    capsys.readouterr()
    result = evaluate("sparse", bundle=bundle)
    assert result["pair"]["n"] == 0 and "routers" not in result
    assert "no train or test prompt has outcomes of both w and s, so there is no APGR" in result["pair"]["skipped"]
    assert "so there is no APGR" in " ".join(capsys.readouterr().err.split())
    assert result["win_accuracy"]["n_battles"] > 0 and result["multi"]["quality"]["router (int8 bundle)"] > 0


def test_a_pair_with_the_same_outcome_everywhere_exports_and_says_apgr_is_undefined(tmp_path, monkeypatch, capsys):
    """Both models right on every prompt: nothing to route on. Export used to fail its parity gate on
    "APGR nan vs nan"; now the bundle is written, and label and evaluate say why there is no APGR."""
    import pandas as pd

    from pipeline.evaluate import evaluate

    pd.DataFrame({"prompt": [f"question {i} about {['maths', 'poems'][i % 2]}" for i in range(300)],
                  "a": True, "b": True}).to_csv(tmp_path / "same.csv", index=False)
    bundle = _tiny_pipeline(tmp_path, monkeypatch, tmp_path / "same.csv", "same")
    parity = json.loads((bundle / "router.json").read_text())["metrics"]["parity"]
    assert "undefined" in parity["apgr_skipped"]
    result = evaluate("same", bundle=bundle)
    assert "same mean outcome on these test prompts" in result["pair"]["note"]
    assert np.isnan(result["routers"]["router (int8 bundle)"]["apgr"])
    assert "routing between them cannot change quality" in " ".join(capsys.readouterr().err.split())


def test_evaluate_refuses_a_bundle_trained_on_other_data(tmp_path, monkeypatch, demo_files):
    from pipeline.common import DataError
    from pipeline.evaluate import evaluate

    bundle = _tiny_pipeline(tmp_path, monkeypatch, demo_files["wide"], "one")
    _tiny_pipeline(tmp_path, monkeypatch, demo_files["long"], "two")
    with pytest.raises(DataError, match="other data|models"):
        evaluate("two", bundle=bundle)


@pytest.mark.parametrize("priced", [True, False])
def test_n_model_bundle_serves_the_default_decision_evaluate_scores(tmp_path, monkeypatch, demo_files, priced):
    """What is served is what is measured, for N models: Router.route with no setting picks, prompt for prompt,
    what evaluate --bundle scores as the served default (with costs) or as the routed outcome (without)."""
    import pandas as pd

    from pipeline.config import load_config
    from pipeline.data import prepare
    from pipeline.evaluate import evaluate
    from pipeline.runtime import Router
    from pipeline.train import load_trained

    data = demo_files["wide"]
    if not priced:
        frame = pd.read_csv(data)
        data = tmp_path / "demo_unpriced.csv"
        frame[[c for c in frame.columns if not c.endswith("|total_cost")]].to_csv(data, index=False)
    bundle = _tiny_pipeline(tmp_path, monkeypatch, data, "trio")
    result = evaluate("trio", bundle=bundle)["multi"]
    router = Router.load(bundle)
    prep = prepare("trio", load_config(base=load_trained("trio").meta["config"]))
    test = prep.rows("test")
    chosen = np.array([router.models.index(router.route(prep.prompts[r])) for r in test])
    assert prep.mask[test].all()  # the demo observes every model on every prompt
    served = float(prep.target[test, chosen].mean())
    if priced:
        assert result["served_default"]["cost_weight"] == router.default_cost_weight() > 0
        assert result["served_default"]["quality"] == pytest.approx(served)
    else:
        assert router.decision["cost_lambdas"]["0.5"] > 0  # a budget over the assumed costs would move it
        assert router.default_cost_weight() == 0.0 and "served_default" not in result
        assert result["quality"]["router (int8 bundle)"] == pytest.approx(served)
