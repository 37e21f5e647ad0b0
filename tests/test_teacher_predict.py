"""Teacher embeddings over the processes of a distributed job: Lightning's `Trainer.predict` under ddp on
2 CPU processes (gloo), each rank embedding its share and writing its own shards."""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from .tiny import count_teacher_inputs, finished_shards, make_tiny_teacher, run_two_ranks, shard_ids, word_prompts

ROOT = Path(__file__).resolve().parents[1]

# One job started as a user starts one: a command whose Lightning ddp launcher runs the same command again
# as rank 1 (at the first Trainer.predict). Each process counts the prompts its teacher's tokenizer is
# handed and lists the cache after each call.
JOB = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import numpy as np
    from pipeline import encoders
    from pipeline.config import TrainConfig

    args = json.loads(Path(sys.argv[1]).read_text())
    from tests.tiny import counting_teacher_loader, finished_shards
    encoded = []
    encoders.load_teacher = counting_teacher_loader(encoders.load_teacher, encoded)
    job = TrainConfig(accelerator="cpu", devices=2, strategy="ddp")
    out = Path(args["out"])
    steps = []
    for step, (prompts, ids) in enumerate(args["calls"]):
        encoded.clear()
        emb = encoders.teacher_embeddings(prompts, ids, args["teacher"], 32, 8, "cpu", shard_size=24, job=job)
        rank = os.environ["LOCAL_RANK"]  # set in rank 0 too, by the launcher
        np.save(out / f"emb{step}-rank{rank}.npy", emb)
        steps.append({"encoded": sum(encoded),
                      "shards": sorted(p.name for p in finished_shards(Path(args["shard_dir"])))})
    (out / f"rank{rank}.json").write_text(json.dumps(steps))
""")


@pytest.mark.timeout(180)
def test_ddp_on_two_cpu_processes_embeds_each_prompt_once_as_one_process_does(tmp_path, monkeypatch):
    from pipeline.encoders import encoder_key, teacher_embeddings

    teacher = str(make_tiny_teacher(tmp_path / "teacher"))
    prompts, ids = word_prompts(200)
    more = (prompts + ["one more prompt"], ids + ["p-extra"])  # fewer new prompts than ranks
    cache = tmp_path / "cache"
    shard_dir = cache / "teacher" / encoder_key(teacher, 32)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "args.json").write_text(json.dumps({
        "teacher": teacher, "shard_dir": str(shard_dir), "out": str(out),
        "calls": [[prompts, ids], [prompts[::-1], ids[::-1]], list(more)]}))
    env = os.environ | {"PREROUTER_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = run_two_ranks([sys.executable, str(tmp_path / "job.py"), str(tmp_path / "args.json")], env, tmp_path, 150,
                        "the 2-process embedding job")
    assert "over 2 processes" in log, log[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    # first call: each rank encoded its share, no prompt twice, and wrote it in shards of at most 24
    first = [r[0] for r in ranks]
    assert all(f["encoded"] > 0 for f in first) and sum(f["encoded"] for f in first) == len(prompts)
    assert first[0]["shards"] == first[1]["shards"]  # both read the cache after the barrier
    shards = [shard_dir / name for name in first[0]["shards"]]
    written = shard_ids(shards)
    assert sorted(written) == sorted(ids)  # every prompt once
    assert all(len(np.load(s)["ids"]) <= 24 for s in shards) and len(shards) >= 2 * 100 // 24

    # second call, in another order: nothing encoded, no new shard
    assert [r[1]["encoded"] for r in ranks] == [0, 0]
    assert [r[1]["shards"] for r in ranks] == [first[0]["shards"]] * 2

    # one new prompt, fewer than ranks: each rank encodes it itself, into the same shard (named by its ids)
    assert [r[2]["encoded"] for r in ranks] == [1, 1]
    assert len(finished_shards(shard_dir)) == len(shards) + 1 and sorted(shard_ids(finished_shards(shard_dir))) == sorted(more[1])

    # the same numbers as one process, rows in the caller's order, on both ranks
    monkeypatch.setenv("PREROUTER_CACHE_DIR", str(tmp_path / "one"))
    one = teacher_embeddings(*more, teacher, 32, 8, "cpu")
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(out / f"emb0-rank{rank}.npy"), one[:-1], atol=1e-5)
        np.testing.assert_allclose(np.load(out / f"emb1-rank{rank}.npy"), one[:-1][::-1], atol=1e-5)
        np.testing.assert_allclose(np.load(out / f"emb2-rank{rank}.npy"), one, atol=1e-5)

    # and a one-process run on the job's cache encodes nothing
    monkeypatch.setenv("PREROUTER_CACHE_DIR", str(cache))
    encoded = count_teacher_inputs(monkeypatch)
    np.testing.assert_allclose(teacher_embeddings(*more, teacher, 32, 8, "cpu"), one, atol=1e-5)
    assert not encoded


def test_a_one_process_job_keeps_the_pass_in_this_process(tmp_path, monkeypatch):
    """train.devices=1 (the default): no Trainer, the in-process pass as before."""
    from pipeline import teacher_predict
    from pipeline.config import TrainConfig
    from pipeline.encoders import teacher_embeddings

    monkeypatch.setattr(teacher_predict, "predict_missing", lambda *a, **k: pytest.fail("a Trainer was built"))
    monkeypatch.setenv("PREROUTER_CACHE_DIR", str(tmp_path / "cache"))
    teacher = str(make_tiny_teacher(tmp_path / "teacher"))
    prompts, ids = word_prompts(20)
    encoded = count_teacher_inputs(monkeypatch)
    emb = teacher_embeddings(prompts, ids, teacher, 32, 8, "cpu", job=TrainConfig())
    assert emb.shape == (20, 32) and sum(encoded) == 20
