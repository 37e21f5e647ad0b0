"""Evaluation stage: per-battle win prediction against the global Bradley-Terry ranking."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest


def test_win_prediction_puts_win_rates_against_different_opponents_on_one_scale(data_dir):
    """AlpacaEval's design: a reference (model 0) meets everyone, the others meet only it. Model 1 is
    stronger than the reference on these prompts, though its win rate (60%, against the reference) is
    below the reference's (70%, against the field); the rule must read it as a win for model 1."""
    import datasets

    from pipeline.common import processed_dir
    from pipeline.evaluate import battle_accuracy
    from pipeline.train import Prepared

    n = 10
    split = np.array(["train"] * 6 + ["test"] * 4)
    ids = [f"p{i}" for i in range(n)]
    battles = {"prompt_id": [], "model_a": [], "model_b": [], "score_a": [], "bothbad": []}
    for pid in ids:
        for other, score in ((1, 1.0), (2, 0.0)):  # model 1 beats the reference, model 2 loses to it
            for key, value in zip(battles, (pid, other, 0, score, False)):
                battles[key].append(value)
    datasets.Dataset(pa.table(battles)).save_to_disk(str(processed_dir("star") / "battles"))
    prep = Prepared(name="star", models=["ref", "one", "two"], costs=[None] * 3, pair=None, prompts=[""] * n,
                    prompt_ids=ids, target=np.zeros((n, 3), np.float32), mask=np.ones((n, 3), bool),
                    split=split, teacher_emb=np.zeros((n, 4), np.float32), data_hash="x",
                    stats={"strengths": {"ref": 1.0, "one": 0.5, "two": 0.0}})  # BT is wrong about "one"
    test = prep.rows("test")
    probs = {"router": np.tile([0.7, 0.6, 0.1], (len(test), 1))}
    out = battle_accuracy(prep, test, probs)
    assert out["n_battles"] == 8  # test prompts only
    assert out["bradley_terry"] == pytest.approx(0.5)
    assert out["router"] == pytest.approx(1.0)  # comparing 0.7 with 0.6 directly would score 0.5
    assert out["vs_bradley_terry"]["router"] == [4, 0]
