"""Settings chosen on held-out data: group smoothing by a metadata column (cross-validated), only when it clearly helps."""
from __future__ import annotations

import numpy as np

from pipeline.config import load_config
from pipeline.data import Prepared
from pipeline.select import NO_GROUP, choose_group_by, group_candidates, val_quality


def _prep(n=5000, seed=0) -> Prepared:
    """Two models; whether the strong one is needed depends on a hidden group (10 groups) that the
    embeddings show only faintly, and each outcome is one noisy draw: the group's rate is the signal."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 10, n)
    need = np.linspace(0.0, 0.9, 10)[group]  # P(strong right | weak wrong) per group
    weak = (rng.random(n) < 0.5).astype(np.float32)
    strong = np.maximum(weak, rng.random(n) < need).astype(np.float32)
    emb = rng.normal(size=(n, 64)).astype(np.float32)
    emb[np.arange(n), group] += 3.0  # the group shows, among noise the head can overfit
    split = np.where(np.arange(n) % 10 < 7, "train", np.where(np.arange(n) % 10 < 9, "val", "test"))
    prep = Prepared(name="t", models=["weak", "strong"], costs=[None, None], pair=(0, 1), prompts=[""] * n,
                    prompt_ids=[str(i) for i in range(n)], target=np.stack([weak, strong], 1),
                    mask=np.ones((n, 2), bool), split=split, teacher_emb=emb, data_hash="x", stats={})
    prep.group_columns = group_candidates({"topic": [f"g{g}" for g in group],
                                           "noise": [f"r{r}" for r in rng.integers(0, 10, n)],
                                           "row": list(range(n))}, split == "train")
    return prep


def test_candidates_are_categorical_columns_with_enough_prompts_per_value():
    prep = _prep()
    assert set(prep.group_columns) == {"topic", "noise"}  # "row" is unique per prompt


def test_an_informative_group_is_chosen_and_recorded(tmp_path):
    import torch

    torch.set_num_threads(1)
    prep = _prep(n=3000)
    cfg = load_config(overrides=["teacher.epochs=10", "teacher.head_hidden=256", "teacher.dropout=0", "train.patience=10"])
    split = prep.split.copy()
    _, resolved, record = choose_group_by(prep, cfg, tmp_path)
    assert record["group_by"] == "topic" and resolved.train.group_by == "topic"
    assert record["candidates"]["topic"] > record["candidates"][NO_GROUP]
    assert record.get("win_rate", {}).get("noise", 0.0) < 0.9  # noise never wins the bootstrap
    assert np.array_equal(prep.split, split)  # the folds leave the real split as it was
    # the chosen smoothing is what the student fits: train rows toward their topic's rate, others raw
    train = split == "train"
    assert not np.array_equal(prep.fit_target[train], prep.target[train])
    assert np.array_equal(prep.fit_target[~train], prep.target[~train])
    # and the teacher left in `prep` was fitted on it, on the real split (its validation quality beats none's)
    val = prep.rows("val")
    assert val_quality(prep, prep.teacher_prob[val], val) > 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"]  # the folds' heads are not kept


def test_a_better_group_that_loses_the_bootstrap_is_passed_over_and_the_line_says_why(tmp_path, capsys, monkeypatch):
    import pipeline.select as select

    prep = _prep(n=1500)
    prep.group_columns = {"topic": prep.group_columns["topic"]}
    monkeypatch.setattr(select, "bootstrap_win_rate", lambda *args: 0.5)  # as if the gain were noise
    cfg = load_config(overrides=["teacher.epochs=10", "teacher.dropout=0", "train.patience=10"])
    _, resolved, record = choose_group_by(prep, cfg, tmp_path)
    assert record["candidates"]["topic"] > record["candidates"][NO_GROUP]  # better out of fold...
    assert record["group_by"] is None and record["win_rate"] == {"topic": 0.5}  # ...but not kept
    line = " ".join(capsys.readouterr().err.split())
    assert "cross-validation: none" in line
    assert f"topic wins 50.0% of {select.BOOTSTRAP} paired resamples, under the 90% needed" in line


def test_without_a_categorical_column_nothing_is_cross_validated(tmp_path):
    prep = _prep(n=600)
    prep.group_columns = {}
    _, resolved, record = choose_group_by(prep, load_config(overrides=["teacher.epochs=2"]), tmp_path)
    assert record["group_by"] is None and resolved.train.group_by is None and record["candidates"] == {}
    assert np.array_equal(prep.fit_target, prep.target) and prep.teacher_prob.shape == prep.target.shape


def test_win_prediction_on_battles_is_evaluates_win_accuracy_ties_included():
    # The measure validation choices and tune studies maximise on pairwise data is the one `evaluate`
    # reports: tied battles left out, a prediction of exactly equal strengths earning half a battle.
    from pipeline.metrics import win_accuracy

    rng = np.random.default_rng(0)
    n, m = 300, 4
    battles = [np.column_stack([a := rng.integers(m, size=3), (a + rng.integers(1, m, size=3)) % m,
                                rng.choice([0.0, 0.5, 1.0], size=3)]).astype(np.float32) for _ in range(n)]
    p = rng.choice([0.2, 0.5, 0.7], size=(n, m))  # few values: many battles between equal strengths
    prep = Prepared(name="t", models=[f"m{j}" for j in range(m)], costs=[None] * m, pair=(0, 3), prompts=[""] * n,
                    prompt_ids=[str(i) for i in range(n)], target=np.full((n, m), 0.5, np.float32),
                    mask=np.ones((n, m), bool), split=np.array(["val"] * n), teacher_emb=np.zeros((n, 1)),
                    data_hash="x", stats={}, battles=battles)
    flat = np.concatenate(battles)
    owner = np.repeat(np.arange(n), 3)
    a, b = flat[:, 0].astype(int), flat[:, 1].astype(int)
    logit = np.log(p / (1 - p))
    p_a = 1 / (1 + np.exp(-(logit[owner, a] - logit[owner, b])))
    p_a[logit[owner, a] == logit[owner, b]] = 0.5
    assert (p_a == 0.5).sum() > 100
    assert abs(val_quality(prep, p, np.arange(n)) - win_accuracy(p_a, flat[:, 2])) < 1e-12
