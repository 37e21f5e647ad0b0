"""Training stage: masked loss, distillation, the Lightning fit, checkpoint round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.metrics import apgr
from pipeline.encoders import Ensemble, StaticRouter, TransformerRouter, build_student
from pipeline.data import Prepared, group_smoothed
from pipeline.module import masked_bce, pair_score
from pipeline.train import fit_student, fit_teacher, predict, split_metrics

from .tiny import make_tiny_teacher


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREROUTER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def planted(n: int = 300, seed: int = 0) -> Prepared:
    """Prompts whose keyword decides which of two models succeeds: a router must find the keyword."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n) < 0.5
    prompts = [("prove the theorem about primes " if h else "name the capital city of ") + f"case {i}"
               for i, h in enumerate(hard)]
    target = np.stack([np.where(hard, 0.0, 1.0), np.ones(n)], 1).astype(np.float32)  # weak fails hard ones
    split = np.array(["train"] * n, dtype=object)
    split[: n // 5] = "test"
    split[n // 5: n // 5 + n // 10] = "val"
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb[:, 0] += np.where(hard, 2.0, -2.0)
    return Prepared(name="planted", models=["weak", "strong"], costs=[1.0, 10.0], pair=(0, 1),
                    prompts=prompts, prompt_ids=[str(i) for i in range(n)], target=target,
                    mask=np.ones((n, 2), bool), split=split.astype(str), teacher_emb=emb, data_hash="x",
                    stats={})


def test_masked_bce_ignores_unobserved_targets():
    logits = torch.tensor([[0.0, 5.0], [0.0, -5.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    only_first = masked_bce(logits, target, torch.tensor([[True, False], [True, False]]))
    assert only_first.item() == pytest.approx(np.log(2), rel=1e-5)  # the wrong column-1 logits never count
    assert masked_bce(logits, target, torch.ones(2, 2, dtype=torch.bool)).item() > only_first.item()


def test_pair_score_orders_by_expected_gain():
    p = np.array([[0.9, 0.95], [0.2, 0.9], [0.5, 0.5]])
    s = pair_score(p, (0, 1))
    assert s.argmax() == 1 and s[2] == pytest.approx(0.5) and ((0 <= s) & (s <= 1)).all()


@pytest.mark.parametrize("family,members", [("static", 1), ("transformer", 1), ("static", 3)])
def test_students_map_tokens_to_one_logit_per_model(family, members, tiny_teacher, cache):
    cfg = load_config(overrides=[f"student.family={family}", "student.dim=32", "student.heads=2",
                                 "student.layers=1", "student.hidden=16", "student.max_tokens=16",
                                 f"student.members={members}", f"teacher.path={tiny_teacher}"])
    net = build_student(cfg.student, 30522, 3, str(tiny_teacher))
    one = StaticRouter if family == "static" else TransformerRouter
    if members == 1:
        assert isinstance(net, one)
    else:
        assert isinstance(net, Ensemble) and [type(m) for m in net.members] == [one] * members
        assert net.feature_dim == 3 * 32
    ids = torch.tensor([[101, 2054, 2003, 102, 0], [101, 7592, 102, 0, 0]])
    mask = (ids > 0).long()
    out = net.eval()(ids, mask)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    # padding must not change the decision: same prompt, more padding, same logits
    padded = torch.nn.functional.pad(ids[:1], (0, 4))
    assert torch.allclose(net(padded, (padded > 0).long()), out[:1], atol=1e-5)


def test_an_ensemble_serves_the_mean_of_its_members_logits_and_its_prior_sees_every_members_features():
    from pipeline.prior import ClusterPrior

    torch.manual_seed(0)
    members = [StaticRouter(2000, 16, 8, 3).eval() for _ in range(3)]
    net = Ensemble(members).eval()
    ids = torch.randint(5, 2000, (4, 12))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    with torch.no_grad():
        mean = torch.stack([m(ids, mask) for m in members]).mean(0)
        assert torch.allclose(net(ids, mask), mean, atol=1e-6)
        assert not torch.allclose(members[0](ids, mask), mean, atol=1e-3)  # the members differ
        h = net.features(ids, mask)
        assert h.shape == (4, 48) and torch.allclose(h[:, 16:32], members[1].features(ids, mask))
        # a cluster prior on the ensemble blends on its concatenated features; beta 1 serves the table alone
        table = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5]], np.float32)
        net.prior = ClusterPrior((h[:2] / h[:2].norm(dim=-1, keepdim=True)).numpy(), table, beta=1.0, temperature=0.01)
        p = torch.sigmoid(net(ids, mask)).numpy()
    assert np.allclose(p[:2], table, atol=1e-3)


def test_teacher_then_student_learn_a_planted_signal(tiny_teacher, cache):
    torch.set_num_threads(1)
    prep = planted()
    cfg = load_config(overrides=["student.dim=32", "student.hidden=32", "student.max_tokens=16",
                                 "train.max_epochs=15", "train.patience=5", "train.lr=0.01",
                                 "teacher.epochs=15", "teacher.lr=0.01", f"teacher.path={tiny_teacher}"])
    fit_teacher(prep, cfg, cache / "work")
    test = prep.rows("test")
    w, s = prep.target[test, 0], prep.target[test, 1]
    best = apgr(s - w, w, s)  # the oracle: 0.75 here, since half the prompts need the strong model
    teacher = split_metrics(prep, prep.teacher_prob[test], test)
    assert teacher["apgr"] > 0.95 * best  # the embedding carries the signal in dimension 0
    student, ckpt = fit_student(prep, cfg, cache / "work")
    assert ckpt.best_model_path
    p = predict(student, prep, cfg, test)
    assert p.shape == (len(test), 2)
    assert split_metrics(prep, p, test)["apgr"] > 0.95 * best  # the keyword decides; random would be ~0.5


def test_group_smoothing_moves_train_targets_to_their_groups_train_rate():
    groups = ["a"] * 40 + ["b"] * 40 + ["tiny"] * 2
    target = np.zeros((82, 2), np.float32)
    target[:30, 0] = 1.0  # group a: 30/40 on model 0 among all rows
    target[40:50, 0] = 1.0  # group b: 10/40
    target[80, 0] = 1.0  # tiny: 1/2
    mask = np.ones_like(target, bool)
    mask[:10, 0] = False  # unobserved entries count for nothing (their 1.0s above are not outcomes)
    train = np.ones(82, bool)
    train[[0, 79]] = False  # a test/val row keeps its raw target
    out = group_smoothed(target, mask, groups, train, weight=0.5, prior_count=10.0)
    overall = 31 / 71  # observed train ones (a: 20, b: 10, tiny: 1) over observed train entries (30 + 39 + 2)
    rate_a, rate_b = (20 + 10 * overall) / (30 + 10), (10 + 10 * overall) / (39 + 10)
    assert out[15, 0] == pytest.approx(0.5 * 1 + 0.5 * rate_a, abs=1e-6)
    assert out[35, 0] == pytest.approx(0.5 * rate_a, abs=1e-6)
    assert out[45, 0] == pytest.approx(0.5 + 0.5 * rate_b, abs=1e-6)
    tiny = (1 + 10 * overall) / (2 + 10)  # two prompts barely move their group off the overall rate
    assert out[81, 0] == pytest.approx(0.5 * tiny, abs=1e-6) and abs(tiny - overall) < 0.05
    assert out[0, 0] == target[0, 0] and out[79, 0] == target[79, 0]
    assert out[:, 1] == pytest.approx(np.zeros(82))  # model 1 never succeeds anywhere: nothing to smooth
    np.testing.assert_array_equal(group_smoothed(target, mask, groups, train, weight=0.0), target)


def test_prepare_smooths_by_a_metadata_column_and_names_the_columns_when_it_is_missing(
        tiny_teacher, data_dir, cache, demo_files):
    from pipeline.common import DataError
    from pipeline.ingest import ingest
    from pipeline.label import label
    from pipeline.data import prepare

    ingest(str(demo_files["wide"]), name="demo")
    label("demo")
    base = [f"teacher.path={tiny_teacher}"]
    raw = prepare("demo", load_config(overrides=base))
    assert raw.fit_target is raw.target
    smooth = prepare("demo", load_config(overrides=base + ["train.group_by=family"]))
    train = smooth.split == "train"
    np.testing.assert_array_equal(smooth.fit_target[~train], smooth.target[~train])
    moved = np.abs(smooth.fit_target[train] - smooth.target[train])[smooth.mask[train]]
    assert (moved > 0.01).mean() > 0.9 and moved.max() <= 0.6 + 1e-6  # default weight 0.6, outcomes 0/1
    np.testing.assert_array_equal(smooth.target, raw.target)  # evaluation still reads the raw outcomes
    with pytest.raises(DataError, match=r"train.group_by='subject'.*metadata columns: sample_id, family\)"):
        prepare("demo", load_config(overrides=base + ["train.group_by=subject"]))


def test_pairwise_data_has_no_group_smoothing_to_choose(tiny_teacher, data_dir, cache, demo_files, tmp_path):
    # Its nets fit the battles, which smoothed outcome targets never reach: no candidates, no folds, and a
    # forced column is a config error instead of a setting that silently does nothing.
    from pipeline.common import ConfigError
    from pipeline.data import prepare
    from pipeline.ingest import ingest
    from pipeline.label import label
    from pipeline.select import choose_group_by

    ingest(str(demo_files["pairwise"]), name="battles")
    label("battles")
    base = [f"teacher.path={tiny_teacher}", "teacher.epochs=2"]
    prep = prepare("battles", load_config(overrides=base))
    assert prep.battles is not None and prep.group_columns == {}
    _, resolved, record = choose_group_by(prep, load_config(overrides=base), tmp_path / "work")
    assert record["rule"].startswith("pairwise data") and record["group_by"] is None
    assert resolved.train.group_by is None and [p.name for p in (tmp_path / "work").iterdir()] == ["teacher"]
    with pytest.raises(ConfigError, match=r"train.group_by='family'.*pairwise data"):
        prepare("battles", load_config(overrides=base + ["train.group_by=family"]))


def test_contrast_loss_is_lowest_at_the_true_differences():
    import torch

    from pipeline.module import contrast_loss, outcome_pairs

    target = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.tensor([[True, True, False]])
    pt, pw = outcome_pairs(target, mask)
    assert pw.tolist() == [[[0, 1, 0], [1, 0, 0], [0, 0, 0]]]  # only the observed pair, both ways
    assert pt[0, 0, 1].item() == 1.0 and pt[0, 1, 0].item() == 0.0
    right = contrast_loss(torch.tensor([[4.0, -4.0, 0.0]]), pt, pw)
    wrong = contrast_loss(torch.tensor([[-4.0, 4.0, 0.0]]), pt, pw)
    level = contrast_loss(torch.tensor([[9.0, 1.0, -50.0]]), pt, pw)  # unobserved model 2 is free
    assert right < 0.05 < wrong and abs(level.item() - contrast_loss(torch.tensor([[4.0, -4.0, 7.0]]), pt, pw).item()) < 1e-6


def test_battles_collate_into_pair_targets():
    from pipeline.data import collate

    battles = np.array([[0, 1, 1.0], [0, 1, 0.5], [2, 0, 0.0]], dtype=np.float32)
    item = {"target": np.zeros(3, np.float32), "mask": np.ones(3, bool), "emb": np.zeros(2, np.float32),
            "battles": battles}
    batch = collate([item])
    pt, pw = batch["pair_target"][0], batch["pair_weight"][0]
    assert pt[0, 1].item() == 0.75 and pt[1, 0].item() == 0.25  # two battles averaged
    assert pt[0, 2].item() == 1.0 and pt[2, 0].item() == 0.0
    assert pw.sum().item() == 4 and pw[1, 2].item() == 0


def test_decision_rules_report_strong_shares_that_ties_make_unreachable():
    from pipeline.data import Prepared
    from pipeline.train import decision_rules

    n = 200
    prep = Prepared(name="t", models=["weak", "strong"], costs=[None, None], pair=(0, 1), prompts=[""] * n,
                    prompt_ids=[str(i) for i in range(n)], target=np.zeros((n, 2), np.float32),
                    mask=np.ones((n, 2), bool), split=np.array(["val"] * n), teacher_emb=np.zeros((n, 2), np.float32),
                    data_hash="x", stats={})
    p = np.zeros((n, 2))
    p[:, 1] = np.linspace(0, 1, n)
    assert "unreachable_fractions" not in decision_rules(prep, p)
    p[: int(0.7 * n), 1] = 0.5  # 70% of prompts tie: shares between 30% and 100% collapse onto the tie
    missed = decision_rules(prep, p)["unreachable_fractions"]
    assert {"0.5", "0.6"} <= set(missed) and "0.1" not in missed and "0.2" not in missed
    assert all(v == 1.0 for v in missed.values())  # the tied score sends every prompt to strong


def test_without_known_costs_the_served_n_model_decision_is_the_quality_argmax():
    """Costs unknown for every model: the cost λs are over assumed index + 1 costs, so the default λ is 0 and
    the runtime's default decision is the argmax that `evaluate` scores as the routed outcome."""
    from pipeline import routing
    from pipeline.data import Prepared
    from pipeline.multi import pick
    from pipeline.train import decision_rules

    n, m = 300, 4
    rng = np.random.default_rng(0)
    p = rng.random((n, m))
    p[:, m - 1] += 0.3  # the last column (dearest under index + 1) is usually best

    def prep(costs):
        return Prepared(name="t", models=[f"m{j}" for j in range(m)], costs=costs, pair=None, prompts=[""] * n,
                        prompt_ids=[str(i) for i in range(n)], target=np.zeros((n, m), np.float32),
                        mask=np.ones((n, m), bool), split=np.array(["val"] * n),
                        teacher_emb=np.zeros((n, 2), np.float32), data_hash="x", stats={})

    rules = decision_rules(prep([None] * m), p)
    assert rules["costs_assumed"] and rules["cost_lambdas"]["0.5"] > 0  # a budget would move the decision
    lam = routing.default_cost_weight(rules)
    assert lam == 0.0
    served = routing.choose(p, routing.relative_costs(routing.fill_unknown_costs([None] * m)), lam)
    np.testing.assert_array_equal(served, pick(p, np.ones((n, m), bool)))
    # with real costs the default stays the calibrated budget-0.5 λ
    priced = decision_rules(prep([1.0, 2.0, 3.0, 4.0]), p)
    assert "default_cost_weight" not in priced and routing.default_cost_weight(priced) > 0


def _layout(kind: str, n: int = 240, seed: int = 0) -> Prepared:
    """Random data of one layout: a weak/strong pair, 3 models with unobserved outcomes, or battles
    (several per prompt, ties among them)."""
    rng = np.random.default_rng(seed)
    m = 2 if kind == "pair" else 3
    target = (rng.random((n, m)) < rng.random(m)).astype(np.float32)
    mask = np.ones((n, m), bool) if kind == "pair" else rng.random((n, m)) < 0.8
    battles = None
    if kind == "battles":
        battles = []
        for _ in range(n):
            a = rng.integers(m, size=3)
            b = (a + rng.integers(1, m, size=3)) % m
            battles.append(np.column_stack([a, b, rng.choice([0.0, 0.5, 1.0], size=3)]).astype(np.float32))
        target, mask = np.full((n, m), 0.5, np.float32), np.ones((n, m), bool)
    split = rng.choice(["train", "val"], size=n, p=[0.5, 0.5])
    return Prepared(name=kind, models=[f"m{j}" for j in range(m)], costs=[None] * m, pair=(0, m - 1),
                    prompts=[""] * n, prompt_ids=[str(i) for i in range(n)], target=target, mask=mask,
                    split=split, teacher_emb=rng.normal(size=(n, 8)).astype(np.float32), data_hash="x",
                    stats={}, battles=battles)


@pytest.mark.parametrize("kind", ["pair", "models", "battles"])
def test_the_validation_quality_logged_each_epoch_is_the_pipelines_routing_measure(kind, tmp_path):
    """Tune prunes on the per-epoch `val_quality` and chooses on `select.val_quality`: one measure."""
    from pipeline.data import RouterData
    from pipeline.encoders import EmbeddingRouter
    from pipeline.module import RouterModule
    from pipeline.select import val_quality
    from pipeline.train import make_trainer

    torch.manual_seed(0)
    prep = _layout(kind)
    net = EmbeddingRouter(8, 16, len(prep.models), 0.0)
    module = RouterModule(net, 0.01, 0.0, pair=prep.pair, uses_tokens=False)
    trainer, _ = make_trainer(load_config(), tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=RouterData(prep, 32))  # the last validation saw the final weights
    val = prep.rows("val")
    with torch.no_grad():
        p = torch.sigmoid(net.eval()(torch.from_numpy(prep.teacher_emb[val]))).numpy()
    expected = val_quality(prep, p, val)
    assert 0.0 < expected < 1.0
    assert trainer.callback_metrics["val_quality"].item() == pytest.approx(expected, abs=1e-6)
