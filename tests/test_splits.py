"""User-owned splits: `--split-column`, `--test-data`, and a dataset without test prompts."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pandas as pd
import pytest

from pipeline.common import DataError, labels_dir, prompt_hash, read_json, sha256_file
from pipeline.label import label, load_labels, require_test_split, split_of

from .test_ingest import LONG, nothing_written, write


def read(path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_parquet(path)


def fold(prompt: str) -> str:
    """A user's split, written untidily (case, blanks, other names for val), the same for every row of a prompt."""
    return [" Train", "VAL ", "test\t", "Validation", "dev"][int(prompt_hash(prompt)[-1], 16) % 5]


def manifest(data_dir, name):
    return read_json(data_dir / "processed" / name / "manifest.json")


def label_splits(name) -> pd.Series:
    ds, _ = load_labels(name)
    return ds.to_pandas().set_index("prompt").split


# --- --split-column ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["wide", "long", "pairwise"])
def test_split_column_is_the_split_in_every_layout(layout, data_dir, demo_files, tmp_path, cli):
    raw = read(demo_files[layout]).assign(fold=lambda df: df.prompt.map(fold))
    path = write(raw, tmp_path / f"{layout}{demo_files[layout].suffix}")
    code, out = cli("ingest", path, "--name", "d", "--split-column", "fold")
    assert code == 0, out
    m = manifest(data_dir, "d")
    assert m["split_rule"] == "column" and m["split_column"] == "fold" and m["test_data"] is None
    assert "fold" not in m["metadata_columns"] and m["options"]["split_column"] == "fold"
    stats = label("d")
    assert stats["split_rule"] == "column" and stats["split_by"] == "column 'fold'"
    split = label_splits("d")
    assert (split == split.index.map(lambda p: {"validation": "val", "dev": "val"}.get(fold(p).strip().lower(),
                                                                                      fold(p).strip().lower()))).all()
    assert set(split) == {"train", "val", "test"}
    assert stats["splits"] == split.value_counts().to_dict()


def test_a_split_column_of_train_and_test_only_draws_val_from_its_train_prompts(data_dir, demo_files, tmp_path, cli):
    # The usual shape of a user's split; validation used to be empty and training stopped on it.
    raw = read(demo_files["wide"]).assign(fold=lambda df: df.prompt.map(lambda p: "test" if fold(p) == "test\t"
                                                                        else "train"))
    path = write(raw, tmp_path / "two.csv")
    assert cli("ingest", path, "--name", "two", "--split-column", "fold")[0] == 0
    stats = label("two")
    assert stats["split_by"] == "column 'fold', val drawn from its train prompts by prompt hash"
    split = label_splits("two")
    given = split.index.map(lambda p: "test" if fold(p) == "test\t" else "train")
    assert (split[given == "test"] == "test").all()  # the user's test prompts, all and only them
    hashed = split.index.map(lambda p: split_of(p, 0.0, 0.1))
    assert (split[given == "train"] == hashed[given == "train"]).all()  # the hash rule picks val among train
    assert 0.05 < stats["splits"]["val"] / (stats["splits"]["train"] + stats["splits"]["val"]) < 0.15


@pytest.mark.parametrize("suffix, value, shown", [(".csv", "holdout", "value 'holdout'"),
                                                  (".csv", "", "missing value"),
                                                  (".jsonl", None, "missing value"),
                                                  (".jsonl", 3, "value '3'")])
def test_a_bad_split_value_is_one_line_naming_file_row_and_value(suffix, value, shown, data_dir, tmp_path, cli):
    df = LONG.assign(fold=["train", "TRAIN", "val", "val", value, "test", "train"])
    path = write(df, tmp_path / f"l{suffix}")
    code, out = cli("ingest", path, "--split-column", "fold")
    assert code == 2, out
    assert out.strip().count("\n") == 0
    assert str(path) in out and "row 5" in out and shown in out and "expected train, val or test" in out
    assert nothing_written(data_dir)


def test_split_column_missing_or_read_by_the_layout(data_dir, tmp_path, cli):
    path = write(LONG, tmp_path / "l.csv")
    code, out = cli("ingest", path, "--split-column", "fold")
    assert code == 2 and str(path) in out and "no split column 'fold'" in out
    code, out = cli("ingest", path, "--split-column", "model")
    assert code == 2 and "column the layout itself reads" in out
    assert nothing_written(data_dir)


def test_duplicated_prompt_with_two_splits_names_its_rows(data_dir, tmp_path, cli):
    # "what is 2+2" is rows 1, 2 and 7; " Train" and "train" are the same split.
    df = LONG.assign(fold=[" Train", "train", "val", "val", "test", "test", "test"])
    path = write(df, tmp_path / "l.csv")
    code, out = cli("ingest", path, "--split-column", "fold")
    assert code == 2 and str(path) in out and "rows 1 (train), 2 (train), 7 (test)" in out
    assert nothing_written(data_dir)
    df.loc[6, "fold"] = "TRAIN"
    assert cli("ingest", write(df, path), "--split-column", "fold")[0] == 0
    label("l")
    assert label_splits("l").to_dict() == {"what is 2+2": "train", "name a bird": "val", "say hi": "test"}


def test_an_input_split_column_is_metadata_unless_chosen(data_dir, tmp_path, cli):
    path = write(LONG.assign(split="test"), tmp_path / "l.csv")
    code, out = cli("ingest", path)
    assert code == 0
    assert "input column 'split' kept as 'source_split'" in out and "--split-column split" in out
    m = manifest(data_dir, "l")
    assert m["split_rule"] == "hash" and m["metadata_columns"] == ["topic", "source_split"]
    label("l")
    split = label_splits("l")
    assert (split == split.index.map(split_of)).all()
    code, out = cli("ingest", path, "--split-column", "split")  # another option: not skipped
    assert code == 0 and "ingested" in out and "source_split" not in out
    assert manifest(data_dir, "l")["metadata_columns"] == ["topic"]
    label("l")
    assert (label_splits("l") == "test").all()


# --- --test-data ---------------------------------------------------------------------------------


def split_files(demo_files, layout, tmp_path, n_test=100):
    """The demo file cut by prompt into a main file and a test file of `n_test` prompts."""
    raw = read(demo_files[layout])
    test_prompts = raw.prompt.drop_duplicates().iloc[:n_test]
    is_test = raw.prompt.isin(test_prompts)
    suffix = demo_files[layout].suffix
    return (write(raw[~is_test], tmp_path / f"main{suffix}"), write(raw[is_test], tmp_path / f"held{suffix}"),
            raw[~is_test], raw[is_test])


@pytest.mark.parametrize("layout", ["wide", "long", "pairwise"])
def test_test_data_is_the_test_split_and_the_main_file_train_and_val(layout, data_dir, demo_files, tmp_path, cli):
    main_path, test_path, main, test = split_files(demo_files, layout, tmp_path)
    if layout == "wide":  # model columns in another order than the main file's
        test = test[list(reversed(test.columns))]
        write(test, test_path)
    code, out = cli("ingest", main_path, "--test-data", test_path)
    assert code == 0, out
    assert f"test data {test_path}" in out and "100 prompts, all in the test split" in out
    m = manifest(data_dir, "main")
    assert m["split_rule"] == "test_data" and m["split_column"] is None
    assert m["source_hash"] == sha256_file(main_path)
    assert m["test_data"]["source"] == str(test_path) and m["test_data"]["source_hash"] == sha256_file(test_path)
    assert m["test_data"]["n_rows_in"] == len(test) and m["test_data"]["n_prompts"] == 100
    assert m["n_rows_in"] == len(main) and m["n_prompts"] == main.prompt.nunique() + 100

    stats = label("main")
    assert stats["split_rule"] == "test_data" and stats["split_by"] == f"test file {test_path}"
    split = label_splits("main")
    assert set(split[split == "test"].index) == set(test.prompt)
    rest = split[split != "test"]
    assert (rest == rest.index.map(lambda p: split_of(p, 0.0, 0.1))).all()  # val by the hash rule, no test
    assert 0 < (rest == "val").sum() < 0.2 * len(rest)

    ds = datasets.load_from_disk(str(data_dir / "processed" / "main" / "dataset")).to_pandas().set_index("prompt")
    models = m["models"]
    if layout == "wide":
        row = test.iloc[0]
        assert np.allclose(ds.outcome[row.prompt], row[models].to_numpy(float))
        both = pd.concat([main, test])
        assert m["costs"] == pytest.approx({x: both[f"{x}|total_cost"].mean() for x in models})
    if layout == "pairwise":
        battles = datasets.load_from_disk(str(data_dir / "processed" / "main" / "battles")).to_pandas()
        both = pd.concat([main, test])
        assert m["n_battles"] == len(battles) == len(both)
        assert [models[i] for i in battles.model_a] == both.model_a.tolist()
        assert [models[i] for i in battles.model_b] == both.model_b.tolist()


def test_test_data_skips_when_both_files_are_unchanged(data_dir, demo_files, tmp_path, cli):
    main_path, test_path, _, test = split_files(demo_files, "long", tmp_path)
    assert "ingested" in cli("ingest", main_path, "--test-data", test_path)[1]
    first = manifest(data_dir, "main")
    assert "unchanged, skipping" in cli("ingest", main_path, "--test-data", test_path)[1]
    write(test[test.prompt != test.prompt.iloc[0]], test_path)  # only the test file changes
    code, out = cli("ingest", main_path, "--test-data", test_path)
    assert code == 0 and "ingested" in out and "99 prompts, all in the test split" in out
    assert manifest(data_dir, "main")["content_hash"] != first["content_hash"]
    assert "ingested" in cli("ingest", main_path)[1]  # without the test file: a different dataset
    assert manifest(data_dir, "main")["split_rule"] == "hash"


def test_test_data_errors(data_dir, tmp_path, cli):
    main = write(LONG, tmp_path / "main.csv")
    overlap = write(pd.DataFrame({"prompt": ["new", "new", "say hi"], "model": ["a", "b", "a"],
                                  "score": [1, 2, 3]}), tmp_path / "overlap.csv")
    code, out = cli("ingest", main, "--test-data", overlap)
    assert code == 2 and str(overlap) in out and "1 prompt(s) are in both" in out and "'say hi'" in out
    padded = write(pd.DataFrame({"prompt": ["new", "new", "say hi\n"], "model": ["a", "b", "a"], "score": [1, 2, 3]}),
                   tmp_path / "padded.jsonl")  # the same prompt with a line end: still in both
    code, out = cli("ingest", main, "--test-data", padded)
    assert code == 2 and "1 prompt(s) are in both" in out, out
    other_model = write(pd.DataFrame({"prompt": ["new", "new"], "model": ["a", "c"], "score": [1, 2]}),
                        tmp_path / "other.jsonl")
    code, out = cli("ingest", main, "--test-data", other_model)
    assert code == 2 and str(other_model) in out and "model(s) c are not in the main file" in out
    wide = write(pd.DataFrame({"prompt": ["new"], "a": [1.0], "b": [0.0]}), tmp_path / "wide.csv")
    code, out = cli("ingest", main, "--test-data", wide)
    assert code == 2 and str(wide) in out and "missing required column 'model' for the long layout" in out
    code, out = cli("ingest", main, "--test-data", tmp_path / "nope.csv")
    assert code == 2 and "nope.csv" in out and "file not found" in out
    code, out = cli("ingest", main, "--test-data", wide, "--split-column", "topic")
    assert code == 2 and "use one of them" in out
    assert nothing_written(data_dir)


def test_test_file_without_a_model_leaves_it_unobserved(data_dir, tmp_path, cli):
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "new", "model": "b", "score": 2}) + "\n"
                    + json.dumps({"prompt": "new", "model": "a", "score": 6}) + "\n")
    code, out = cli("ingest", write(LONG.assign(model=LONG.model.map({"a": "a", "b": "z"})), tmp_path / "m.csv"),
                    "--test-data", held)
    assert code == 2 and "model(s) b are not in the main file" in out
    held.write_text(json.dumps({"prompt": "new", "model": "a", "score": 6}) + "\n")
    code, out = cli("ingest", tmp_path / "m.csv", "--test-data", held)
    assert code == 0 and "the test file has no outcome for z" in out
    ds = datasets.load_from_disk(str(data_dir / "processed" / "m" / "dataset"))
    assert ds["split"] == [None, None, None, "test"]  # None: label's hash rule picks train or val
    assert ds["mask"][3] == [True, False] and ds["outcome"][3] == [6.0, 0.0]


# --- no test prompts -----------------------------------------------------------------------------


def test_require_test_split(data_dir, tmp_path):
    from pipeline.ingest import ingest

    path = write(LONG.assign(fold=["train", "train", "val", "val", "train", "train", "train"]), tmp_path / "l.csv")
    ingest(str(path), split_column="fold")
    label("l")
    with pytest.raises(DataError, match=r"^the test split of 'l' is empty \(split by column 'fold'\)"):
        require_test_split("l")
    write(LONG.assign(fold="test"), path)
    ingest(str(path), split_column="fold")
    label("l")
    assert require_test_split("l")["splits"] == {"train": 0, "val": 0, "test": 3}


@pytest.mark.slow
def test_run_without_test_prompts_exports_and_skips_evaluate_and_report(tmp_path, monkeypatch, cli):
    """`prerouter run` with a split column of train and val only, 150 demo prompts, a tiny teacher."""
    from pipeline.demo import generate
    from pipeline.runtime import Router

    from .tiny import make_tiny_teacher

    for var, sub in (("PREROUTER_DATA_DIR", "data"), ("PREROUTER_MLRUNS_DIR", "mlruns"),
                     ("PREROUTER_CACHE_DIR", "cache"), ("PREROUTER_MODELS_DIR", "models")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = read(generate(tmp_path / "raw", n_prompts=150, seed=0)["wide"])
    data = write(raw.assign(fold=raw.prompt.map(lambda p: "val" if split_of(p) != "train" else "train")),
                 tmp_path / "mine.csv")
    args = ["run", data, "--split-column", "fold", "--budget-ms", "1000"]
    for override in (f"teacher.path={make_tiny_teacher(tmp_path / 'teacher')}", "teacher.epochs=1",
                     "train.max_epochs=1", "student.dim=32", "student.hidden=32", "export.latency_decisions=20",
                     "export.min_int8_agreement=0", "export.max_int8_apgr_drop=1"):
        args += ["--set", override]
    code, out = cli(*args)
    assert code == 0, out[-3000:]
    assert "Traceback" not in out
    skipped = [line for line in out.splitlines() if "evaluate and report skipped" in line]
    assert len(skipped) == 1 and "the test split of 'mine' is empty (split by column 'fold')" in skipped[0]
    bundle = tmp_path / "models" / "mine" / "bundle"
    assert Router.load(bundle).route("What is 2+2?") in {"small-7b", "medium-34b", "large-70b"}
    seconds = next(line for line in out.splitlines() if line.startswith("stage seconds:"))
    assert "'export'" in seconds and "'check-latency'" in seconds and "'evaluate'" not in seconds
    assert not (tmp_path / "models" / "mine" / "evaluation.json").exists()
    assert not (tmp_path / "models" / "mine" / "report").exists()
    assert read_json(labels_dir("mine") / "label_stats.json")["splits"]["test"] == 0
