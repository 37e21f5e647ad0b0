import hashlib

import numpy as np
import pandas as pd
import pytest

from pipeline.common import ConfigError, DataError, labels_dir, read_json
from pipeline.config import LabelConfig
from pipeline.ingest import ingest
from pipeline.label import bradley_terry, label, load_labels, split_of


def long_dataset(tmp_path, rows, name="d"):
    """Ingest (prompt, model, score) tuples as a long-layout dataset."""
    path = tmp_path / f"{name}.jsonl"
    pd.DataFrame(rows, columns=["prompt", "model", "score"]).to_json(path, orient="records", lines=True)
    ingest(str(path))
    return name


def targets(name):
    ds, stats = load_labels(name)
    df = ds.to_pandas().set_index("prompt")
    return df, stats


# --- split rule ---------------------------------------------------------------------------------


def test_split_rule_by_hand():
    for prompt in ["hello", "What is 2+2?", "ünïcode ✓", ""]:
        h = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        expected = ("test" if int(h[:8], 16) / 0xFFFFFFFF < 0.2
                    else "val" if int(h[8:16], 16) / 0xFFFFFFFF < 0.1 else "train")
        assert split_of(prompt) == expected
    assert split_of("hello", test_fraction=0.0, val_fraction=0.0) == "train"
    assert split_of("hello", test_fraction=0.999999, val_fraction=0.0) == "test"


def test_split_fractions_and_determinism():
    prompts = [f"prompt number {i}" for i in range(20_000)]
    splits = pd.Series([split_of(p) for p in prompts])
    assert splits.eq("test").mean() == pytest.approx(0.2, abs=0.01)
    assert splits.eq("val").mean() == pytest.approx(0.8 * 0.1, abs=0.01)
    assert [split_of(p) for p in prompts[:100]] == splits[:100].tolist()


def test_label_splits_follow_split_of_and_fractions(data_dir, demo_files):
    ingest(str(demo_files["wide"]), name="demo")
    stats = label("demo", LabelConfig(test_fraction=0.3, val_fraction=0.2))
    df, _ = targets("demo")
    assert (df.split == [split_of(p, 0.3, 0.2) for p in df.index]).all()
    assert stats["splits"] == {s: int((df.split == s).sum()) for s in ("train", "val", "test")}
    assert sum(stats["splits"].values()) == stats["n_prompts"] == len(df)


def test_small_validation_and_test_splits_are_called_noisy(data_dir, tmp_path, capsys):
    rows = [(f"prompt {i}", m, (i + j) % 2) for i in range(1500) for j, m in enumerate("ab")]
    stats = label(long_dataset(tmp_path, rows), LabelConfig(test_fraction=0.3, val_fraction=0.3))
    assert min(stats["splits"]["val"], stats["splits"]["test"]) >= 200
    assert "moves by chance" not in capsys.readouterr().err
    stats = label(long_dataset(tmp_path, rows[:80], name="small"))
    err = " ".join(capsys.readouterr().err.split())
    val, test = stats["splits"]["val"], stats["splits"]["test"]
    assert f"val has {val} prompts (±{0.5 / val ** 0.5:.2f}) and test has {test} prompts" in err
    assert "moves by chance" in err


@pytest.mark.parametrize("n_models", [20, 40])
def test_a_long_model_table_shows_its_ends_and_the_pair(data_dir, tmp_path, capsys, n_models):
    # model m is right on a share m / n_models of the prompts, so the ranking is the model number
    rows = [(f"prompt {i}", f"m{m:02d}", int(i % n_models < m)) for i in range(400) for m in range(n_models)]
    stats = label(long_dataset(tmp_path, rows, name=f"many{n_models}"),
                  LabelConfig(weak="m07", strong="m30" if n_models == 40 else None))
    shown = [line.split("│")[1].strip() for line in capsys.readouterr().err.splitlines() if line.startswith("│")]
    names = [name.split(" ")[0] for name in shown]
    if n_models == 20:  # up to SHOWN_MODELS: every model, weakest first
        assert names == [f"m{m:02d}" for m in range(20)] and stats["pair"]["weak"] == "m07"
        return
    assert names == ["m00", "m01", "m02", "m03", "m04", "…", "m07", "…", "m30", *[f"m{m}" for m in range(31, 40)]]
    assert shown[5] == "… 2 more" and shown[7] == "… 22 more"
    assert "m07 (weak)" in shown and "m30 (strong)" in shown
    assert len(stats["models"]) == 40  # the stats keep every model


# --- Bradley-Terry ------------------------------------------------------------------------------


def simulate_battles(strength, n, seed=0, tie_rate=0.0):
    rng = np.random.default_rng(seed)
    m = len(strength)
    a = rng.integers(m, size=n)
    b = (a + rng.integers(1, m, size=n)) % m
    p_a = 1 / (1 + np.exp(strength[b] - strength[a]))
    score = (rng.random(n) < p_a).astype(float)
    score[rng.random(n) < tie_rate] = 0.5
    return a, b, score


def test_bradley_terry_recovers_strengths():
    true = np.array([-1.0, 0.0, 0.5, 1.5])
    a, b, score = simulate_battles(true, 40_000)
    est = bradley_terry(a, b, score, 4)
    assert list(np.argsort(est)) == [0, 1, 2, 3]
    np.testing.assert_allclose(est, true - true.mean(), atol=0.08)


def test_bradley_terry_ties_and_degenerate_models():
    a, b = np.array([0, 1, 2] * 100), np.array([1, 2, 0] * 100)
    np.testing.assert_allclose(bradley_terry(a, b, np.full(300, 0.5), 3), 0, atol=1e-6)  # all ties: equal
    # Model 2 never wins, model 0 never loses: still finite and ordered.
    a, b, s = np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([1.0, 1.0, 1.0])
    est = bradley_terry(a, b, s, 3)
    assert np.isfinite(est).all() and est[0] > est[1] > est[2]


def test_bradley_terry_recovers_50_strengths_from_a_million_battles():
    a, b, score = simulate_battles(np.linspace(-2, 2, 50), 1_000_000, seed=1)
    est = bradley_terry(a, b, score, 50)  # its speed is measured by bench/scale.py, not here
    assert np.corrcoef(est, np.linspace(-2, 2, 50))[0, 1] > 0.999


def test_pairwise_labels_strengths_tiers_and_pair(data_dir, tmp_path):
    true = np.array([-1.0, -0.3, 0.4, 1.2])
    names = ["m0", "m1", "m2", "m3"]
    a, b, score = simulate_battles(true, 4000, seed=2, tie_rate=0.1)
    df = pd.DataFrame({"prompt": [f"q{i % 500}" for i in range(4000)], "model_a": np.array(names)[a],
                       "model_b": np.array(names)[b],
                       "winner": np.where(score == 1, "model_a", np.where(score == 0, "model_b", "tie"))})
    df.to_parquet(tmp_path / "bt.parquet")
    ingest(str(tmp_path / "bt.parquet"))
    stats = label("bt", LabelConfig(tiers=2))
    assert sorted(stats["strengths"], key=stats["strengths"].get) == names
    assert stats["tiers"] == {"m0": "weak", "m1": "weak", "m2": "strong", "m3": "strong"}
    assert stats["pair"] == {"weak": "m0", "strong": "m3"}
    wins = df.assign(s=score).query("model_a == 'm3'").s.sum() + (1 - df.assign(s=score).query("model_b == 'm3'").s).sum()
    n = ((df.model_a == "m3") | (df.model_b == "m3")).sum()
    assert stats["per_model"]["m3"] == {"rate": pytest.approx(wins / n), "n": n}
    stats = label("bt", LabelConfig(tiers=3))
    assert stats["tiers"] == {"m0": "weak", "m1": "weak", "m2": "mid1", "m3": "strong"}


def test_a_reference_in_every_battle_gets_target_half(data_dir, tmp_path):
    # AlpacaEval-style: every model meets only the reference. The reference's mean score against the
    # field (it beats the weak ones) must not be compared with the others' scores against it.
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        for m, p_win in (("strong", 0.8), ("weak", 0.2)):  # the models' chance to beat the reference
            won = rng.random() < p_win
            rows.append({"prompt": f"q{i}", "model_a": m, "model_b": "ref", "winner": "model_a" if won else "model_b"})
    pd.DataFrame(rows).to_parquet(tmp_path / "star.parquet")
    ingest(str(tmp_path / "star.parquet"))
    stats = label("star")
    df, _ = targets("star")
    ref = stats["models"].index("ref")
    assert stats["reference"] == "ref"
    assert {float(t[ref]) for t in df.target} == {0.5}
    strong = stats["models"].index("strong")
    # the others keep their scores against the reference; the reference's own rate (it beat "weak" often)
    # stays in per_model, but no longer ranks it above "strong" as a routing target
    assert np.mean([t[strong] for t in df.target]) > 0.6
    assert stats["per_model"]["ref"]["rate"] > 0.45


def test_no_reference_when_models_meet_each_other(data_dir, tmp_path):
    rows = [{"prompt": f"q{i}", "model_a": a, "model_b": b, "winner": "model_a"}
            for i in range(10) for a, b in (("x", "y"), ("y", "z"), ("x", "z"))]
    pd.DataFrame(rows).to_parquet(tmp_path / "chain.parquet")
    ingest(str(tmp_path / "chain.parquet"))
    stats = label("chain")
    assert stats["reference"] is None
    df, _ = targets("chain")
    assert {float(t[stats["models"].index("y")]) for t in df.target} == {0.5}  # won one, lost one: its real mean
    assert {float(t[stats["models"].index("x")]) for t in df.target} == {1.0}


def test_labels_are_read_and_written_with_the_dataset_version_they_came_from(data_dir, tmp_path):
    from pipeline.common import processed_dir

    first = long_dataset(tmp_path, [("p", "a", 0.0), ("p", "b", 1.0), ("q", "a", 1.0), ("q", "b", 1.0)], name="v")
    label(first)
    pinned = processed_dir("v").resolve()  # what a stage resolves once before reading
    # the same name ingested again with other outcomes: a new version, not yet labeled
    long_dataset(tmp_path, [("p", "a", 1.0), ("p", "b", 0.0), ("r", "a", 0.0), ("r", "b", 1.0)], name="v")
    assert processed_dir("v").resolve() != pinned and (pinned / "labels").is_dir()
    ds, stats = load_labels("v", pinned)  # the pinned reader still sees its own version whole
    assert sorted(ds["prompt"]) == ["p", "q"] and stats["n_prompts"] == 2
    with pytest.raises(DataError, match="no labels"):
        load_labels("v")  # the new version has none yet
    label("v")
    assert sorted(load_labels("v")[0]["prompt"]) == ["p", "r"]
    assert (processed_dir("v").resolve() / "labels" / "label_stats.json").is_file()


# --- targets ------------------------------------------------------------------------------------


def test_judge_scores_are_normalised(data_dir, tmp_path):
    name = long_dataset(tmp_path, [("p", "a", 1), ("p", "b", 10), ("q", "a", 4), ("q", "b", 7)])
    stats = label(name)
    df, _ = targets(name)
    assert stats["scale"]["range"] == [1.0, 10.0]
    np.testing.assert_allclose(np.stack(df.target.loc[["p", "q"]]), [[0, 1], [1 / 3, 2 / 3]], atol=1e-6)


def test_unit_scores_kept_and_other_ranges_min_max(data_dir, tmp_path, capsys):
    name = long_dataset(tmp_path, [("p", "a", 0.25), ("p", "b", 0.75)], name="unit")
    label(name)
    np.testing.assert_allclose(targets(name)[0].target["p"], [0.25, 0.75])
    name = long_dataset(tmp_path, [("p", "a", 20), ("p", "b", 70), ("q", "a", 120), ("q", "b", 45)], name="big")
    stats = label(name)
    assert "min-max" in capsys.readouterr().err and stats["scale"]["range"] == [20.0, 120.0]
    np.testing.assert_allclose(np.stack(targets(name)[0].target.loc[["p", "q"]]), [[0, 0.5], [1, 0.25]])


def test_declared_range_and_threshold(data_dir, tmp_path):
    name = long_dataset(tmp_path, [("p", "a", 2), ("p", "b", 4), ("q", "a", 3), ("q", "b", 5)])
    label(name, LabelConfig(score_range=(0, 5)))
    np.testing.assert_allclose(np.stack(targets(name)[0].target.loc[["p", "q"]]), [[0.4, 0.8], [0.6, 1.0]])
    label(name, LabelConfig(score_range=(0, 5), threshold=0.7))
    np.testing.assert_allclose(np.stack(targets(name)[0].target.loc[["p", "q"]]), [[0, 1], [0, 1]])
    with pytest.raises(DataError, match="outside label.score_range"):
        label(name, LabelConfig(score_range=(0, 4)))


def test_difficulty_soft_labels_and_balance(data_dir, tmp_path):
    rows = [("both", "weak", 1), ("both", "strong", 1), ("neither", "weak", 0), ("neither", "strong", 0),
            ("strong only", "weak", 0), ("strong only", "strong", 1), ("weak only", "weak", 1),
            ("weak only", "strong", 0), ("weak only", "mid", 1), ("no weak", "strong", 1), ("no weak", "mid", 0)]
    name = long_dataset(tmp_path, rows)
    stats = label(name, LabelConfig(weak="weak", strong="strong"))
    df, _ = targets(name)
    assert df.soft_label.loc[["both", "neither", "strong only", "weak only"]].tolist() == [1, 1, 0, 1]
    assert np.isnan(df.soft_label["no weak"])
    assert df.difficulty.loc[["both", "neither", "strong only", "weak only", "no weak"]].tolist() == \
        pytest.approx([0, 1, 0.5, 1 / 3, 0.5])
    assert stats["balance"] == {"both_right": 0.25, "both_wrong": 0.25, "strong_only": 0.25, "weak_only": 0.25,
                                "n": 4, "soft_label_mean": 0.75}


def test_soft_label_relaxation(data_dir, tmp_path):
    name = long_dataset(tmp_path, [("p", "w", 6), ("p", "s", 8), ("q", "w", 2), ("q", "s", 9)])
    label(name, LabelConfig(weak="w", strong="s"))
    assert targets(name)[0].soft_label.loc[["p", "q"]].tolist() == [0, 0]
    label(name, LabelConfig(weak="w", strong="s", relaxation=2 / 9))  # p: 5/9 >= 7/9 - 2/9
    assert targets(name)[0].soft_label.loc[["p", "q"]].tolist() == [1, 0]


def test_default_pair_and_pair_errors(data_dir, tmp_path):
    name = long_dataset(tmp_path, [("p", "x", 0), ("p", "y", 1), ("p", "z", 1), ("q", "x", 0), ("q", "y", 0),
                                   ("q", "z", 1)])
    assert label(name)["pair"] == {"weak": "x", "strong": "z"}
    assert label(name, LabelConfig(strong="x"))["pair"] == {"weak": "y", "strong": "x"}
    with pytest.raises(ConfigError, match="'nope' is not in the dataset"):
        label(name, LabelConfig(weak="nope"))
    with pytest.raises(ConfigError, match="same model"):
        label(name, LabelConfig(weak="y", strong="y"))


def test_with_costs_the_default_weak_model_is_the_cheapest(data_dir, tmp_path, capsys):
    # 'worst' is right least often but costs more than 'cheap', which is right more often: a pair with
    # 'worst' as its weak side would pay more for less on every weak call.
    n = 40
    outcomes = {"worst": [i % 4 == 0 for i in range(n)], "cheap": [i % 2 == 0 for i in range(n)],
                "best": [i % 4 != 3 for i in range(n)]}

    def table(name, prices):
        df = pd.DataFrame({"prompt": [f"question {i}" for i in range(n)], **outcomes})
        for m, price in prices.items():
            df[f"{m}|total_cost"] = price
        df.to_csv(tmp_path / f"{name}.csv", index=False)
        ingest(str(tmp_path / f"{name}.csv"))
        return label(name)

    assert table("priced", {"worst": 0.5, "cheap": 0.1, "best": 2.0})["pair"] == {"weak": "cheap", "strong": "best"}
    assert "pair cheap -> best (the cheapest -> the strongest model" in " ".join(capsys.readouterr().err.split())
    assert table("unpriced", {})["pair"] == {"weak": "worst", "strong": "best"}
    assert "pair worst -> best (the weakest -> the strongest model" in " ".join(capsys.readouterr().err.split())
    assert table("one_price", {"worst": 1.0, "cheap": 1.0, "best": 1.0})["pair"] == {"weak": "worst", "strong": "best"}
    assert label("priced", LabelConfig(weak="worst"))["pair"] == {"weak": "worst", "strong": "best"}


def _votes(tmp_path, name, meetings):
    """A pairwise file: for (a, b, n, p_a), n prompts of their own on which a beats b with chance p_a."""
    rng, rows = np.random.default_rng(0), []
    for a, b, n, p_a in meetings:
        rows += [{"prompt": f"{a} meets {b}, question {i}", "model_a": a, "model_b": b,
                  "winner": "model_a" if rng.random() < p_a else "model_b"} for i in range(n)]
    pd.DataFrame(rows).to_parquet(tmp_path / f"{name}.parquet")
    ingest(str(tmp_path / f"{name}.parquet"))


def test_in_sparse_votes_the_default_pair_shares_enough_train_prompts(data_dir, tmp_path, capsys):
    # The extremes of the ranking are rare models that never met: a pair of them has no prompt to be
    # measured on. The strongest model that has a partner sharing 20+ train prompts is taken instead.
    _votes(tmp_path, "sparse", [("rare_weak", "mid1", 12, 0.1), ("mid1", "mid2", 400, 0.35),
                                ("mid2", "rare_strong", 12, 0.1)])
    stats = label("sparse")
    order = sorted(stats["strengths"], key=stats["strengths"].get)
    assert order == ["rare_weak", "mid1", "mid2", "rare_strong"]
    assert stats["pair"] == {"weak": "mid1", "strong": "mid2"}
    assert stats["pair_rule"] == "the weakest -> the strongest model that share 20+ train prompts"
    assert "that share 20+ train prompts" in " ".join(capsys.readouterr().err.split())
    # A named model is kept, and its partner found by the same rule; a named pair is kept as it is.
    assert label("sparse", LabelConfig(strong="rare_strong"))["pair"] == {"weak": "mid2", "strong": "rare_strong"}
    assert label("sparse", LabelConfig(weak="rare_weak", strong="rare_strong"))["pair_rule"] == "as named"
    # When no pair shares 20, the pair sharing the most.
    _votes(tmp_path, "thin", [("a", "b", 3, 0.2), ("b", "c", 15, 0.3), ("c", "d", 3, 0.2)])
    stats = label("thin")
    assert stats["pair"] == {"weak": "b", "strong": "c"}
    assert "sharing the most train prompts" in stats["pair_rule"]


def test_the_pair_is_ranked_on_train_prompts_only(data_dir, tmp_path):
    # x wins on the 10 train prompts, y on 40 test prompts: over all prompts y would rank higher.
    train = [p for p in (f"p{i}" for i in range(400)) if split_of(p) == "train"][:10]
    test = [p for p in (f"p{i}" for i in range(400)) if split_of(p) == "test"][:40]
    rows = [(p, "x", 1) for p in train] + [(p, "y", 0) for p in train]
    rows += [(p, "x", 0) for p in test] + [(p, "y", 1) for p in test]
    assert label(long_dataset(tmp_path, rows))["pair"] == {"weak": "y", "strong": "x"}
    battles = pd.DataFrame({"prompt": train + test, "model_a": "x", "model_b": "y",
                            "winner": ["model_a"] * len(train) + ["model_b"] * len(test)})
    battles.to_parquet(tmp_path / "votes.parquet")
    ingest(str(tmp_path / "votes.parquet"))
    stats = label("votes")
    assert stats["pair"] == {"weak": "y", "strong": "x"} and stats["strengths"]["x"] > stats["strengths"]["y"]


# --- artifact, skip, CLI ------------------------------------------------------------------------


def test_artifact_columns_and_stats_file(data_dir, demo_files):
    ingest(str(demo_files["long"]), name="demo")
    stats = label("demo")
    ds, saved = load_labels("demo")
    assert saved == read_json(labels_dir("demo") / "label_stats.json")
    assert saved["content_hash"] == stats["content_hash"]
    assert ds.column_names == ["prompt_id", "prompt", "target", "mask", "split", "difficulty", "soft_label", "family"]
    assert {str(ds.features[c]) for c in ("target",)} == {"List(Value('float32'))"}
    target = np.stack(ds["target"])
    assert target.min() >= 0 and target.max() <= 1
    for key in ("models", "n_prompts", "splits", "per_model", "strengths", "tiers", "pair", "balance", "dropped",
                "options", "content_hash"):
        assert key in saved
    assert saved["split_rule"] == "hash" and saved["split_by"] == "prompt hash"


def test_label_skips_when_unchanged(data_dir, tmp_path, cli):
    long_dataset(tmp_path, [("p", "a", 1), ("p", "b", 0), ("q", "a", 0), ("q", "b", 1)])
    code, out = cli("label", "d")
    assert code == 0 and "labels: d" in out
    first = read_json(labels_dir("d") / "label_stats.json")
    code, out = cli("label", "d")
    assert code == 0 and "unchanged, skipping" in out
    code, out = cli("label", "d", "--set", "label.relaxation=0.5")
    assert "labels: d" in out and read_json(labels_dir("d") / "label_stats.json")["content_hash"] != first["content_hash"]
    assert "labels: d" in cli("label", "d", "--set", "label.relaxation=0.5", "--force")[1]


def test_label_of_unknown_dataset_exits_2(data_dir, cli):
    code, out = cli("label", "missing")
    assert code == 2 and "no ingested dataset 'missing'" in out


def test_demo_end_to_end_from_the_cli(data_dir, tmp_path, cli):
    raw = tmp_path / "raw"
    assert cli("demo-data", "--out", raw, "--n-prompts", "400")[0] == 0
    for file in ("demo_wide.csv", "demo_long.jsonl", "demo_pairwise.parquet"):
        code, out = cli("ingest", raw / file)
        assert code == 0, out
        code, out = cli("label", file.split(".")[0])
        assert code == 0, out
        stats = read_json(labels_dir(file.split(".")[0]) / "label_stats.json")
        assert stats["pair"] == {"weak": "small-7b", "strong": "large-70b"}
        assert stats["costs"]["small-7b"] < stats["costs"]["medium-34b"] < stats["costs"]["large-70b"]


def test_limit_train_prompts_keeps_a_random_nested_sample_whatever_the_file_order():
    """A file sorted by task must not lose whole tasks to the limit: the kept prompts are chosen by id
    (a content hash), the same ones in any row order, and a smaller limit keeps a subset of a larger one."""
    from pipeline.common import prompt_id
    from pipeline.config import load_config
    from pipeline.label import training_split

    tasks = np.repeat(["a", "b", "c", "d"], 250)  # sorted by task, as many exports are
    ids = [prompt_id(f"{t} question {i}") for i, t in enumerate(tasks)]
    split = np.where(np.arange(1000) % 10 == 0, "test", "train")

    def kept(limit, order=np.arange(1000)):
        cfg = load_config(overrides=[f"train.limit_train_prompts={limit}"])
        s = training_split(split[order], [ids[i] for i in order], cfg)
        assert (s == "test").sum() == 100 and (s == "train").sum() == limit
        return {ids[i] for i, v in zip(order, s) if v == "train"}

    small, large = kept(100), kept(400)
    assert small < large
    assert kept(400, np.random.default_rng(0).permutation(1000)) == large
    per_task = {t: sum(ids[i] in large for i in np.flatnonzero(tasks == t)) for t in "abcd"}
    assert all(70 <= n <= 130 for n in per_task.values()), per_task  # first-400 would be all a's and b's
    assert (training_split(split, ids, load_config()) == split).all()  # no limit: untouched
