import bz2
import gzip
import json
import lzma

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.common import DataError, prompt_hash, read_json, sha256_file
from pipeline.ingest import detect_layout, ingest
from pipeline.ingest_sources import default_name

from .leftovers import leftovers, visible


def load(out, part="dataset"):
    return datasets.load_from_disk(str(out / part)).to_pandas()


COMPRESSORS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def write(df: pd.DataFrame, path):
    """One frame in the format the suffix names (compressed when it ends in .gz, .bz2 or .xz)."""
    if path.suffix in COMPRESSORS:
        plain = write(df, path.with_suffix(""))
        path.write_bytes(COMPRESSORS[path.suffix](plain.read_bytes()))
        plain.unlink()
        return path
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        df.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".ndjson"):
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        df.to_json(path, orient="records")
    else:
        df.to_parquet(path, index=False)
    return path


LONG = pd.DataFrame({
    "prompt": ["what is 2+2", "what is 2+2", "name a bird", "name a bird", "say hi", "say hi", "what is 2+2"],
    "model": ["a", "b", "a", "b", "a", "b", "a"],
    "score": [3, 9, 7, 8, 10, 10, 5],
    "topic": ["math", "math", "animals", "animals", "chat", "chat", "other"],
})


# --- layouts -------------------------------------------------------------------------------------


def test_a_column_naming_models_is_an_outcome_not_metadata():
    import pyarrow as pa

    from pipeline.ingest_canonical import names_models

    models = ["gpt-4", "mistral", "llama"]
    assert names_models(pa.chunked_array([["gpt-4", "mistral", "none", "gpt-4"]]), models) == 0.75
    assert names_models(pa.chunked_array([["gpt-4", "gpt-4", "none", "gpt-4"]]), models) == 0  # one model: a reference
    assert names_models(pa.chunked_array([["gpt-4", "mistral", "x", "y", "z"]]), models) == 0  # under half
    assert names_models(pa.chunked_array([["mmlu", "gsm8k", None, "mmlu"]]), models) == 0
    assert names_models(pa.chunked_array([[1, 2, 3]]), models) == 0


def test_wide_demo_models_costs_metadata_and_merge(data_dir, demo_files):
    out = ingest(str(demo_files["wide"]))
    m = read_json(out / "manifest.json")
    raw = pd.read_csv(demo_files["wide"])
    models = ["small-7b", "medium-34b", "large-70b"]
    assert out == data_dir / "processed" / "demo_wide"
    assert m["layout"] == "wide" and m["models"] == models and m["outcome_kind"] == "binary"
    assert m["metadata_columns"] == ["sample_id", "family"]
    assert m["n_rows_in"] == m["n_rows_used"] == 600 and m["dropped"] == {}
    assert m["source_hash"] == sha256_file(demo_files["wide"])
    assert m["split_rule"] == "hash" and m["split_column"] is None and m["test_data"] is None
    for model in models:
        assert m["costs"][model] == pytest.approx(raw[f"{model}|total_cost"].mean())
    ds = load(out)
    assert m["n_prompts"] == len(ds) == raw.prompt.nunique()
    assert list(ds.columns) == ["prompt_id", "prompt", "outcome", "mask", "count", "cost", "sample_id", "family"]
    expected = raw.groupby("prompt", sort=False)[models].mean()
    got = np.stack(ds.outcome.to_list())
    np.testing.assert_allclose(got, expected.loc[ds.prompt].to_numpy(float), atol=1e-6)
    counts = np.stack(ds["count"].to_list())
    assert (counts == raw.groupby("prompt").size().loc[ds.prompt].to_numpy()[:, None]).all()
    assert ds.prompt_id.tolist() == [prompt_hash(p)[:16] for p in ds.prompt]
    assert ds.prompt.tolist() == list(dict.fromkeys(raw.prompt))  # order of first appearance
    # Metadata is the first value per prompt.
    first = raw.drop_duplicates("prompt").set_index("prompt")
    assert (ds.sample_id.to_numpy() == first.loc[ds.prompt, "sample_id"].to_numpy()).all()


def test_long_demo_scores_and_costs(data_dir, demo_files):
    out = ingest(str(demo_files["long"]), name="demo_long")
    m = read_json(out / "manifest.json")
    raw = pd.read_json(demo_files["long"], lines=True)
    assert m["layout"] == "long" and m["outcome_kind"] == "score" and m["outcome_range"] == [1.0, 10.0]
    assert m["models"] == sorted(raw.model.unique())
    assert m["costs"]["large-70b"] == pytest.approx(raw[raw.model == "large-70b"].cost.mean())
    ds = load(out)
    table = raw.pivot_table(index="prompt", columns="model", values="score", aggfunc="mean")
    np.testing.assert_allclose(np.stack(ds.outcome.to_list()), table.loc[ds.prompt, m["models"]].to_numpy(), atol=1e-5)
    assert np.stack(ds["mask"].to_list()).all()


def test_pairwise_demo_battles_and_mean_scores(data_dir, demo_files):
    out = ingest(str(demo_files["pairwise"]))
    m = read_json(out / "manifest.json")
    raw = pq.read_table(demo_files["pairwise"]).to_pandas()
    assert m["layout"] == "pairwise" and m["outcome_kind"] == "winrate" and m["n_battles"] == len(raw)
    models = m["models"]
    battles = load(out, "battles")
    assert list(battles.columns) == ["prompt_id", "model_a", "model_b", "score_a", "bothbad"]
    assert [models[i] for i in battles.model_a] == raw.model_a.tolist()
    score = raw.winner.map({"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5})
    assert battles.score_a.tolist() == score.tolist()
    assert battles.bothbad.tolist() == (raw.winner == "tie (bothbad)").tolist()
    sides = pd.concat([pd.DataFrame({"prompt": raw.prompt, "model": raw.model_a, "s": score}),
                       pd.DataFrame({"prompt": raw.prompt, "model": raw.model_b, "s": 1 - score})])
    expected = sides.groupby(["prompt", "model"]).s.agg(["mean", "size"])
    ds = load(out)
    for _, row in ds.sample(50, random_state=0).iterrows():
        for j, model in enumerate(models):
            key = (row.prompt, model)
            assert row["mask"][j] == (key in expected.index)
            if row["mask"][j]:
                assert row.outcome[j] == pytest.approx(expected.loc[key, "mean"])
                assert row["count"][j] == expected.loc[key, "size"]
    assert m["costs"]["small-7b"] < m["costs"]["large-70b"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".csv.gz", ".tsv.gz",
                                    ".jsonl.bz2", ".json.xz"])
def test_every_file_type_gives_the_same_dataset(data_dir, tmp_path, suffix):
    out = ingest(str(write(LONG, tmp_path / f"long{suffix}")), name="x")
    ds = load(out)
    assert read_json(out / "manifest.json")["models"] == ["a", "b"]
    assert ds.prompt.tolist() == ["what is 2+2", "name a bird", "say hi"]
    np.testing.assert_allclose(np.stack(ds.outcome.to_list()), [[4, 9], [7, 8], [10, 10]])
    assert np.stack(ds["count"].to_list()).tolist() == [[2, 1], [1, 1], [1, 1]]
    assert ds.topic.tolist() == ["math", "animals", "chat"]


def test_a_tsv_keeps_commas_quotes_and_line_breaks_inside_its_prompts(data_dir, tmp_path):
    prompts = ["first, with a comma", 'a "quoted" word', "two\nlines", "semi; colon"]
    df = pd.DataFrame({"prompt": prompts, "small": [1, 0, 1, 0], "large": [1, 1, 0, 1], "topic": ["a,b"] * 4})
    ds = load(ingest(str(write(df, tmp_path / "wide.tsv"))))
    assert ds.prompt.tolist() == prompts and ds.topic.tolist() == ["a,b"] * 4
    np.testing.assert_array_equal(np.stack(ds.outcome.to_list()), df[["small", "large"]].to_numpy())


def test_a_compressed_file_is_named_and_hashed_as_stored_and_read_through_its_decompressor(data_dir, tmp_path, cli):
    path = write(LONG, tmp_path / "battles.v2.jsonl.gz")
    code, out = cli("ingest", path)
    assert code == 0, out
    m = read_json(data_dir / "processed" / "battles.v2" / "manifest.json")  # .jsonl.gz dropped, .v2 kept
    assert m["source_hash"] == sha256_file(path) and m["n_prompts"] == 3
    # A JSON column of mixed types is read again from the file (strings stay strings), here decompressed.
    mixed = tmp_path / "mixed.jsonl.gz"
    mixed.write_bytes(gzip.compress(b'{"prompt": 0, "model": "a", "score": 1}\n{"prompt": "0", "model": "a", '
                                    b'"score": 1}\n{"prompt": "0", "model": "b", "score": 2}\n'))
    assert cli("ingest", mixed)[0] == 0
    assert load(data_dir / "processed" / "mixed").prompt.tolist() == ["0"]


BAD_COMPRESSED = [
    ("cut.csv.gz", gzip.compress(b"prompt,a,b\n" + b"hello,1,0\n" * 500)[:60], "cannot decompress as .gz"),
    ("plain.csv.bz2", b"prompt,a,b\nhello,1,0\n", "cannot decompress as .bz2: Invalid data stream"),
    ("plain.jsonl.xz", b'{"prompt": "hi", "a": 1}\n', "cannot decompress as .xz"),
    ("latin1.csv.gz", gzip.compress("prompt,a,b\nhello,1,0\ncaf\u00e9,1,0\n".encode("latin-1")),
     "not valid UTF-8 text (line 3)"),
    ("table.parquet.gz", gzip.compress(b"PAR1"), "unsupported file type '.parquet.gz'"),
]


@pytest.mark.parametrize("filename, content, reason", BAD_COMPRESSED, ids=[b[0] for b in BAD_COMPRESSED])
def test_a_bad_compressed_file_is_one_error(data_dir, tmp_path, cli, filename, content, reason):
    path = tmp_path / filename
    path.write_bytes(content)
    code, out = cli("ingest", path)
    assert code == 2 and str(path) in out and reason in out, out
    assert nothing_written(data_dir)


@pytest.mark.parametrize("source, name", [
    ("data/arena.jsonl.gz", "arena"), ("votes.v2.csv", "votes.v2"), ("x.parquet", "x"), ("notes.gz", "notes"),
    ("hf:lmsys/chatbot_arena_conversations", "chatbot_arena_conversations"), ("", "data"),
])
def test_default_name_drops_type_and_compression_suffixes(source, name):
    assert default_name(source) == name


@pytest.mark.parametrize("spelling", ["both_bad", "Tie (both bad)", "TIE_BOTHBAD"])
def test_other_spellings_of_a_both_bad_tie_are_that_tie(data_dir, demo_files, tmp_path, spelling):
    raw = pq.read_table(demo_files["pairwise"]).to_pandas()
    respelt = raw.assign(winner=raw.winner.replace("tie (bothbad)", spelling))
    assert (respelt.winner == spelling).sum() > 10
    canonical = load(ingest(str(demo_files["pairwise"]), name="canonical"), "battles")
    other = load(ingest(str(write(respelt, tmp_path / "respelt.parquet"))), "battles")
    pd.testing.assert_frame_equal(other, canonical)
    assert other.bothbad.sum() == (respelt.winner == spelling).sum()


def test_a_winner_named_by_its_model_is_that_side(data_dir, demo_files, tmp_path):
    raw = pq.read_table(demo_files["pairwise"]).to_pandas()
    side = {"model_a": raw.model_a, "model_b": raw.model_b}
    named = raw.assign(winner=[side[w][i] if w in side else w for i, w in enumerate(raw.winner)])
    assert named.winner.isin(named.model_a).sum() > 100 and named.winner.isin(named.model_b).sum() > 100
    canonical = load(ingest(str(demo_files["pairwise"]), name="canonical"), "battles")
    other = load(ingest(str(write(named, tmp_path / "named.parquet"))), "battles")
    pd.testing.assert_frame_equal(other, canonical)


def test_alpaca_eval_annotations_are_the_same_battles_as_their_pairwise_table(data_dir, demo_files, tmp_path):
    """AlpacaEval's annotations.json (instruction, generator_1/2 with their outputs, a preference of 1, 2, 0 or
    1.5 for a draw, or between 1 and 2 from a weighted judge; a missing one) read as the pairwise table of
    the same votes: same battles, same prompts and targets, and no answer or preference kept as metadata."""
    rng = np.random.default_rng(0)
    raw = pq.read_table(demo_files["pairwise"]).to_pandas().drop(columns=["cost_a", "cost_b"])
    raw["winner"] = raw.winner.replace("tie (bothbad)", "tie")  # AlpacaEval has no both-bad draw
    raw.loc[raw.index[::50], "winner"] = None
    side = rng.uniform(0, 0.499, len(raw))  # how far a weighted judge's preference leans from 1 or 2
    preference = np.select([raw.winner == "model_a", raw.winner == "model_b", raw.winner == "tie"],
                           [1 + side, 2 - side, np.where(np.arange(len(raw)) % 2, 1.5, 0.0)], np.nan)
    annotations = [{"dataset": r.family, "instruction": r.prompt, "output_1": "an answer", "generator_1": r.model_a,
                    "output_2": "another", "generator_2": r.model_b, "annotator": "weighted_alpaca_eval_gpt4_turbo",
                    "preference": None if np.isnan(pref) else float(pref), "raw_completion": {"logprobs": [-0.1]}}
                   for r, pref in zip(raw.itertuples(), preference)]
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    assert (preference == 0).sum() > 100 and ((preference > 1) & (preference < 2) & (preference != 1.5)).sum() > 300
    canonical = ingest(str(write(raw, tmp_path / "votes.parquet")))
    other = ingest(str(tmp_path / "annotations.json"))
    pd.testing.assert_frame_equal(load(other, "battles"), load(canonical, "battles"))
    mine, theirs = load(other), load(canonical)
    assert mine.prompt.tolist() == theirs.prompt.tolist()
    np.testing.assert_allclose(np.stack(mine.outcome.to_list()), np.stack(theirs.outcome.to_list()))
    manifest = read_json(other / "manifest.json")
    assert manifest["layout"] == "pairwise" and manifest["dropped"] == {"missing winner": int(raw.winner.isna().sum())}
    assert manifest["metadata_columns"] == ["dataset", "annotator"]


def test_an_alpaca_eval_preference_outside_its_scale_is_an_error(data_dir, tmp_path, cli):
    rows = [{"instruction": "hi", "generator_1": "a", "generator_2": "b", "preference": p} for p in (1, 2, 3, 1.5)]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(rows))
    code, out = cli("ingest", path)
    assert code == 2 and f"{path}, row 3: AlpacaEval preference 3 is not 1 or 2" in out, out
    assert nothing_written(data_dir)


def test_a_winner_naming_neither_model_of_its_row_is_an_error(data_dir, tmp_path, cli):
    path = tmp_path / "votes.csv"
    path.write_text("prompt,model_a,model_b,winner\nhi,gpt-4,llama,gpt-4\nyo,gpt-4,llama,llama\n"
                    "zz,llama,mistral,gpt-4\n")  # gpt-4 is a model of the table, but not of row 3
    code, out = cli("ingest", path)
    assert code == 2 and f"{path}, row 3: unknown winner value 'gpt-4'" in out and "name of the row's" in out, out
    assert nothing_written(data_dir)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_copies_that_differ_only_in_surrounding_whitespace_are_one_prompt(data_dir, tmp_path, suffix):
    from pipeline.common import prompt_id

    rows = pd.DataFrame({"prompt": ["Name a bird.", "Name a bird. \n", "  Name a bird.", "Name a\r\nbird.",
                                    "Name a\nbird.", "Name  a bird.", "name a bird."],
                         "a": [1, 0, 1, 1, 0, 1, 1], "b": [0, 0, 1, 0, 0, 1, 0]})
    ds = load(ingest(str(write(rows, tmp_path / f"birds.{suffix}"))))
    # one prompt per text that differs inside (a line end read as \n, another space, a capital)
    assert ds.prompt.tolist() == ["Name a bird.", "Name a\r\nbird.", "Name  a bird.", "name a bird."]
    assert ds.prompt_id.tolist() == [prompt_id(p) for p in ds.prompt]  # the first copy's text and id
    np.testing.assert_allclose(ds.outcome[0], [2 / 3, 1 / 3])
    np.testing.assert_array_equal(ds["count"][0], [3, 3])
    np.testing.assert_allclose(ds.outcome[1], [0.5, 0])
    np.testing.assert_array_equal(ds["count"][1], [2, 2])


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_prompt_given_as_one_message_object_is_that_message(data_dir, tmp_path, suffix):
    rows = pd.DataFrame({"prompt": [{"role": "user", "content": "Name a bird."},
                                    {"role": "system", "content": "You are terse."},  # no user text: empty
                                    {"role": "user", "content": "Add 2 and 2."}],
                         "a": [1, 0, 1], "b": [0, 1, 1]})
    out = ingest(str(write(rows, tmp_path / f"messages.{suffix}")))
    assert load(out).prompt.tolist() == ["Name a bird.", "Add 2 and 2."]
    assert read_json(out / "manifest.json")["dropped"] == {"empty prompt": 1}


def test_arena_55k_variant(data_dir, tmp_path):
    arena = pd.DataFrame({
        "id": [11, 12, 13, 14],
        "model_a": ["gpt-4", "llama", "gpt-4", "llama"],
        "model_b": ["llama", "gpt-4", "claude", "claude"],
        "prompt": [json.dumps(["Hi", "Tell me a joke"]), json.dumps(["Hi", "Tell me a joke"]),
                   json.dumps(["What is [x]?", None]), json.dumps(["solo"])],
        "response_a": ["r"] * 4, "response_b": ["r"] * 4,
        "winner_model_a": [1, 0, 0, 0], "winner_model_b": [0, 1, 0, 0], "winner_tie": [0, 0, 1, 1],
    })
    out = ingest(str(write(arena, tmp_path / "arena.csv")))
    m = read_json(out / "manifest.json")
    assert m["layout"] == "pairwise" and m["models"] == ["claude", "gpt-4", "llama"]
    ds = load(out)
    assert ds.prompt.tolist() == ["Hi\n\nTell me a joke", "What is [x]?", "solo"]
    assert m["metadata_columns"] == ["id"]  # responses are not prompt metadata
    np.testing.assert_allclose(ds.outcome[0], [0, 1, 0])  # gpt-4 won both battles on this prompt
    assert ds["count"][0].tolist() == [0, 2, 2]
    assert load(out, "battles").score_a.tolist() == [1.0, 0.0, 0.5, 0.5]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_pairwise_conversations_stand_for_the_prompt_without_their_answers(data_dir, tmp_path, suffix):
    # MT-Bench human judgments / Chatbot Arena conversations: no prompt column; each side's conversation
    # holds the user's turns and that side's answers. The router may see only what the user sent.
    def conversation(question, answer, follow_up=None):
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return turns + ([{"role": "user", "content": follow_up}, {"role": "assistant", "content": answer}]
                        if follow_up else [])

    judgments = pd.DataFrame({
        "question_id": [81, 81, 82],
        "model_a": ["gpt-4", "gpt-4", "vicuna"], "model_b": ["vicuna", "vicuna", "claude"],
        "winner": ["model_a", "tie", "model_b"], "turn": [1, 2, 1],
        "conversation_a": [conversation("Write a haiku", "GPT-4 SAYS"),
                           conversation("Write a haiku", "GPT-4 SAYS", "Now in French"),
                           conversation("Sum 2+2", "VICUNA SAYS")],
        "conversation_b": [conversation("Write a haiku", "VICUNA SAYS"),
                           conversation("Write a haiku", "VICUNA SAYS", "Now in French"),
                           conversation("Sum 2+2", "CLAUDE SAYS")],
    })
    out = ingest(str(write(judgments, tmp_path / f"judgments{suffix}")))
    m = read_json(out / "manifest.json")
    assert m["layout"] == "pairwise" and m["models"] == ["claude", "gpt-4", "vicuna"]
    ds = load(out)
    assert ds.prompt.tolist() == ["Write a haiku", "Write a haiku\n\nNow in French", "Sum 2+2"]
    assert m["metadata_columns"] == ["question_id", "turn"]  # the conversations are not metadata
    np.testing.assert_allclose(ds.outcome[2], [1, 0, 0])  # claude beat vicuna on the second question
    with pytest.raises(DataError, match=r"missing required column 'prompt' \(or conversation_a or messages, whose user"):
        ingest(str(write(judgments.drop(columns="conversation_a"), tmp_path / f"neither{suffix}")))


@pytest.mark.parametrize("layout", ["long", "wide"])
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_a_messages_column_stands_for_the_prompt_in_every_layout(layout, suffix, data_dir, tmp_path):
    # Chat-format sets: no prompt column, a `messages` list per row. The prompt is the user's turns only,
    # as a service that receives the same messages computes it (`runtime.prompt_from_messages`).
    from pipeline.runtime import prompt_from_messages

    chats = [[{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"question {i}"}]
             for i in range(3)]
    if layout == "long":
        df = pd.DataFrame({"messages": [c for c in chats for _ in "ab"], "model": list("ab") * 3,
                           "score": [1, 0, 0, 1, 1, 1], "topic": ["t"] * 6})
    else:
        df = pd.DataFrame({"messages": chats, "a": [1, 0, 1], "b": [0, 1, 1], "topic": ["t"] * 3})
    out = ingest(str(write(df, tmp_path / f"chat{suffix}")))
    m = read_json(out / "manifest.json")
    assert m["layout"] == layout and m["models"] == ["a", "b"] and m["metadata_columns"] == ["topic"]
    assert sorted(load(out).prompt) == [prompt_from_messages(c) for c in chats] == ["question 0", "question 1",
                                                                                     "question 2"]
    with pytest.raises(DataError, match=r"missing required column 'prompt' \(or messages, whose user turns"):
        ingest(str(write(df.rename(columns={"messages": "chat"}), tmp_path / f"other{suffix}")), layout=layout,
               **({"models": ["a", "b"]} if layout == "wide" else {}))


@pytest.mark.parametrize("turns, text", [
    ([{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
     "Hi"),  # ShareGPT: the deployment's instructions and the answers are not the prompt
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Yo"}, {"role": "tool", "content": "{}"}, {"role": "User", "content": "More"}],
     "Hi\n\nMore"),  # OpenAI
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b", {"type": "text", "text": "c"}]}],
     "a\n\nb\n\nc"),  # text parts, each as a turn
    ([{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": "u"}]}],
     "Describe"),  # OpenAI content parts: the text ones
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": 3}], None),  # not text: dropped
    (["Hi", {"role": "user"}], None),
])
def test_chat_message_turns(turns, text):
    import pyarrow as pa

    from pipeline.ingest_columns import as_text

    col, non_text = as_text(pa.chunked_array([pa.array([json.dumps(turns)])]), turns_json=True)
    assert col.to_pylist() == [text] and non_text.tolist() == [text is None]


def test_routerbench_cost_and_response_columns(data_dir, tmp_path):
    rb = pd.DataFrame({
        "sample_id": ["mmlu.1", "mmlu.2", "gsm.3"],
        "prompt": ["p1", "p2", "p3"],
        "eval_name": ["mmlu", "mmlu", "gsm8k"],
        "gpt-4": [1.0, 1.0, 0.0], "gpt-4|model_response": ["A", "B", "12"], "gpt-4|total_cost": [0.01, 0.03, 0.02],
        "mistral": [0.0, 1.0, 0.0], "mistral|model_response": ["C", "B", "7"], "mistral|total_cost": [0.001, 0.001, 0.004],
        "oracle_model_to_route_to": ["gpt-4", "mistral", "gpt-4"],
    })
    out = ingest(str(write(rb, tmp_path / "rb.parquet")))
    m = read_json(out / "manifest.json")
    assert m["models"] == ["gpt-4", "mistral"]
    assert m["costs"] == pytest.approx({"gpt-4": 0.02, "mistral": 0.002})
    # the oracle column names the best model per prompt: an outcome, not a property of the prompt
    assert m["metadata_columns"] == ["sample_id", "eval_name"]
    ds = load(out)
    assert "oracle_model_to_route_to" not in ds.columns
    np.testing.assert_allclose(np.stack(ds.cost.to_list()), [[0.01, 0.001], [0.03, 0.001], [0.02, 0.004]], rtol=1e-6)


def test_wide_model_detection_rule_and_explicit_models(data_dir, tmp_path, cli):
    df = pd.DataFrame({"question_id": [1, 2, 3], "prompt": ["a", "b", "c"], "turn": [1, 2, 1],
                       "weak": [True, False, True], "strong": [1, 1, 0], "judge": [0.5, 0.7, 0.1]})
    out = ingest(str(write(df, tmp_path / "w.csv")))
    m = read_json(out / "manifest.json")
    assert m["models"] == ["weak", "strong", "judge"]
    assert m["metadata_columns"] == ["question_id", "turn"]
    assert m["outcome_kind"] == "score"
    # Integer 1-10 judge scores are not detected but can be named.
    df = pd.DataFrame({"prompt": ["a", "b"], "m1": [3, 9], "m2": [10, 1], "m3": [0.5, 0.2]})
    code, out = cli("ingest", write(df, tmp_path / "j.csv"), "--models", "m1, m2")
    assert code == 0, out
    m = read_json(data_dir / "processed" / "j" / "manifest.json")
    assert m["models"] == ["m1", "m2"] and m["metadata_columns"] == ["m3"]
    assert m["outcome_range"] == [1.0, 10.0]


def test_wide_missing_cells_are_masked(data_dir, tmp_path):
    df = pd.DataFrame({"prompt": ["a", "b", "c"], "x": [1.0, None, None], "y": [0.0, 1.0, None]})
    out = ingest(str(write(df, tmp_path / "w.parquet")))
    m = read_json(out / "manifest.json")
    ds = load(out)
    assert ds.prompt.tolist() == ["a", "b"]
    assert np.stack(ds["mask"].to_list()).tolist() == [[True, True], [False, True]]
    assert m["dropped"] == {"no outcome": 1} and m["dropped_rows"] == {"no outcome": [3]}


def test_csv_types_are_inferred_over_the_whole_column(data_dir, tmp_path):
    # pandas infers types per 10k-row chunk; a float after 10k integers must still load.
    n = 10_500
    df = pd.DataFrame({"prompt": [f"q{i}" for i in range(n)], "a": [1] * n, "b": [0] * n})
    df.loc[0, "prompt"] = "None"  # a prompt that pandas would read as missing by default
    df["a"] = df["a"].astype(float)
    df.loc[n - 1, "a"] = 0.5
    path = tmp_path / "big.csv"
    df.to_csv(path, index=False, float_format="%g")
    ds = load(ingest(str(path)))
    assert len(ds) == n and ds.prompt[0] == "None"
    assert ds.outcome.iloc[-1][0] == pytest.approx(0.5)


def test_input_prompt_id_is_kept_as_metadata(data_dir, tmp_path):
    df = LONG.assign(prompt_id=[f"q{i}" for i in range(len(LONG))])
    ds = load(ingest(str(write(df, tmp_path / "l.jsonl"))))
    assert ds.source_prompt_id.tolist() == ["q0", "q2", "q4"]
    assert ds.prompt_id[0] == prompt_hash("what is 2+2")[:16]


def test_layout_detection_and_override(data_dir, tmp_path):
    assert detect_layout(["prompt", "model_a", "model_b", "winner"]) == "pairwise"
    assert detect_layout(["prompt", "model", "score", "cost"]) == "long"
    assert detect_layout(["prompt", "gpt", "llama"]) == "wide"
    # A long file read as wide: `model` is text metadata and `score` the only numeric column.
    path = write(LONG, tmp_path / "l.csv")
    with pytest.raises(DataError, match="need at least two model outcome columns"):
        ingest(str(path), layout="wide")
    with pytest.raises(DataError, match="missing required column 'model_a'"):
        ingest(str(path), layout="pairwise")


def test_hub_dataset_goes_through_load_dataset(data_dir, monkeypatch):
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_pandas(LONG)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = ingest("hf:org/prefs", split="test")
    assert calls == [("org/prefs", "test")] and out.name == "prefs"
    assert read_json(out / "manifest.json")["source"] == "hf:org/prefs"
    assert ingest("hf:org/prefs", split="test") == out  # same fingerprint: skipped
    assert len(calls) == 2


def test_an_unreachable_hub_dataset_is_one_error_saying_what_works_offline(data_dir, monkeypatch, cli):
    def unreachable(path, split=None, **kwargs):
        raise ConnectionError(f"Couldn't reach {path!r} on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    code, out = cli("ingest", "hf:org/prefs")
    out = " ".join(out.split())
    assert code == 2 and "hf:org/prefs" in out and "Couldn't reach 'org/prefs'" in out
    assert "HF_HUB_OFFLINE=1" in out and "pass a downloaded file" in out
    assert nothing_written(data_dir)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # already offline: no advice to go offline
    code, out = cli("ingest", "hf:org/prefs")
    assert code == 2 and "local `datasets` cache" in " ".join(out.split()) and "HF_HUB_OFFLINE" not in out

    def unknown_split(path, split=None, **kwargs):
        raise ValueError(f"Unknown split {split!r}")

    monkeypatch.setattr(datasets, "load_dataset", unknown_split)
    code, out = cli("ingest", "hf:org/prefs", "--split", "dev")
    assert code == 2 and "Unknown split 'dev'" in out and "HF_HUB_OFFLINE" not in out


# --- other column names: --rename ---------------------------------------------------------------


# The long layout as EmbedLLM-style files name it; the questions are digits, which a CSV column would be typed as.
OTHER_NAMES = pd.DataFrame({"question": ["12", "12", "7", "7", "40", "40"], "model_name": list("ababab"),
                            "label": [1, 0, 0, 1, 1, 1], "category": list("xxyyzz")})
RENAME = "question=prompt, model_name=model,label=score"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_rename_reads_columns_of_other_names_as_the_layout_names_them(data_dir, tmp_path, cli, suffix):
    code, out = cli("ingest", write(OTHER_NAMES, tmp_path / f"o{suffix}"), "--name", "o")
    assert code == 2 and "missing required column 'prompt'" in out and "--rename OLD=prompt" in out  # says how
    code, out = cli("ingest", write(OTHER_NAMES, tmp_path / f"o{suffix}"), "--name", "o", "--rename", RENAME)
    assert code == 0, out
    canonical = OTHER_NAMES.rename(columns={"question": "prompt", "model_name": "model", "label": "score"})
    assert cli("ingest", write(canonical, tmp_path / f"c{suffix}"), "--name", "c")[0] == 0
    renamed, named = load(data_dir / "processed" / "o"), load(data_dir / "processed" / "c")
    pd.testing.assert_frame_equal(renamed, named)
    assert sorted(renamed.prompt) == ["12", "40", "7"]  # text, not numbers
    m = read_json(data_dir / "processed" / "o" / "manifest.json")
    assert m["layout"] == "long" and m["metadata_columns"] == ["category"]
    assert m["options"]["rename"] == {"question": "prompt", "model_name": "model", "label": "score"}
    assert "rename" not in read_json(data_dir / "processed" / "c" / "manifest.json")["options"]
    code, out = cli("ingest", tmp_path / f"o{suffix}", "--name", "o", "--rename", RENAME.replace(",label=score", ""),
                    "--layout", "wide", "--models", "label")  # another option: read again, not skipped
    assert code == 2 and "need at least two model outcome columns" in out


def test_rename_applies_to_the_test_file_and_splits_use_the_new_names(data_dir, tmp_path, cli):
    main = OTHER_NAMES.assign(fold=["train", "train", "val", "val", "test", "test"])
    path = write(main.rename(columns={"fold": "part"}), tmp_path / "m.jsonl")
    code, out = cli("ingest", path, "--rename", RENAME + ",part=fold", "--split-column", "fold")
    assert code == 0, out
    assert dict(zip(load(data_dir / "processed" / "m").prompt, load(data_dir / "processed" / "m").split)) == \
        {"12": "train", "7": "val", "40": "test"}
    test = pd.DataFrame({"question": ["99", "99"], "model_name": ["a", "b"], "label": [0, 1]})
    code, out = cli("ingest", write(OTHER_NAMES, tmp_path / "t.csv"), "--test-data", write(test, tmp_path / "x.csv"),
                    "--rename", RENAME)
    assert code == 0, out
    ds = load(data_dir / "processed" / "t")
    assert ds.set_index("prompt").split["99"] == "test" and len(ds) == 4


@pytest.mark.parametrize("rename, shown", [
    ("question", "--rename takes OLD=NEW pairs separated by commas, not 'question'"),
    ("question=", "--rename takes OLD=NEW pairs"),
    ("question=prompt,question=text", "--rename names column 'question' twice"),
    ("question=prompt,category=prompt", "--rename gives two columns the name 'prompt'"),
    ("questions=prompt", "--rename questions=prompt: there is no column 'questions' (columns: question, model_name"),
    ("question=category", "--rename question=category: the file already has a column 'category'; rename that one"),
])
def test_a_bad_rename_is_one_line_and_writes_nothing(data_dir, tmp_path, cli, rename, shown):
    code, out = cli("ingest", write(OTHER_NAMES, tmp_path / "o.csv"), "--rename", rename)
    assert code == 2 and shown in out and out.strip().count("\n") == 0, out
    assert nothing_written(data_dir)


def test_a_bad_rename_from_python_is_a_config_error(data_dir, tmp_path):
    from pipeline.common import ConfigError

    path = str(write(OTHER_NAMES, tmp_path / "o.csv"))
    for rename, shown in (({"question": "prompt", "category": "prompt"}, "two columns the name 'prompt'"),
                          ({"question": 3}, "maps column names to column names")):
        with pytest.raises(ConfigError, match=shown):
            ingest(path, rename=rename)
    assert nothing_written(data_dir)


def test_run_passes_the_input_options_to_ingest(data_dir, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("PREROUTER_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write(OTHER_NAMES, tmp_path / "o.csv")
    code, out = cli("run", path, "--rename", "questions=prompt")
    assert code == 2 and "there is no column 'questions'" in out, out[-2000:]
    code, out = cli("run", path, "--rename", RENAME, "--layout", "wide")
    assert code == 2 and "need at least two model outcome columns, found only 'score'" in out, out[-2000:]
    code, out = cli("run", path, "--rename", RENAME, "--layout", "wide", "--models", "nope,score")
    assert code == 2 and "missing required column 'nope'" in out, out[-2000:]


# --- skip on unchanged ---------------------------------------------------------------------------


def test_skip_when_unchanged_redo_when_input_options_or_force_change(data_dir, tmp_path, cli):
    path = write(LONG, tmp_path / "l.csv")
    code, out = cli("ingest", path, "--name", "l")
    assert code == 0 and "ingested l" in out
    manifest = data_dir / "processed" / "l" / "manifest.json"
    first = read_json(manifest)
    code, out = cli("ingest", path, "--name", "l")
    assert code == 0 and "unchanged, skipping" in out
    assert read_json(manifest) == first
    code, out = cli("ingest", path, "--name", "l", "--force")
    assert "ingested" in out
    code, out = cli("ingest", path, "--name", "l", "--layout", "long")
    assert "ingested" in out and read_json(manifest)["content_hash"] != first["content_hash"]
    write(LONG.assign(score=LONG.score + 0), tmp_path / "l.csv")  # same bytes: still skipped
    assert "unchanged, skipping" in cli("ingest", path, "--name", "l", "--layout", "long")[1]
    write(LONG.assign(score=LONG.score.clip(upper=9)), tmp_path / "l.csv")
    code, out = cli("ingest", path, "--name", "l", "--layout", "long")
    assert "ingested" in out
    assert read_json(manifest)["outcome_range"] == [3.0, 9.0]


# --- bad input: whole-file failures (exit 2, nothing written) and dropped rows -----------------


def nothing_written(data_dir):
    return not data_dir.exists() or not any(data_dir.rglob("*"))


BAD_FILES = {
    "missing_column.csv": ("prompt,model_a,model_b\nhi,a,b\n", "missing required column 'winner'", None),
    "semicolons.csv": ("prompt;a;b\nhi;1;0\nyo;0;1\n", "the file looks ';'-separated", None),
    "tabs.csv": ("prompt\ta\tb\nhi\t1\t0\n", "the file looks '\\t'-separated; prerouter reads comma-separated "
                 ".csv and tab-separated .tsv (name it .tsv", None),
    "commas.tsv": ("prompt,a,b\nhi,1,0\n", "the file looks ','-separated; prerouter reads comma-separated .csv and "
                   "tab-separated .tsv (name it .csv", None),
    "semicolons.tsv": ("prompt;a;b\nhi;1;0\n", "(re-save it with commas", None),
    "routerbench.pkl": ("\x80\x04.", ".pkl files are not read: loading a pickle runs any code it holds", None),
    "sheet.xlsx": ("PK", ".xlsx files are not read: save the sheet as CSV", None),
    "unknown_winner.csv": ("prompt,model_a,model_b,winner\nhi,a,b,model_a\nyo,a,b,A\n",
                           "unknown winner value 'A'", 2),
    "arena_flags.csv": ("prompt,model_a,model_b,winner_model_a,winner_model_b,winner_tie\n"
                        "hi,a,b,1,0,0\nyo,a,b,1,1,0\n", "must have exactly one 1", 2),
    "all_empty.csv": ('prompt,model,score\n"",a,1\n"  ",b,2\n', "no usable rows", None),
    "single_model.jsonl": ('{"prompt": "hi", "model": "a", "score": 1}\n{"prompt": "yo", "model": "a", "score": 2}\n',
                           "only one model (a)", None),
    "nan_scores.csv": ("prompt,model,score\nhi,a,\nyo,b,n/a\n", "no usable rows", None),
    "broken.jsonl": ('{"prompt": "hi", "model": "a", "score": 1}\n{"prompt": "yo", "model": \n', "line 2", None),
    "garbage.parquet": ("this is not parquet", "cannot read as parquet", None),
    "notes.txt": ("prompt\n", "unsupported file type '.txt'", None),
    "empty.jsonl": ("", "the file is empty", None),
    "header_only.csv": ("prompt,a,b\n", "has a header but no rows", None),
    "int_prompts.jsonl": ('{"prompt": 1, "a": 1, "b": 0}\n{"prompt": 2, "a": 0, "b": 0}\n',
                          "no usable rows: all 2 dropped (non-text prompt: 2 (first row 1))", None),
}


@pytest.mark.parametrize("filename", sorted(BAD_FILES))
def test_bad_file_fails_with_exit_2_and_writes_nothing(data_dir, tmp_path, cli, filename):
    text, reason, row = BAD_FILES[filename]
    path = tmp_path / filename
    path.write_text(text)
    code, out = cli("ingest", path)
    assert code == 2, out
    assert "error:" in out and str(path) in out and reason in out
    if row is not None:
        assert f"row {row}" in out
    assert nothing_written(data_dir)


def test_non_utf8_file_names_the_line(data_dir, tmp_path, cli):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,a,b\nhello,1,0\ncaf\u00e9,1,0\n".encode("latin-1"))
    code, out = cli("ingest", path)
    assert code == 2 and str(path) in out and "not valid UTF-8" in out and "line 3" in out
    assert nothing_written(data_dir)


def test_missing_file(data_dir, tmp_path, cli):
    code, out = cli("ingest", tmp_path / "nope.csv")
    assert code == 2 and "nope.csv" in out and "file not found" in out
    assert nothing_written(data_dir)


def test_failed_reingest_keeps_the_previous_dataset(data_dir, tmp_path, cli):
    path = write(LONG, tmp_path / "l.csv")
    assert cli("ingest", path)[0] == 0
    before = read_json(data_dir / "processed" / "l" / "manifest.json")
    path.write_text("prompt,model,score\nhi,a,1\n")
    assert cli("ingest", path)[0] == 2
    assert read_json(data_dir / "processed" / "l" / "manifest.json") == before
    assert visible(data_dir / "processed") == ["l"] and leftovers(data_dir) == []


def test_unusable_rows_are_dropped_counted_and_printed(data_dir, tmp_path, cli):
    lines = [
        {"prompt": "ok 1", "model": "a", "score": 1}, {"prompt": "ok 1", "model": "b", "score": 0},
        {"prompt": "", "model": "a", "score": 1},  # row 3: empty prompt
        {"prompt": 42, "model": "a", "score": 1},  # row 4: not text
        {"prompt": "ok 2", "model": "a", "score": None},  # row 5: missing score
        {"prompt": "ok 2", "model": "b", "score": "high"},  # row 6: not a number
        {"prompt": "ok 2", "model": None, "score": 1},  # row 7: no model
        {"prompt": "ok 3", "model": "b", "score": 0.5},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    code, out = cli("ingest", path)
    assert code == 0, out
    m = read_json(data_dir / "processed" / "mixed" / "manifest.json")
    assert m["dropped"] == {"non-text prompt": 1, "empty prompt": 1, "missing model": 1,
                            "non-numeric score": 1, "missing score": 1}
    assert m["dropped_rows"]["empty prompt"] == [3] and m["dropped_rows"]["non-text prompt"] == [4]
    assert m["dropped_rows"]["missing score"] == [5] and m["dropped_rows"]["non-numeric score"] == [6]
    assert m["n_rows_in"] == 8 and m["n_rows_used"] == 3 and m["n_prompts"] == 2
    assert "dropped 1 rows: empty prompt (rows 3)" in out and "non-numeric score (rows 6)" in out


def test_text_that_reads_as_json_stays_text_beside_a_number(data_dir, tmp_path, cli):
    # One number in a JSON column makes it mixed; `datasets` keeps such a column JSON-encoded but stores a
    # string that parses as JSON unchanged, so the prompt "0" would read back as the number 0.
    lines = [
        {"prompt": 0, "model_a": "m1", "model_b": "m2", "winner": "model_a"},  # row 1: a number, not text
        {"prompt": "0", "model_a": "m1", "model_b": "m2", "winner": "model_a"},
        {"prompt": "[1, 2]", "model_a": "m1", "model_b": "m2", "winner": "model_b"},
        {"prompt": "true", "model_a": "m2", "model_b": "m1", "winner": "tie"},
    ]
    path = tmp_path / "numbers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    code, out = cli("ingest", path)
    assert code == 0, out
    m = read_json(data_dir / "processed" / "numbers" / "manifest.json")
    assert m["dropped"] == {"non-text prompt": 1} and m["dropped_rows"]["non-text prompt"] == [1]
    assert m["n_battles"] == 3 and m["n_prompts"] == 3


def test_pairwise_row_drops(data_dir, tmp_path):
    df = pd.DataFrame({"prompt": ["p", "p", "q", "r", " "], "model_a": ["a", "a", "b", None, "a"],
                       "model_b": ["b", "a", "a", "b", "c"], "winner": ["tie (bothbad)", "tie", None, "tie", "tie"]})
    m = read_json(ingest(str(write(df, tmp_path / "p.parquet"))) / "manifest.json")
    assert m["dropped"] == {"empty prompt": 1, "missing model": 1, "same model on both sides": 1, "missing winner": 1}
    assert m["n_battles"] == 1
    assert m["models"] == ["a", "b"]  # "c" only played in a dropped row


def test_wide_infinite_cell_drops_the_row_and_models_option_is_wide_only(data_dir, tmp_path, cli):
    df = pd.DataFrame({"prompt": ["a", "b"], "x": [1.0, float("inf")], "y": [0.0, 1.0]})
    m = read_json(ingest(str(write(df, tmp_path / "w.parquet"))) / "manifest.json")
    assert m["dropped"] == {"non-numeric score": 1} and m["n_prompts"] == 1
    code, out = cli("ingest", write(LONG, tmp_path / "l.csv"), "--models", "a,b")
    assert code == 2 and "wide layout" in out and not (data_dir / "processed" / "l").exists()


def test_real_entry_point_exit_code(data_dir, tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "one.csv"
    path.write_text("prompt,a\nhi,1\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "ingest", str(path)], capture_output=True, text=True,
                          env={**os.environ, "PREROUTER_DATA_DIR": str(data_dir), "COLUMNS": "300"})
    assert proc.returncode == 2 and "one.csv" in proc.stderr and "need at least two model" in proc.stderr
    assert nothing_written(data_dir)
