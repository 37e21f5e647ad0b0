"""ingest A B C --name N: several inputs merged into one dataset, with every source and its hash recorded."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest


def _dataset(name):
    import datasets

    from pipeline.common import arrow_table, processed_dir, read_json
    from pipeline.ingest import list_matrix

    table = arrow_table(datasets.load_from_disk(str(processed_dir(name) / "dataset")))
    frame = {"id": table.column("prompt_id").to_pylist()}
    out = {k: list_matrix(table, k, float) for k in ("outcome", "count", "mask")}
    order = np.argsort(frame["id"])
    return (np.array(frame["id"])[order], {k: v[order] for k, v in out.items()}, table,
            read_json(processed_dir(name) / "manifest.json"))


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def halves(demo_files, tmp_path):
    """The demo's wide file as two overlapping months: rows 0-349 and rows 300-599."""
    frame = pd.read_csv(demo_files["wide"])
    a, b = tmp_path / "march.csv", tmp_path / "april.csv"
    frame.iloc[:350].to_csv(a, index=False)
    frame.iloc[300:].to_csv(b, index=False)
    return a, b


def test_two_months_merge_like_one_file_holding_both(data_dir, cli, halves, tmp_path):
    """Merging follows the single-file duplicate rule: the same as ingesting one file of A's rows then B's."""
    a, b = halves
    joined = tmp_path / "joined.csv"
    pd.concat([pd.read_csv(a), pd.read_csv(b)]).to_csv(joined, index=False)
    assert cli("ingest", joined, "--name", "whole")[0] == 0
    code, out = cli("ingest", a, b, "--name", "both")
    assert code == 0, out
    ids_w, whole, table_w, manifest_w = _dataset("whole")
    ids_b, both, table_b, manifest = _dataset("both")
    assert list(ids_w) == list(ids_b)
    assert table_w.column("prompt_id").to_pylist() == table_b.column("prompt_id").to_pylist()  # same order
    for k in ("mask", "count"):
        assert np.array_equal(whole[k], both[k])
    np.testing.assert_allclose(whole["outcome"], both["outcome"], atol=1e-6)  # duplicates averaged
    assert both["count"].sum() == 650 * 3  # rows 300-349 are in both months: counted twice
    assert table_w.column("family").to_pylist() == table_b.column("family").to_pylist()
    assert manifest["layout"] == "wide" and manifest["n_rows_in"] == 650
    assert [s["source"] for s in manifest["sources"]] == [str(a), str(b)]
    assert [s["source_hash"] for s in manifest["sources"]] == [_sha(a), _sha(b)]
    assert [s["n_rows_in"] for s in manifest["sources"]] == [350, 300]
    assert manifest["costs"] == pytest.approx(manifest_w["costs"], rel=1e-5)


def test_unchanged_inputs_skip_and_a_new_month_is_one_command(data_dir, cli, halves, tmp_path):
    a, b = halves
    assert cli("ingest", a, b, "--name", "both")[0] == 0
    first = _dataset("both")[3]
    code, out = cli("ingest", a, b, "--name", "both")
    assert code == 0 and "unchanged, skipping" in out
    assert _dataset("both")[3]["created_at"] == first["created_at"]
    code, out = cli("ingest", b, a, "--name", "both")  # order is part of the input (first metadata wins)
    assert "unchanged, skipping" not in out
    frame = pd.read_csv(b)
    c = tmp_path / "may.csv"
    frame.assign(prompt=frame.prompt + " (May)").iloc[:40].to_csv(c, index=False)
    code, out = cli("ingest", a, b, c, "--name", "both")
    assert code == 0 and "unchanged, skipping" not in out
    manifest = _dataset("both")[3]
    assert len(manifest["sources"]) == 3 and manifest["sources"][2]["source_hash"] == _sha(c)
    assert manifest["n_prompts"] == first["n_prompts"] + 40


def test_a_mix_of_layouts_sharing_a_model_set(data_dir, cli, demo_files):
    from pipeline.label import label

    code, out = cli("ingest", demo_files["wide"], demo_files["long"], demo_files["pairwise"], "--name", "mixed")
    assert code == 0, out
    ids, merged, table, manifest = _dataset("mixed")
    assert manifest["layout"] == "mixed"
    assert [s["layout"] for s in manifest["sources"]] == ["wide", "long", "pairwise"]
    assert sorted(manifest["models"]) == ["large-70b", "medium-34b", "small-7b"]
    assert manifest["n_battles"] == manifest["sources"][2]["n_battles"] > 0
    assert "family" in manifest["metadata_columns"] and table.column("family").null_count == 0
    assert merged["count"].min(axis=0).min() >= 2  # every prompt is in the wide and the long file
    stats = label("mixed")
    assert stats["n_prompts"] == manifest["n_prompts"]


def test_inputs_that_disagree_on_a_prompts_split_are_refused(data_dir, cli, tmp_path, demo_files):
    frame = pd.read_csv(demo_files["wide"]).iloc[:100]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    frame.assign(fold="train").to_csv(a, index=False)
    frame.iloc[:10].assign(fold="test").to_csv(b, index=False)
    code, out = cli("ingest", a, b, "--name", "x", "--split-column", "fold")
    assert code == 2 and "one prompt must stay on one side" in out
    assert not (data_dir / "processed" / "x").exists()


def test_the_same_input_twice_is_a_mistake(data_dir, cli, halves):
    a, _ = halves
    code, out = cli("ingest", a, a, "--name", "x")
    assert code == 2 and "given twice" in out


def test_a_prompt_in_two_inputs_with_a_trailing_newline_in_one_is_one_prompt(data_dir, cli, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    pd.DataFrame({"prompt": ["Name a bird.", "Add 2 and 2."], "x": [1, 0], "y": [0, 0]}).to_json(a, orient="records", lines=True)
    pd.DataFrame({"prompt": ["Name a bird.\n"], "x": [0], "y": [1]}).to_json(b, orient="records", lines=True)
    code, out = cli("ingest", a, b, "--name", "both")
    assert code == 0, out
    ids, lists, table, m = _dataset("both")
    assert sorted(table.column("prompt").to_pylist()) == ["Add 2 and 2.", "Name a bird."] and m["n_prompts"] == 2
    bird = table.column("prompt").to_pylist().index("Name a bird.")
    assert list_of(table, "outcome", bird) == [0.5, 0.5] and list_of(table, "count", bird) == [2, 2]


def list_of(table, column, row):
    return [float(v) for v in table.column(column)[row].as_py()]


def test_a_folder_is_the_data_files_under_it(data_dir, cli, demo_files, tmp_path):
    """A downloaded hub dataset: its shards are read as if given one by one, in name order; the card, the
    `datasets` metadata and hidden folders are not read; a folder without data files is one error."""
    frame = pd.read_csv(demo_files["wide"])
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / ".cache").mkdir()
    shards = [hub / "data" / "test-00000-of-00001.parquet", hub / "data" / "train-00000-of-00002.parquet",
              hub / "data" / "train-00001-of-00002.parquet"]
    for shard, rows in zip(shards, (frame.iloc[500:], frame.iloc[:250], frame.iloc[250:500])):
        rows.to_parquet(shard, index=False)
    frame.iloc[:10].assign(prompt="not data").to_parquet(hub / ".cache" / "stale.parquet", index=False)
    (hub / "README.md").write_text("# card\n")
    (hub / "dataset_infos.json").write_text('{"default": {"description": ""}}')
    code, out = cli("ingest", hub)
    assert code == 0, out
    ids, merged, _, manifest = _dataset("hub")  # named after the folder
    assert [s["source"] for s in manifest["sources"]] == [str(s) for s in shards]
    assert cli("ingest", *shards, "--name", "shards")[0] == 0
    ids_s, given, _, _ = _dataset("shards")
    assert list(ids) == list(ids_s) and len(ids) == frame.prompt.nunique()
    for k in ("outcome", "count", "mask"):
        assert np.array_equal(merged[k], given[k])

    (tmp_path / "empty" / "docs").mkdir(parents=True)
    (tmp_path / "empty" / "docs" / "README.md").write_text("nothing here\n")
    code, out = cli("ingest", tmp_path / "empty")
    assert code == 2 and "a folder with no data files in it" in out
    code, out = cli("ingest", shards[1], "--test-data", hub / "data", "--name", "x")
    assert code == 2 and "--test-data takes one file" in out and "3 data files" in out


def test_a_save_to_disk_folder_reads_like_its_csv(data_dir, cli, demo_files, tmp_path):
    """`Dataset.save_to_disk` writes .arrow files beside JSON metadata; the folder ingests as the csv does."""
    import datasets

    frame = pd.read_csv(demo_files["wide"])
    datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(tmp_path / "saved"))
    assert cli("ingest", demo_files["wide"], "--name", "csv")[0] == 0
    code, out = cli("ingest", tmp_path / "saved")
    assert code == 0, out
    ids_c, from_csv, table_c, manifest_c = _dataset("csv")
    ids_a, from_arrow, table_a, manifest_a = _dataset("saved")
    assert list(ids_c) == list(ids_a)
    for k in ("outcome", "count", "mask"):
        assert np.array_equal(from_csv[k], from_arrow[k])
    assert manifest_a["models"] == manifest_c["models"] and manifest_a["costs"] == manifest_c["costs"]
    assert table_a.column("family").to_pylist() == table_c.column("family").to_pylist()


def test_a_folder_named_like_an_ingested_dataset_means_the_dataset(data_dir, demo_files, tmp_path, monkeypatch):
    """report/compare take a dataset name or data to read: a folder is read unless a dataset of that name exists."""
    from pipeline.ingest import ingest
    from pipeline.ingest_sources import read_options

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    pd.read_csv(demo_files["wide"]).to_parquet(tmp_path / "mine" / "part.parquet", index=False)
    assert read_options("mine", {"layout": "wide"}) == {"layout": "wide"}  # not ingested: read the folder
    ingest(str(tmp_path / "mine"), name="mine")
    assert read_options("mine") is None  # now the name of the ingested dataset


@pytest.mark.parametrize("data, name", [("downloads/arena/", "arena"), ("downloads/arena", "arena"),
                                        ("downloads/arena.v2/", "arena.v2"), ("x/battles.jsonl.gz", "battles"),
                                        ("votes.v2.csv", "votes.v2"), ("t.tsv", "t"), ("hf:org/chats.v1", "chats.v1"),
                                        ("a.csv b.csv", "a")])
def test_make_names_the_dataset_as_ingest_does(data, name):
    import shutil
    import subprocess
    from pathlib import Path

    from pipeline.ingest_sources import default_name

    if shutil.which("make") is None:
        pytest.skip("no make")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["make", "-n", "all", f"DATA={data}"], cwd=root, capture_output=True, text=True, check=True)
    assert f"run {data} --name {name} " in out.stdout and default_name(data.split()[0]) == name
