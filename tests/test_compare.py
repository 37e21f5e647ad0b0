"""compare: paired bootstrap, verdicts and exit codes on planted better / equal / worse challengers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.compare import paired_bootstrap


# ---- the paired bootstrap on fixtures with a known answer ---------------------------------------

def test_bootstrap_of_a_constant_shift_is_that_shift_exactly():
    x = np.random.default_rng(1).random(50)
    r = paired_bootstrap(lambda i: x[i].mean(), lambda i: (x[i] + 0.1).mean(), 50, resamples=200)
    assert r["diff"] == pytest.approx(0.1)
    assert r["lo"] == pytest.approx(0.1) and r["hi"] == pytest.approx(0.1)


def test_bootstrap_of_identical_metrics_is_zero_wide():
    x = np.random.default_rng(2).random(30)
    r = paired_bootstrap(lambda i: x[i].mean(), lambda i: x[i].mean(), 30, resamples=200)
    assert (r["diff"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_of_a_mean_difference_matches_the_normal_one():
    """Paired: a shared per-prompt component (large) cancels; only the difference's spread counts."""
    rng = np.random.default_rng(3)
    n = 2000
    shared = rng.normal(0, 1.0, n)
    d = rng.normal(0.05, 0.2, n)
    r = paired_bootstrap(lambda i: shared[i].mean(), lambda i: (shared[i] + d[i]).mean(), n, resamples=2000)
    half = 1.96 * d.std() / np.sqrt(n)
    assert r["diff"] == pytest.approx(d.mean())
    assert r["lo"] == pytest.approx(d.mean() - half, abs=0.0015)
    assert r["hi"] == pytest.approx(d.mean() + half, abs=0.0015)


def test_bootstrap_leaves_out_undefined_resamples():
    x = np.arange(10.0)
    r = paired_bootstrap(lambda i: x[i].mean(), lambda i: np.nan if 0 in i else x[i].mean() + 1, 10, resamples=300)
    assert r["undefined"] > 0 and r["resamples"] + r["undefined"] == 300
    assert r["lo"] == pytest.approx(1.0) and r["hi"] == pytest.approx(1.0)


# ---- verdicts through the CLI ------------------------------------------------------------------

@pytest.fixture
def env(planted_bundles, monkeypatch):
    tmp = planted_bundles["tmp"]
    for var, sub in (("PREROUTER_DATA_DIR", "data"), ("PREROUTER_MLRUNS_DIR", "mlruns"),
                     ("PREROUTER_MODELS_DIR", "models")):
        monkeypatch.setenv(var, str(tmp / sub))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return planted_bundles


@pytest.mark.parametrize("champion, challenger, code", [
    ("reversed", "good", 0),  # planted better
    ("good", "good", 0),  # equal: difference 0 with a zero-width interval
    ("good", "reversed", 1),  # planted worse
])
def test_verdict_exit_codes(env, cli, tmp_path, champion, challenger, code):
    code_, out = cli("compare", env[champion], env[challenger], "--data", "demo", "--out", tmp_path, "--resamples", 300)
    assert code_ == code, out
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["verdict"] == ("promote" if code == 0 else "keep")
    assert result["metric"] == "apgr" and result["prompts"] == "the test split"
    d = result["pair"]["diff"]["apgr"]
    assert (d["lo"] > -0.01) == (code == 0)
    if champion == challenger:
        assert d["lo"] == d["hi"] == 0.0 and result["pair"]["shares"]["0.5"]["agreement"] == 1.0
    md = (tmp_path / "compare.md").read_text()
    assert "APGR" in md and "95% CI" in md and "matched strong shares" in md


def test_a_shuffled_label_challenger_is_refused_on_a_held_out_file(env, cli, tmp_path):
    from pipeline.common import processed_dir

    code, out = cli("compare", env["good"], env["shuffled"], "--data", env["held_out"], "--out", tmp_path,
                    "--resamples", 300)
    assert code == 1, out
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["prompts"].startswith("every prompt") and result["n_prompts"] > 300
    assert result["pair"]["diff"]["apgr"]["hi"] < 0
    assert "multi" in result and "routed" in result["multi"]["diff"]
    assert not any(p.name.startswith("_compare") for p in processed_dir("x").parent.iterdir())  # temp name removed


def test_a_held_out_file_with_other_column_names_is_read_with_rename(env, cli, tmp_path):
    import pandas as pd

    held = pd.read_csv(env["held_out"])
    renamed = tmp_path / "renamed.csv"
    held.rename(columns={"prompt": "question", "large-70b": "big"}).to_csv(renamed, index=False)
    code, out = cli("compare", env["good"], env["shuffled"], "--data", renamed, "--out", tmp_path / "a",
                    "--resamples", 300)
    assert code == 2 and "--rename OLD=prompt" in out, out
    code, out = cli("compare", env["good"], env["shuffled"], "--data", renamed, "--out", tmp_path / "a",
                    "--resamples", 300, "--rename", "question=prompt,big=large-70b")
    assert code == 1, out
    assert cli("compare", env["good"], env["shuffled"], "--data", env["held_out"], "--out", tmp_path / "b",
               "--resamples", 300)[0] == 1
    a, b = (json.loads((tmp_path / d / "compare.json").read_text()) for d in "ab")
    assert a["n_prompts"] == b["n_prompts"] and a["pair"] == b["pair"] and a["multi"] == b["multi"]


def test_a_held_out_file_is_read_with_models_and_layout(env, cli, tmp_path):
    import pandas as pd

    held = pd.read_csv(env["held_out"])
    extra = tmp_path / "extra.csv"  # without costs, an integer column of 0s and 1s reads as a model
    held = held.drop(columns=[c for c in held.columns if c.endswith("|total_cost")])
    held.assign(shots=np.where(np.arange(len(held)) % 50 == 0, 5, np.arange(len(held)) % 2)).to_csv(extra, index=False)
    code, out = cli("compare", env["good"], env["shuffled"], "--data", extra, "--out", tmp_path / "a", "--resamples",
                    300)
    assert code == 2 and "column 'shots'" in out and "name the model columns with --models" in out, out
    code, out = cli("compare", env["good"], env["shuffled"], "--data", extra, "--out", tmp_path / "a", "--resamples",
                    300, "--layout", "wide", "--models", "small-7b,medium-34b,large-70b")
    assert code == 1, out
    assert cli("compare", env["good"], env["shuffled"], "--data", env["held_out"], "--out", tmp_path / "b",
               "--resamples", 300)[0] == 1
    a, b = (json.loads((tmp_path / d / "compare.json").read_text()) for d in "ab")
    assert a["n_prompts"] == b["n_prompts"] and a["pair"] == b["pair"] and a["multi"] == b["multi"]


def test_reading_options_for_a_dataset_name_are_an_error(env, cli, tmp_path):
    code, out = cli("compare", env["good"], env["shuffled"], "--data", "demo", "--out", tmp_path, "--rename", "a=b",
                    "--models", "x,y")
    assert code == 2 and "--models, --rename read a data file; 'demo' is not a file" in out, out


def test_bundles_with_different_models_are_compared_on_the_shared_ones(env, cli, tmp_path):
    code, out = cli("compare", env["good"], env["two"], "--data", "demo", "--out", tmp_path, "--resamples", 200)
    assert code in (0, 1), out
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["models"] == ["small-7b", "large-70b"]
    assert "compared on the 2 they share" in result["notes"][0]
    assert "multi" not in result  # two shared models: the pair only
    assert "compared on the 2 they share" in (tmp_path / "compare.md").read_text()


def test_the_comparison_is_logged_to_mlflow(env, cli, tmp_path):
    import mlflow

    from pipeline.common import setup_mlflow

    code, _ = cli("compare", env["good"], env["reversed"], "--data", "demo", "--out", tmp_path, "--resamples", 200)
    assert code == 1
    setup_mlflow()
    runs = mlflow.search_runs(filter_string="tags.mlflow.runName = 'compare'", order_by=["start_time DESC"])
    assert runs.iloc[0]["tags.verdict"] == "keep"
    assert runs.iloc[0]["metrics.apgr_diff"] < 0


@pytest.mark.parametrize("args, message", [
    (("{good}", "{tmp}/nope"), "router.json is missing"),
    (("{good}", "{good}", "--data", "no-such-set"), "neither a data file nor a dataset"),
    (("{good}", "{good}", "--margin", "-1"), "--margin"),
])
def test_bad_input_exits_2(env, cli, tmp_path, args, message):
    filled = [a.format(good=env["good"], tmp=tmp_path) for a in args]
    if "--data" not in filled:
        filled += ["--data", "demo"]
    code, out = cli("compare", *filled, "--out", tmp_path)
    assert code == 2, out
    assert message in out
