"""Routing report: tables and figures on synthetic arrays, the model card, and the whole report on a tiny bundle."""
import json

import numpy as np
import pytest

from pipeline.model_card import write_model_card
from pipeline.report_figures import (breakdown_rows, breakdown_table, drift_table, multi_table, pair_table,
                                     plot_cost_quality, plot_pair_curves)

from .tiny import sample_router_json


def _is_real_png(path, min_bytes=15_000):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    # Non-trivial: big enough, and not one flat colour.
    return path.stat().st_size > min_bytes and img.shape[0] > 400 and img[..., :3].std() > 0.05


def test_pair_table_lists_each_method_with_its_numbers():
    rows = {"router": {"apgr": 0.6789, "cpt50": 0.4213, "cpt80": None, "q50": 0.7512},
            "random": {"apgr": 0.5012, "cpt50": 0.5, "cpt80": 0.8, "q50": 0.7001}}
    t = pair_table(rows).splitlines()
    assert len(t) == 4
    assert t[2] == "| router | 0.679 | 42.1% | not reached | 0.751 |"
    assert t[3].startswith("| random | 0.501 | 50.0% | 80.0% |")


def test_pair_curves_figure(tmp_path):
    f = np.linspace(0, 1, 101)
    curves = {"router": 0.6 + 0.2 * np.sqrt(f), "random": 0.6 + 0.2 * f, "oracle": np.minimum(0.6 + f, 0.9)}
    png = plot_pair_curves(curves, 0.6, 0.8, tmp_path / "pair.png", costs=(0.1, 1.0), title="t")
    assert _is_real_png(png)


def test_multi_table_and_figure(tmp_path):
    t = multi_table({"router": {"aiq": 0.7123, "at_budget": [0.61, None]}}, [0.25, 0.5])
    assert "≤25% cost" in t and "≤50% cost" in t and "| router | 0.712 | 0.610 | n/a |" in t
    sweep = np.array([[0.1, 0.5], [0.3, 0.6], [0.5, 0.58], [1.0, 0.7]])
    hull = np.array([[0.1, 0.5], [0.3, 0.6], [1.0, 0.7]])
    png = plot_cost_quality(sweep, hull, {"a": (0.1, 0.5), "b": (0.4, 0.55), "c": (1.0, 0.7)}, (0.4, 0.85),
                            tmp_path / "multi.png")
    assert _is_real_png(png)


def test_drift_table_shows_the_gap():
    t = drift_table([{"target": 0.5, "setting": 0.4321, "realised": 0.62}], "target", "threshold")
    assert t.splitlines()[2] == "| 50% | 0.4321 | 62.0% | +12.0 |"


def test_group_best_outcomes_route_each_group_to_its_best_model_on_train():
    from pipeline.report import group_best_outcomes

    values = ["a", "a", "b", "b", None, "a", "b", None, "c"]
    target = np.array([[1, 0], [1, 0], [0, 1], [0, 0], [0, 1],   # train: a -> model 0, b -> model 1, None -> 1
                       [0, 1], [1, 0], [0, 1], [1, 1]], float)  # test rows 5..8
    mask = np.ones_like(target, bool)
    mask[3, 1] = False  # unobserved outcomes do not count toward a model's rate
    mask[6, 1] = False  # the group's best model is unobserved on this test prompt: unknown
    got = group_best_outcomes(values, np.arange(5), np.arange(5, 9), target, mask)
    assert got[0] == 0 and np.isnan(got[1]) and got[2] == 1 and np.isnan(got[3])  # "c" has no train prompt


def test_breakdown_per_group():
    values = ["math", "math", "art", "math", None]
    outcomes = np.array([[0, 1], [1, 1], [1, 0], [0, 0], [1, 1]], float)
    choices = np.array([1, 0, 0, 1, 1])
    rows = breakdown_rows(values, choices, outcomes, {"weak": 0, "strong": 1}, share_of=1)
    by = {r["group"]: r for r in rows}
    assert [r["group"] for r in rows][0] == "math"  # largest first
    assert by["math"] == {"group": "math", "n": 3, "share": pytest.approx(2 / 3), "router": pytest.approx(2 / 3),
                          "weak": pytest.approx(1 / 3), "strong": pytest.approx(2 / 3)}
    assert by["(missing)"]["n"] == 1 and by["art"]["router"] == 1.0
    merged = breakdown_rows(values, choices, outcomes, {"weak": 0}, 1, max_groups=1)
    assert merged[-1]["group"] == "(other 2 groups)" and merged[-1]["n"] == 2
    assert "| math | 3 | 67% | 0.667 | 0.333 | 0.667 |" in breakdown_table("subject", rows)
    costed = breakdown_rows(values, choices, outcomes, {"cheap": 0}, 1, rel_cost=np.array([0.1, 1.0]))
    assert costed[0]["cost"] == pytest.approx(0.7)  # math picks: 1.0, 0.1, 1.0
    table = breakdown_table("subject", costed, "best-model share")
    assert "| subject | n | best-model share | mean cost | router quality | cheap quality |" in table
    assert "| math | 3 | 67% | 70% | 0.667 | 0.333 |" in table
    other = np.array([1.0, np.nan, 0.0, 0.0, np.nan])  # another strategy's per-prompt outcomes, NaN: unknown
    rows = breakdown_rows(values, choices, outcomes, {"weak": 0}, 1, strategies={"group best": other})
    by = {r["group"]: r for r in rows}
    assert by["math"]["group best"] == pytest.approx(0.5) and np.isnan(by["(missing)"]["group best"])
    assert "| (missing) | 1 | 100% | 1.000 | 1.000 | - |" in breakdown_table("subject", rows)


def test_model_card_is_a_pure_function_of_router_json(tmp_path):
    r = sample_router_json()
    (tmp_path / "a").mkdir()
    a = write_model_card(tmp_path / "a", r)
    text = a.read_text()
    assert a.name == "MODEL_CARD.md"
    for needle in ("`demo`", "abc123", "| 1 | s | 1 | strong |", "| 0.1 | 0.73 |", "q(strong) − 0.1",
                   "| apgr | 0.61 | 0.59 |", "| p99 | 0.4 |", "| p50 | 0.1 |", "static encoder, width 256", "## Intended use",
                   "## Limits"):
        assert needle in text, needle
    (tmp_path / "b").mkdir()
    assert write_model_card(tmp_path / "b", r).read_text() == text  # deterministic
    multi = write_model_card(tmp_path / "b", sample_router_json("multi")).read_text()
    assert "argmax_j" in multi and "| 0.25 | 0.8 |" in multi and "Pair routing" not in multi
    assert "No cost was known" not in multi  # the sample's models are priced
    unpriced = sample_router_json("multi")
    unpriced["models"] = [{**m, "cost": None} for m in unpriced["models"]]
    unpriced["decision"] |= {"costs_assumed": True, "default_cost_weight": 0.0}
    card = write_model_card(tmp_path / "b", unpriced).read_text()
    assert "No cost was known: the default decision is the best predicted model (λ = 0)" in card
    assert "(default 0)" in card
    assert "no group smoothing; cluster prior (on validation) none" in text  # what the pipeline chose, from `selection`
    chosen = sample_router_json() | {"selection": {"group_by": "topic", "candidates": {"(none)": 0.6, "topic": 0.7},
                                                   "cluster_prior": {"chosen": {"k": 20, "temperature": 0.05, "beta": 0.5}}}}
    assert ("group smoothing by `topic` (cross-validated); cluster prior (on validation) k = 20, τ = 0.05, β = 0.5"
            in write_model_card(tmp_path / "b", chosen).read_text())
    kept_none = chosen | {"selection": chosen["selection"] | {"group_by": None}}
    assert "no group smoothing (cross-validated)" in write_model_card(tmp_path / "b", kept_none).read_text()
    assert "`quality` is the routing measure" not in text  # said only where the metrics have one
    measured = r | {"metrics": {"val": {"apgr": 0.61, "quality": 0.61}, "test": {"apgr": 0.59, "quality": 0.59}}}
    card = write_model_card(tmp_path / "b", measured).read_text()
    assert "| quality | 0.61 | 0.59 |" in card and "`quality` is the routing measure" in card


# ---------------------------------------------------------------------------------------------
# The whole report on a tiny bundle (real ONNX graph, real demo data, real MLflow store)
# ---------------------------------------------------------------------------------------------

DEMO_MODELS = ["small-7b", "medium-34b", "large-70b"]
# A pair bundle over the demo's cheapest and priciest models, calibrated at one strong share.
PAIR_DECISION = {"kind": "pair", "weak": "small-7b", "strong": "large-70b", "thresholds": {"0.5": 0.5},
                 "default_strong_fraction": 0.5}


def _demo_bundle(out, models, costs, decision, teacher, train=None):
    from pipeline.export import quantize, write_bundle
    from tests.fabricate import make_meta, mean_pool_graph

    stage = out.parent / f"{out.name}-stage"
    stage.mkdir(parents=True)
    mean_pool_graph(stage / "model.onnx", len(models))
    quantize(stage / "model.onnx", stage / "model.int8.onnx")
    meta = make_meta(len(models), decision)
    meta["models"] = [{"name": n, "cost": c, "index": i} for i, (n, c) in enumerate(zip(models, costs))]
    meta["config"] = {"teacher": {"path": str(teacher)}, "student": {"family": "static", "dim": 8}} | (
        {"train": train} if train else {})
    return write_bundle(out, stage / "model.onnx", stage / "model.int8.onnx", meta)


@pytest.fixture(scope="module")
def env(tmp_path_factory, demo_files):
    """Demo data ingested and labeled, a tiny teacher, and MLflow, all under one temporary root."""
    from pipeline.ingest import ingest
    from pipeline.label import label
    from tests.tiny import make_tiny_teacher

    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("PREROUTER_DATA_DIR", "data"), ("PREROUTER_MLRUNS_DIR", "mlruns"),
                         ("PREROUTER_CACHE_DIR", "cache"), ("PREROUTER_MODELS_DIR", "models")):
            mp.setenv(var, str(root / sub))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ingest(str(demo_files["wide"]), name="demo")
        label("demo")
        yield {"root": root, "teacher": make_tiny_teacher(root / "teacher"), "wide": demo_files["wide"],
               "pairwise": demo_files["pairwise"]}


def _test_split(name, models):
    from pipeline.label import load_labels

    ds, stats = load_labels(name)
    test = ds.filter(lambda r: r["split"] == "test")
    cols = [stats["models"].index(m) for m in models]
    return test, np.array(test["target"])[:, cols], np.array(test["mask"])[:, cols]


def test_report_on_a_three_model_bundle(env):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.common import setup_mlflow
    from pipeline.metrics import apgr, choose
    from pipeline.report import report
    from pipeline.runtime import Router

    decision = {"kind": "multi", "weak": "small-7b", "strong": "large-70b",
                "thresholds": {"0.2": 0.6, "0.5": 0.5, "0.8": 0.4}, "default_strong_fraction": 0.5,
                "cost_lambdas": {"0.25": 0.5, "0.5": 0.2, "1": 0.0}}
    bundle = _demo_bundle(env["root"] / "models" / "demo" / "bundle", DEMO_MODELS, [0.2, 0.8, 2.5], decision,
                          env["teacher"])
    assert "large-70b" in (bundle / "MODEL_CARD.md").read_text()  # the exporter's writer calls ours
    md = report(bundle, "demo")
    out = md.parent
    assert out == bundle.parent / "report"
    text = md.read_text()
    for section in ("## Pair routing", "## 3 models: cost vs quality", "## Calibration drift", "### by `family`",
                    "## Router vs cascade vs ensemble"):
        assert section in text, section
    for png in ("quality_curves.png", "cost_quality.png", "economics.png"):
        assert _is_real_png(out / png) and f"({png})" in text

    # The numbers are those of the runtime's scores on the test split, recomputed here independently.
    test, y, mask = _test_split("demo", DEMO_MODELS)
    p = Router.load(bundle).scores(test["prompt"])
    score = (1 + p[:, 2] - p[:, 0]) / 2
    router_row = next(ln for ln in text.splitlines() if ln.startswith("| router | "))
    assert router_row.startswith(f"| router | {apgr(score, y[:, 0], y[:, 2]):.3f} |")
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["n_test"] == len(test)
    assert [d["realised"] for d in numbers["drift"]["thresholds"]] == pytest.approx(
        [np.mean(score >= t) for t in (0.6, 0.5, 0.4)])
    c = np.array([0.2, 0.8, 2.5]) / 2.5
    assert numbers["drift"]["cost_lambdas"][0]["realised"] == pytest.approx(c[choose(p, c, 0.5)].mean())
    families = numbers["breakdown"]["family"]
    assert sum(r["n"] for r in families) == len(test) and {r["group"] for r in families} <= set(test["family"])
    assert all(0 <= r["group best"] <= 1 for r in families) and "group best quality" in text
    strategies = {r["strategy"]: r for r in numbers["economics"]["rows"]}
    assert {"router", "cascade (judge acc 0.85)", "ensemble (judge pick)"} <= set(strategies)
    assert strategies["ensemble (judge pick)"]["p50_s"] >= strategies["always large-70b"]["p50_s"]
    assert numbers["multi"]["methods"]["router"]["aiq"] > 0
    assert numbers["multi"]["methods"]["cluster router"]["aiq"] > 0  # its α sweep
    assert "cluster router" in numbers["pair"]["methods"] and "| cluster router | " in text

    setup_mlflow()
    runs = mlflow.search_runs(filter_string="tags.mlflow.runName = 'report-demo'", output_format="list")
    assert len(runs) == 1
    assert runs[0].data.metrics["pair.methods.router.apgr"] == pytest.approx(apgr(score, y[:, 0], y[:, 2]))
    logged = {a.path for a in MlflowClient().list_artifacts(runs[0].info.run_id, "report")}
    assert {"report/report.md", "report/economics.png"} <= logged


def test_report_from_a_data_file_on_a_pair_bundle(env, tmp_path):
    from pipeline.report import report

    bundle = _demo_bundle(tmp_path / "pair" / "bundle", ["small-7b", "large-70b"], [None, None], PAIR_DECISION,
                          env["teacher"])
    md = report(bundle, str(env["wide"]), out=tmp_path / "r")  # ingested and labeled under its file stem
    text = md.read_text()
    assert "on `demo_wide`" in text and "## Pair routing" in text and "cost vs quality" not in text
    assert "always small-7b" in text and "strong fraction = " in text  # pair economics: fraction sweep
    assert _is_real_png(md.parent / "economics.png")
    import pandas as pd

    renamed = tmp_path / "demo_wide.csv"  # the same file with other names, so the same dataset name
    pd.read_csv(env["wide"]).rename(columns={"prompt": "text", "small-7b": "small"}).to_csv(renamed, index=False)
    again = report(bundle, str(renamed), out=tmp_path / "r2", read={"rename": {"text": "prompt", "small": "small-7b"}})
    first, second = (json.loads((d.parent / "report.json").read_text()) for d in (md, again))
    assert second["pair"] == first["pair"]


def test_a_report_over_unknown_costs_says_so_in_its_text_and_figure(env, tmp_path, monkeypatch):
    import pipeline.report as report_module

    units, real_plot = [], report_module.plot_cost_quality

    def recording_plot(*args, **kwargs):
        units.append(kwargs["cost_unit"])
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(report_module, "plot_cost_quality", recording_plot)
    decision = {"kind": "multi", "weak": "small-7b", "strong": "large-70b", "thresholds": {"0.5": 0.5},
                "default_strong_fraction": 0.5, "cost_lambdas": {"1": 0.0}, "costs_assumed": True}
    for costs in ([None] * 3, [0.2, 0.8, 2.5]):
        bundle = _demo_bundle(tmp_path / str(costs[0]) / "bundle", DEMO_MODELS, costs, decision, env["teacher"])
        text = " ".join(report_module.report(bundle, "demo", out=tmp_path / f"r{costs[0]}").read_text().split())
        assumed = costs[0] is None
        assert ("unknown costs: model j is taken to cost j + 1" in text) == assumed
        assert ("costs unknown: model j taken to cost j + 1" in units[-1]) == assumed
        # The economics simulation prices unknown models alike, so the router's λ sweep (over stand-in costs) is out.
        rows = json.loads((tmp_path / f"r{costs[0]}" / "report.json").read_text())["economics"]["rows"]
        assert any(r["strategy"].startswith("router @") for r in rows) != assumed
        assert ("The router's λ sweep is left out" in text) == assumed


def test_report_refuses_mismatched_models_and_foreign_folders(env, tmp_path):
    from pipeline.common import ConfigError, DataError
    from pipeline.report import report

    bundle = _demo_bundle(tmp_path / "b" / "bundle", ["alpha", "beta"], [1.0, 2.0],
                          {"kind": "pair", "weak": "alpha", "strong": "beta", "thresholds": {"0.5": 0.5}}, env["teacher"])
    with pytest.raises(DataError, match="no outcomes for"):
        report(bundle, "demo", out=tmp_path / "r")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a report folder"):
        report(bundle, "demo", out=tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="neither a data file nor a dataset"):
        report(bundle, "no-such-dataset", out=tmp_path / "r")


def test_report_reads_templated_prompts_as_training_did(env, tmp_path, monkeypatch):
    """The baselines' teacher features are those of the texts training embedded (shared templates
    shortened), so the report finds every prompt in the teacher cache instead of embedding other texts."""
    import pandas as pd

    from pipeline.config import load_config
    from pipeline.data import prepare
    from pipeline.ingest import ingest
    from pipeline.label import label
    from pipeline.report import report
    from tests.tiny import count_teacher_inputs

    shots = "Answer the question about the numbers below, as in these examples. " * 3
    close = "\nReply with one word only, and nothing else at all, please.\nAnswer:"
    rng = np.random.default_rng(0)
    prompts = [shots + f"Is {i} larger than {i % 17}?" + close for i in range(150)]
    prompts += [f"Write a short poem about the number {i}." for i in range(150)]
    data = tmp_path / "templated.csv"
    pd.DataFrame({"prompt": prompts, "small-7b": rng.random(300) < 0.4, "large-70b": rng.random(300) < 0.7}).to_csv(
        data, index=False)
    ingest(str(data), name="templated")
    label("templated")
    cfg = load_config(None, [f"teacher.path={env['teacher']}"])
    prep = prepare("templated", cfg)  # what training embeds, into the teacher cache
    assert prep.templates and prep.templates["prefixes"]  # the shared start is a learned template

    bundle = _demo_bundle(tmp_path / "t" / "bundle", ["small-7b", "large-70b"], [None, None], PAIR_DECISION,
                          env["teacher"])
    encoded = count_teacher_inputs(monkeypatch)
    text = report(bundle, "templated", out=tmp_path / "r").read_text()
    assert "teacher embeddings" in text and sum(encoded) == 0


def test_report_on_arena_battles_skips_the_simulation_and_says_why(env, tmp_path):
    """Arena-style battles observe two models per prompt: a cascade or an ensemble over all three cannot be
    simulated on any prompt, so that section says so and the rest of the report is written."""
    import json

    import pandas as pd

    from pipeline.report import report

    battles = pd.read_parquet(env["pairwise"]).drop_duplicates("prompt")  # one battle per prompt
    data = tmp_path / "arena.csv"
    battles.to_csv(data, index=False)
    decision = {"kind": "multi", "weak": "small-7b", "strong": "large-70b", "thresholds": {"0.5": 0.5},
                "default_strong_fraction": 0.5, "cost_lambdas": {"0.5": 0.2}}
    bundle = _demo_bundle(tmp_path / "a" / "bundle", DEMO_MODELS, [0.2, 0.8, 2.5], decision, env["teacher"])
    md = report(bundle, str(data), out=tmp_path / "r")
    text = md.read_text()
    assert "## 3 models: cost vs quality" in text
    assert "Skipped: no test prompt has an outcome for all 3 models" in text and "economics.png" not in text
    assert "skipped" in json.loads((md.parent / "report.json").read_text())["economics"]


def test_breakdown_groups_by_the_files_own_categorical_columns(env, tmp_path):
    """Whatever a file calls its groups (`task` here) the breakdown uses them, from the ingest's metadata
    columns; a column with a value per prompt (free text, ids) is no grouping and gets no table, nor does a
    nested one (a record per prompt, as Arena's moderation flags), whose values would print as dict text."""
    import json

    import pandas as pd

    from pipeline.ingest import ingest
    from pipeline.label import label
    from pipeline.report import report

    df = pd.read_csv(env["wide"])
    df["task"] = [f"task-{i % 3}" for i in range(len(df))]
    df["note"] = [f"written by annotator {i}" for i in range(len(df))]
    df["moderation"] = [{"flagged": i % 2 == 0} for i in range(len(df))]
    data = tmp_path / "tasked.parquet"
    df.to_parquet(data, index=False)
    ingest(str(data), name="tasked")
    label("tasked")
    bundle = _demo_bundle(tmp_path / "b" / "bundle", ["small-7b", "large-70b"], [None, None], PAIR_DECISION,
                          env["teacher"])
    md = report(bundle, "tasked", out=tmp_path / "r")
    breakdown = json.loads((md.parent / "report.json").read_text())["breakdown"]
    assert "task" in breakdown and "note" not in breakdown and "moderation" not in breakdown
    assert {r["group"] for r in breakdown["task"]} == {"task-0", "task-1", "task-2"}
    assert "### by `task`" in md.read_text() and "### by `note`" not in md.read_text()


def test_report_fits_its_baselines_on_the_train_prompts_the_router_had(env, tmp_path):
    """Trained with `train.limit_train_prompts`, the router saw only N of the train prompts: the report's
    baselines (and the templates it learns) use the same ones, as evaluate does."""
    import json

    from pipeline.config import load_config
    from pipeline.data import prepare
    from pipeline.report import report

    bundle = _demo_bundle(tmp_path / "l" / "bundle", ["small-7b", "large-70b"], [None, None], PAIR_DECISION,
                          env["teacher"],
                          train={"limit_train_prompts": 50})
    numbers = json.loads((report(bundle, "demo", out=tmp_path / "r").parent / "report.json").read_text())
    prep = prepare("demo", load_config(overrides=[f"teacher.path={env['teacher']}", "train.limit_train_prompts=50"]))
    assert numbers["n_train"] == len(prep.rows("train")) == 50
