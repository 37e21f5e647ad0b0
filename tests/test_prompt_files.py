"""Files of prompts (JSON lines, a JSON array, CSV, parquet; compressed or not) and `score_file`."""
from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma

import numpy as np
import pytest

from pipeline.common import DataError
from pipeline.prompt_files import score_file
from pipeline.runtime import Router, prompt_from_messages

from .fabricate import PROMPTS, tiny_bundle


def test_score_file_writes_one_line_per_prompt(pair_bundle, pair_router, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "scored.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": q, **({"prompt_id": f"p{i}"} if i % 2 else {})})
                             for i, q in enumerate(PROMPTS)) + "\n\n")
    assert score_file(pair_bundle[0], src, dst, strong_fraction=0.5) == len(PROMPTS)
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    int8 = Router.load(pair_bundle[0])
    assert [x["index"] for x in lines] == list(range(len(PROMPTS)))
    assert [x.get("prompt_id") for x in lines] == [None if i % 2 == 0 else f"p{i}" for i in range(len(PROMPTS))]
    assert [x["route"] for x in lines] == int8.decide(PROMPTS, strong_fraction=0.5)
    assert np.allclose([list(x["scores"].values()) for x in lines], int8.scores(PROMPTS), atol=1e-6)


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not valid JSON"), ('{"text": "x"}', "exactly one of prompt"),
    ('["x"]', "exactly one of prompt"), ('{"prompt": 3}', "prompt must be a string, got int"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}', "exactly one of prompt"),
    ('{"messages": [{"role": "system", "content": "be brief"}]}', "no user text"),
    ('{"messages": "hi"}', "non-empty list"),
])
def test_score_file_rejects_bad_lines(pair_bundle, tmp_path, line, reason):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=reason) as e:
        score_file(pair_bundle[0], src, dst)
    assert e.value.row == 2 and not dst.exists()


def test_score_file_runs_on_one_output_never_interleave(pair_bundle, tmp_path, monkeypatch):
    """A second run on the same output that starts and finishes while the first is writing: each run
    writes its own temporary file, so the output is one run's lines, whole (the last to finish wins)."""
    first, second, dst = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out.jsonl"
    first.write_text("".join(json.dumps({"prompt": f"first {i}", "prompt_id": f"a{i}"}) + "\n" for i in range(40)))
    second.write_text("".join(json.dumps({"prompt": f"second {i}", "prompt_id": f"b{i}"}) + "\n" for i in range(7)))
    real_scores, calls = Router.scores, []

    def scores(self, prompts, batch_size=64):
        calls.append(len(prompts))
        if len(calls) == 2:  # the first run has written its first batch: the whole second run happens now
            assert score_file(pair_bundle[0], second, dst, batch_size=2) == 7
            assert [x["prompt_id"] for x in map(json.loads, dst.read_text().splitlines())] == [f"b{i}" for i in range(7)]
        return real_scores(self, prompts, batch_size)

    monkeypatch.setattr(Router, "scores", scores)
    assert score_file(pair_bundle[0], first, dst, batch_size=1) == 40  # batches of 16 lines: several flushes
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [x["prompt_id"] for x in lines] == [f"a{i}" for i in range(40)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out.jsonl"]  # no temporaries


def test_score_file_refuses_to_overwrite_its_input(pair_bundle, tmp_path, cli):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n')
    link = tmp_path / "link.jsonl"
    link.hardlink_to(src)
    for out in (src, tmp_path / "." / "in.jsonl", link):
        with pytest.raises(DataError, match="the same file as the input") as e:
            score_file(pair_bundle[0], src, out)
        assert e.value.exit_code == 2
    code, text = cli("score", pair_bundle[0], "--input", src, "--output", src)
    assert code == 2 and "the same file as the input" in text and len(text.strip().splitlines()) == 1
    assert src.read_text() == '{"prompt": "a"}\n'


def test_score_file_rejects_non_utf8_naming_the_line(pair_bundle, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        score_file(pair_bundle[0], src, dst)
    assert e.value.row == 2 and not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_score_file_output_is_valid_utf8(pair_bundle, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # A lone surrogate written as a JSON escape is a legal JSON string but has no UTF-8 form; a BOM and CRLF.
    src.write_bytes("\ufeff".encode() + b'{"prompt": "\\ud800 x", "prompt_id": "\\udfff-caf\xc3\xa9"}\r\n'
                    b'{"prompt": "\xe6\x97\xa5\xe6\x9c\xac", "prompt_id": "\xe6\x97\xa5"}\n')
    assert score_file(pair_bundle[0], src, dst) == 2
    lines = [json.loads(x) for x in dst.read_bytes().decode("utf-8").splitlines()]  # strict decoding
    assert [x["prompt_id"] for x in lines] == ["\udfff-café", "日"]
    assert "日" in dst.read_text(encoding="utf-8")  # non-ASCII ids stay readable where they can


def test_score_file_reads_csv_like_jsonl(pair_bundle, tmp_path):
    """A CSV input (BOM, CRLF, a quoted prompt over two lines, an extra column) scores as the same JSONL does."""
    prompts = ["first, with a comma", 'a "quoted"\nsecond line', "café 日本"]
    src, jsonl = tmp_path / "in.csv", tmp_path / "in.jsonl"
    with open(src, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(["topic", "prompt", "prompt_id"])
        writer.writerows([["t", q, f"p{i}"] for i, q in enumerate(prompts)])
    jsonl.write_text("".join(json.dumps({"prompt": q, "prompt_id": f"p{i}"}) + "\n" for i, q in enumerate(prompts)))
    assert score_file(pair_bundle[0], src, tmp_path / "a.jsonl") == score_file(pair_bundle[0], jsonl, tmp_path / "b.jsonl") == 3
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert [json.loads(x)["prompt_id"] for x in (tmp_path / "a.jsonl").read_text().splitlines()] == ["p0", "p1", "p2"]
    tsv = tmp_path / "in.tsv"  # tab-separated: the commas stay inside the prompt
    with open(tsv, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["prompt", "prompt_id"]] + [[q, f"p{i}"] for i, q in enumerate(prompts)])
    assert score_file(pair_bundle[0], tsv, tmp_path / "t.jsonl") == 3
    assert (tmp_path / "t.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()

    src.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"no `prompt` column \(columns: text\)"):
        score_file(pair_bundle[0], src, tmp_path / "c.jsonl")
    src.write_text("id,prompt\n1,hello\n2\n")
    with pytest.raises(DataError, match="no `prompt` cell") as e:
        score_file(pair_bundle[0], src, tmp_path / "c.jsonl")
    assert e.value.row == 3 and not (tmp_path / "c.jsonl").exists()


def test_score_file_reads_parquet_like_jsonl(pair_bundle, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = ["first, with a comma", 'a "quoted"\nsecond line', "café 日本"] * 2000  # several read batches
    ids = [f"p{i}" for i in range(len(prompts))]
    src, jsonl = tmp_path / "in.parquet", tmp_path / "in.jsonl"
    pq.write_table(pa.table({"topic": ["t"] * len(prompts), "prompt": prompts, "prompt_id": ids}), src,
                   row_group_size=1000)
    jsonl.write_text("".join(json.dumps({"prompt": q, "prompt_id": i}) + "\n" for q, i in zip(prompts, ids)))
    assert score_file(pair_bundle[0], src, tmp_path / "a.jsonl") == score_file(pair_bundle[0], jsonl, tmp_path / "b.jsonl") == 6000
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    chats = [[{"role": "system", "content": "terse"}, {"role": "user", "content": "Prove it."}]]
    pq.write_table(pa.table({"messages": chats}), src)
    jsonl.write_text(json.dumps({"prompt": "Prove it."}) + "\n")  # the user turn, as the serving rule reads it
    score_file(pair_bundle[0], src, tmp_path / "c.jsonl")
    score_file(pair_bundle[0], jsonl, tmp_path / "d.jsonl")
    assert (tmp_path / "c.jsonl").read_text() == (tmp_path / "d.jsonl").read_text()
    pq.write_table(pa.table({"text": ["hello"]}), src)
    with pytest.raises(DataError, match=r"no `prompt` column \(columns: text\)"):
        score_file(pair_bundle[0], src, tmp_path / "e.jsonl")
    pq.write_table(pa.table({"prompt": ["ok", None]}), src)
    with pytest.raises(DataError, match="exactly one of prompt \\(a string\\) or messages") as e:
        score_file(pair_bundle[0], src, tmp_path / "e.jsonl")
    assert e.value.row == 2 and not (tmp_path / "e.jsonl").exists()
    src.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet file"):
        score_file(pair_bundle[0], src, tmp_path / "e.jsonl")


def test_score_file_reads_a_json_array_like_jsonl(pair_bundle, tmp_path):
    records = [{"prompt": "hello", "prompt_id": 1}, {"messages": [{"role": "user", "content": "integrate x^2"}]}]
    array, jsonl = tmp_path / "in.json", tmp_path / "in.jsonl"
    array.write_text("\ufeff " + json.dumps(records, indent=2), encoding="utf-8")
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert score_file(pair_bundle[0], array, tmp_path / "a.jsonl") == score_file(pair_bundle[0], jsonl, tmp_path / "b.jsonl") == 2
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    array.write_text(json.dumps([{"prompt": "ok"}, {"prompt": 3}]))
    with pytest.raises(DataError, match="prompt must be a string") as e:
        score_file(pair_bundle[0], array, tmp_path / "c.jsonl")
    assert e.value.row == 2
    array.write_text('[{"prompt": "ok"},')
    with pytest.raises(DataError, match="not valid JSON"):
        score_file(pair_bundle[0], array, tmp_path / "c.jsonl")
    lines = tmp_path / "lines.json"  # a .json file of JSON lines still reads as lines
    lines.write_text(jsonl.read_text())
    assert score_file(pair_bundle[0], lines, tmp_path / "d.jsonl") == 2


def test_score_file_reads_chat_messages_by_the_serving_rule(pair_bundle, tmp_path):
    chats = [[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Prove it."}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": [{"type": "text", "text": "integrate x^2"}]}]]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"messages": m, "prompt_id": i}) + "\n" for i, m in enumerate(chats)))
    assert score_file(pair_bundle[0], src, dst, strong_fraction=0.5) == 2
    prompts = [prompt_from_messages(m) for m in chats]
    assert prompts == ["Prove it.", "hi\n\nintegrate x^2"]  # system and assistant turns are not routed on
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [x["route"] for x in lines] == Router.load(pair_bundle[0]).decide(prompts, strong_fraction=0.5)
    assert np.allclose([list(x["scores"].values()) for x in lines], Router.load(pair_bundle[0]).scores(prompts), atol=1e-6)


def test_score_file_takes_every_routing_setting_route_takes(pair_bundle, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in PROMPTS))

    def routes(path, **settings):
        score_file(path, src, tmp_path / "out.jsonl", **settings)
        return [json.loads(x)["route"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]

    pair = Router.load(pair_bundle[0])
    assert routes(pair_bundle[0], threshold=0.0) == ["strong"] * len(PROMPTS) == pair.decide(PROMPTS, threshold=0.0)
    assert routes(pair_bundle[0], threshold=1.01) == ["weak"] * len(PROMPTS)
    multi, _ = tiny_bundle(tmp_path / "m", n_models=3, decision={"kind": "multi", "cost_lambdas": {"0.5": 0.0}})
    assert routes(multi, cost_weight=100.0) == ["m0"] * len(PROMPTS)  # the cheapest
    assert routes(multi, cost_weight=0.0) == Router.load(multi).decide(PROMPTS, cost_weight=0.0)
    with pytest.raises(DataError, match="cost_weight does not apply"):
        routes(pair_bundle[0], cost_weight=1.0)
    with pytest.raises(DataError, match="give strong_fraction or threshold, not both"):
        routes(pair_bundle[0], strong_fraction=0.5, threshold=0.5)


def test_score_file_reads_compressed_inputs_like_plain_ones(pair_bundle, tmp_path):
    jsonl = "".join(json.dumps({"prompt": q, "prompt_id": f"p{i}"}) + "\n" for i, q in enumerate(PROMPTS)).encode()
    rows = "prompt,prompt_id\n" + "".join(f'"{q}",p{i}\n' for i, q in enumerate(PROMPTS))
    (tmp_path / "in.jsonl").write_bytes(jsonl)
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "in.csv.bz2").write_bytes(bz2.compress(rows.encode()))
    (tmp_path / "in.jsonl.xz").write_bytes(lzma.compress(jsonl))
    outs = {}
    for name in ("in.jsonl", "in.jsonl.gz", "in.csv.bz2", "in.jsonl.xz"):
        assert score_file(pair_bundle[0], tmp_path / name, tmp_path / f"{name}.out") == len(PROMPTS)
        outs[name] = (tmp_path / f"{name}.out").read_text()
    assert len(set(outs.values())) == 1
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl * 50)[:200])
    (tmp_path / "plain.jsonl.gz").write_bytes(jsonl)
    for name, reason in (("cut.jsonl.gz", "cannot decompress as .gz"), ("plain.jsonl.gz", "Not a gzipped file")):
        with pytest.raises(DataError, match=reason) as e:
            score_file(pair_bundle[0], tmp_path / name, tmp_path / "x.out")
        assert str(tmp_path / name) in str(e.value) and not (tmp_path / "x.out").exists()
