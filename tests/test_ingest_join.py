"""Prompts from a file of their own (`ingest --prompts`): MT-Bench's judgments keyed by question_id."""
import json

import datasets
import numpy as np
import pandas as pd
import pytest

from pipeline.common import DataError, read_json
from pipeline.ingest import ingest

QUESTIONS = [{"question_id": 81, "category": "writing", "turns": ["Write a travel blog post.", "Rewrite it in limericks."]},
             {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "And times 3?"]},
             {"question_id": 83, "category": "coding", "turns": ["Reverse a list in Python.", "Now in C."]}]


def judgments() -> pd.DataFrame:
    """FastChat's single-answer judgments: two models, both turns, a judge given as a list."""
    rng = np.random.default_rng(0)
    rows = [{"question_id": q["question_id"], "model": m, "judge": ["gpt-4", "single-v1" + ("-multi-turn" if t == 2 else "")],
             "user_prompt": f"[Question] ... [Answer of {m}]", "judgment": "Rating: [[x]]",
             "score": float(rng.integers(1, 11)), "turn": t, "tstamp": 1.7e9}
            for q in QUESTIONS for m in ("vicuna-13b", "gpt-4") for t in (1, 2)]
    return pd.DataFrame(rows)


def write_jsonl(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(out, part="dataset"):
    return datasets.load_from_disk(str(out / part)).to_pandas()


def test_judgments_joined_to_their_questions_equal_the_same_judgments_with_the_prompts_inline(data_dir, tmp_path):
    judged = judgments()
    data = write_jsonl(judged.to_dict("records"), tmp_path / "gpt-4_single.jsonl")
    questions = write_jsonl(QUESTIONS, tmp_path / "question.jsonl")
    by_id = {q["question_id"]: q for q in QUESTIONS}
    inline = judged.assign(prompt=["\n\n".join(by_id[q]["turns"][:t]) for q, t in zip(judged.question_id, judged.turn)],
                           category=[by_id[q]["category"] for q in judged.question_id])
    joined = load(ingest(str(data), prompts=str(questions)))
    expected = load(ingest(str(write_jsonl(inline.to_dict("records"), tmp_path / "inline.jsonl"))))
    pd.testing.assert_frame_equal(joined[expected.columns], expected)
    assert len(joined) == 6 and joined.prompt[1] == "Write a travel blog post.\n\nRewrite it in limericks."
    assert read_json(data_dir / "processed" / "gpt-4_single" / "manifest.json")["prompts"]["source"] == str(questions)


def test_a_key_read_as_text_in_one_file_and_a_number_in_the_other_still_joins(data_dir, tmp_path):
    judged = judgments().assign(question_id=lambda d: d.question_id.astype(str))  # "81" against 81
    data = write_jsonl(judged.to_dict("records"), tmp_path / "j.jsonl")
    prompts = pd.DataFrame({"question_id": [81.0, 82.0, 83.0], "prompt": ["one", "two", "three"]})
    prompts.to_csv(tmp_path / "p.csv", index=False)
    ds = load(ingest(str(data), prompts=str(tmp_path / "p.csv")))
    assert ds.prompt.tolist() == ["one", "two", "three"]  # a `prompt` column: every turn gets it whole


def _break(case):
    questions, judged = [dict(q) for q in QUESTIONS], judgments()
    if case == "missing key":
        questions = questions[:2]
    elif case == "key twice":
        questions.append(dict(QUESTIONS[0]))
    elif case == "no key":
        judged = judged.rename(columns={"question_id": "qid"})
    elif case == "two keys":
        questions = [{**q, "judge": "x"} for q in questions]
    elif case == "no text":
        questions = [{"question_id": q["question_id"], "text": q["turns"][0]} for q in questions]
    elif case == "own prompt":
        judged = judged.assign(prompt="hello")
    elif case == "bad turn":
        judged.loc[3, "turn"] = 0
    return questions, judged


@pytest.mark.parametrize("case, says", [
    ("missing key", "4 row(s) have a question_id with no prompt in the prompts file (first: 83)"),
    ("key twice", "question_id 81 is in the prompts file more than once"),
    ("no key", "must share exactly one column, the key that joins them; the data (qid, model"),
    ("two keys", "shares question_id, judge"),
    ("no text", "the prompts file needs a `prompt` column or a `turns` list (columns: question_id, text)"),
    ("own prompt", "the data has its own 'prompt' column"),
    ("bad turn", "turn 0 is not a turn number"),
])
def test_a_join_that_cannot_be_made_is_one_error_and_writes_nothing(data_dir, tmp_path, cli, case, says):
    questions, judged = _break(case)
    data = write_jsonl(judged.to_dict("records"), tmp_path / "j.jsonl")
    code, out = cli("ingest", data, "--prompts", write_jsonl(questions, tmp_path / "q.jsonl"))
    assert code == 2 and says in " ".join(out.split()), out
    if case == "missing key":
        assert "row 9" in out
    assert not (data_dir / "processed" / "j").exists()


def test_a_changed_prompts_file_is_ingested_again(data_dir, tmp_path, cli):
    data = write_jsonl(judgments().to_dict("records"), tmp_path / "j.jsonl")
    questions = write_jsonl(QUESTIONS, tmp_path / "q.jsonl")
    assert cli("ingest", data, "--prompts", questions)[0] == 0
    code, out = cli("ingest", data, "--prompts", questions)
    assert code == 0 and "unchanged, skipping" in out
    write_jsonl([{**q, "turns": [q["turns"][0].upper(), q["turns"][1]]} for q in QUESTIONS], questions)
    code, out = cli("ingest", data, "--prompts", questions)
    assert code == 0 and "unchanged" not in out
    assert load(data_dir / "processed" / "j").prompt[0] == "WRITE A TRAVEL BLOG POST."


def test_prompts_file_errors_name_the_file(data_dir, tmp_path):
    data = write_jsonl(judgments().to_dict("records"), tmp_path / "j.jsonl")
    with pytest.raises(DataError, match="file not found"):
        ingest(str(data), prompts=str(tmp_path / "nope.jsonl"))
