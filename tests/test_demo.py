
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline import demo


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = demo.generate(tmp_path / "a", n_prompts=300, seed=1)
    b = demo.generate(tmp_path / "b", n_prompts=300, seed=1)
    c = demo.generate(tmp_path / "c", n_prompts=300, seed=2)
    for layout in ("wide", "long"):
        assert a[layout].read_bytes() == b[layout].read_bytes()
        assert a[layout].read_bytes() != c[layout].read_bytes()
    assert pq.read_table(a["pairwise"]).equals(pq.read_table(b["pairwise"]))


def test_three_layouts_share_prompts_and_columns(demo_files):
    wide = pd.read_csv(demo_files["wide"])
    long = pd.read_json(demo_files["long"], lines=True)
    pair = pq.read_table(demo_files["pairwise"]).to_pandas()
    assert len(wide) == 600 and len(long) == 600 * len(demo.MODELS) and len(pair) == 1200
    for m in demo.MODELS:
        assert wide[m].dtype == bool and f"{m}|total_cost" in wide
    assert set(wide.family) == set(demo.FAMILIES)
    assert set(long.prompt) == set(wide.prompt) == set(pair.prompt)
    assert long.score.between(1, 10).all() and set(long.model) == set(demo.MODELS)
    assert set(pair.winner) == {"model_a", "model_b", "tie", "tie (bothbad)"}
    assert (pair.model_a != pair.model_b).all()


def test_costs_follow_prices(demo_files):
    wide = pd.read_csv(demo_files["wide"])
    means = [wide[f"{m}|total_cost"].mean() for m in demo.MODELS]
    assert means == sorted(means) and means[0] < means[-1] / 5


def test_the_story_gives_a_router_something_to_learn(tmp_path):
    wide = pd.read_csv(demo.generate(tmp_path, n_prompts=3000, seed=0)["wide"])
    by_family = wide.groupby("family")[list(demo.MODELS)].mean()
    # The small model is fine at trivia/writing and poor at math/code; the large one better everywhere.
    assert by_family.loc["trivia", "small-7b"] > 0.8 and by_family.loc["math", "small-7b"] < 0.2
    assert (by_family["large-70b"] >= by_family["small-7b"]).all()
    assert wide["small-7b"].mean() < wide["medium-34b"].mean() < wide["large-70b"].mean()
    # Hard keywords and length make prompts harder for everyone.
    hard = wide.prompt.str.contains("prove|rigorous", case=False)
    assert wide.loc[hard, "large-70b"].mean() < wide.loc[~hard, "large-70b"].mean()
    words = wide.prompt.str.split().str.len()
    assert wide.loc[words > 50, "medium-34b"].mean() < wide.loc[words < 25, "medium-34b"].mean()
    assert demo.difficulty("Prove it.", "math") > demo.difficulty("Who wrote Dune?", "trivia")


def test_cli_writes_files(tmp_path, cli):
    code, out = cli("demo-data", "--out", tmp_path / "raw", "--n-prompts", "100")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == \
        ["demo_long.jsonl", "demo_pairwise.parquet", "demo_wide.csv"]
    assert len(np.unique(pd.read_csv(tmp_path / "raw" / "demo_wide.csv").sample_id)) == 100
