"""calibrate: refitted thresholds hit their targets on shifted traffic; the bundle keeps its model and verifies."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.calibrate import score_reference, shift


def test_shift_is_zero_against_itself_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 5000)
    q = score_reference(x[:, None], ["m"], None)["quantiles"]["m"]
    same = shift(q, rng.normal(0, 1, 5000))
    moved = shift(q, rng.normal(0.5, 1, 5000))
    assert same["psi"] < 0.01 and same["ks"] < 0.03
    assert moved["psi"] > 0.2 and moved["ks"] == pytest.approx(0.19, abs=0.03)  # Φ(0.25) − Φ(−0.25)


def test_shift_from_deciles_only():
    """A bundle without a score reference: its thresholds are the pair score's deciles."""
    rng = np.random.default_rng(1)
    ref = rng.random(10000)
    levels = np.linspace(0.1, 0.9, 9)
    q = np.quantile(ref, levels)
    assert shift(q, rng.random(5000), levels)["psi"] < 0.01
    moved = shift(q, rng.random(5000) ** 2, levels)  # CDF √x: largest gap 0.25 at x = 0.25
    assert moved["ks"] == pytest.approx(0.25, abs=0.03) and moved["psi"] > 0.25


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_files):
    """A bag-of-tokens bundle fitted on the demo's train prompts, and traffic of another mix (math and code)."""
    import pandas as pd

    from pipeline.ingest import ingest
    from pipeline.label import label
    from tests.fabricate import bag_bundle, labeled_arrays

    tmp = tmp_path_factory.mktemp("calibrate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREROUTER_DATA_DIR", str(tmp / "data"))
        ingest(str(demo_files["wide"]), name="demo")
        label("demo")
        prompts, target, mask, split, models, costs, _ = labeled_arrays("demo")
        train = split == "train"
        fit = ([p for p, t in zip(prompts, train) if t], target[train], mask[train])
        bundle = bag_bundle(tmp / "bundle", *fit, models, costs)
        plain = bag_bundle(tmp / "plain", *fit, models, costs, reference=False)
    frame = pd.read_csv(demo_files["wide"])
    shifted = frame[frame.family.isin(["math", "code"])].prompt.tolist()
    traffic = tmp / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in shifted))
    return {"tmp": tmp, "bundle": bundle, "plain": plain, "traffic": traffic, "n": len(shifted)}


@pytest.fixture
def env(setup, monkeypatch, tmp_path):
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return setup


def _share(bundle: Path, prompts: list[str], target: float) -> float:
    from pipeline.routing import pair_score, threshold_curve, threshold_for
    from pipeline.runtime import Router

    router = Router.load(bundle)
    d = router.decision  # a pair recorded beside an N-model decision, too
    score = pair_score(router.scores(prompts), router.models.index(d["weak"]), router.models.index(d["strong"]))
    return float(np.mean(score >= threshold_for(threshold_curve(d["thresholds"]), target)))


def test_calibrate_on_shifted_traffic_hits_its_targets(env, cli, tmp_path):
    from pipeline.calibrate import read_prompts
    from pipeline.common import sha256_file
    from pipeline.runtime import Router

    out = tmp_path / "new"
    code, log = cli("calibrate", env["bundle"], "--prompts", env["traffic"], "--out", out)
    assert code == 0, log
    prompts = read_prompts(env["traffic"])
    before = _share(env["bundle"], prompts, 0.3)
    after = _share(out, prompts, 0.3)
    assert abs(before - 0.3) > 0.03  # the traffic really is another mix
    assert abs(after - 0.3) <= 0.02
    report = json.loads((tmp_path / "new.calibration" / "calibration.json").read_text())
    for key, t in report["thresholds"].items():
        assert abs(t["new_realised"] - float(key)) <= 0.02
    assert report["thresholds"]["0.3"]["old_realised"] == pytest.approx(before)
    for key, c in report["cost_lambdas"].items():
        assert c["new_cost"] <= float(key) + 1e-9 or c["new_lambda"] == max(x["new_lambda"] for x in
                                                                             report["cost_lambdas"].values())
    assert set(report["shift"]) == {"small-7b", "medium-34b", "large-70b", "pair_score"}
    assert report["shift"]["pair_score"]["psi"] > 0.1

    new, old = Router.load(out, verify=True), Router.load(env["bundle"])
    assert new.config["files"]["model.onnx"] == old.config["files"]["model.onnx"]  # same model
    assert new.config["files"]["model.int8.onnx"] == old.config["files"]["model.int8.onnx"]
    cal = new.config["calibration"]
    assert cal["sha256"] == sha256_file(env["traffic"]) and cal["n_prompts"] == env["n"]
    assert cal["previous_bundle_sha256"] == old.config["bundle_sha256"]
    assert new.decision["reference"]["n"] == env["n"]
    md = (tmp_path / "new.calibration" / "calibration.md").read_text()
    assert "PSI" in md and "KS" in md and "old realised on traffic" in md

    # calibrated again on the same traffic: no shift against its own reference, targets still met
    code, log = cli("calibrate", out, "--prompts", env["traffic"], "--out", out)
    assert code == 0, log
    again = json.loads((tmp_path / "new.calibration" / "calibration.json").read_text())
    assert all(s["psi"] < 0.01 and s["ks"] < 0.02 for s in again["shift"].values())
    assert Router.load(out).config["calibration"]["previous"]["sha256"] == cal["sha256"]


def test_a_bundle_without_a_score_reference_is_compared_to_its_thresholds(env, cli, tmp_path):
    code, log = cli("calibrate", env["plain"], "--prompts", env["traffic"], "--out", tmp_path / "b",
                    "--report", tmp_path / "r")
    assert code == 0, log
    report = json.loads((tmp_path / "r" / "calibration.json").read_text())
    assert list(report["shift"]) == ["pair_score"]
    assert "thresholds" in report["reference"]["source"]


def test_a_tampered_calibrated_bundle_does_not_verify(env, cli, tmp_path):
    from pipeline.runtime import Router

    out = tmp_path / "new"
    assert cli("calibrate", env["bundle"], "--prompts", env["traffic"], "--out", out)[0] == 0
    config = json.loads((out / "router.json").read_text())
    config["decision"]["thresholds"]["0.3"] = 0.0
    (out / "router.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="bundle_sha256 mismatch|thresholds"):
        Router.load(out)


def test_traffic_is_read_as_score_reads_its_input(env, tmp_path):
    import pandas as pd

    from pipeline.calibrate import read_prompts
    from pipeline.prompt_files import read_prompt_records

    prompts = read_prompts(env["traffic"])
    assert prompts == [r["prompt"] for r in read_prompt_records(env["traffic"])]
    pd.DataFrame({"prompt": prompts, "other": 1}).to_parquet(tmp_path / "t.parquet")
    pd.DataFrame({"prompt": prompts}).to_csv(tmp_path / "t.csv.gz", index=False)
    assert read_prompts(tmp_path / "t.parquet") == read_prompts(tmp_path / "t.csv.gz") == prompts


@pytest.mark.parametrize("content, message", [("", "calibration needs a sample"),
                                              ('{"text": "x"}\n', "exactly one of prompt (a string) or messages")])
def test_bad_traffic_is_bad_input(env, cli, tmp_path, content, message):
    traffic = tmp_path / "t.jsonl"
    traffic.write_text(content)
    code, log = cli("calibrate", env["bundle"], "--prompts", traffic, "--out", tmp_path / "b")
    assert code == 2 and message in log, log
    assert not (tmp_path / "b").exists()


def test_a_calibrated_bundle_ships_vectors_of_its_own_decisions(cli, tmp_path, monkeypatch):
    """conformance.jsonl records decisions at the bundle's settings: calibrate writes it again for the
    refitted thresholds (the source bundle's vectors would no longer match), listed and hashed."""
    from pipeline.runtime import Router

    from .tiny import read_conformance
    from .fabricate import tiny_bundle

    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "mlruns"))
    bundle, _ = tiny_bundle(tmp_path / "bundle")
    words = "prove sum integer essay poem Python sort graph France translate".split()
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"prompt": f"{words[i % 10]} {words[i * 7 % 10]} number {i}"}) + "\n"
                               for i in range(300)))
    out = tmp_path / "new"
    code, log = cli("calibrate", bundle, "--prompts", traffic, "--out", out)
    assert code == 0, log
    config = Router.load(out, verify=True).config
    assert config["conformance"]["file"] == "conformance.jsonl" and "conformance.jsonl" in config["files"]
    head, vectors = read_conformance(out)
    _, stale = read_conformance(bundle)
    prompts = [v["prompt"] for v in vectors]
    assert prompts == [v["prompt"] for v in stale] and head["n_prompts"] == len(prompts)
    for graph in ("int8", "fp32"):
        router = Router.load(out, quantized=graph == "int8")
        assert np.abs(router.scores(prompts, batch_size=1) - np.array([v["scores"][graph] for v in vectors])).max() <= 1e-6
        for i, setting in enumerate(head["settings"]):
            assert router.decide(prompts, **setting, batch_size=1) == [v["decisions"][graph][i] for v in vectors], setting
    # the thresholds moved enough that the source bundle's vectors no longer hold
    assert [v["decisions"]["int8"] for v in stale] != [v["decisions"]["int8"] for v in vectors]


def test_calibrating_a_bundle_without_costs_says_its_budgets_are_over_assumed_costs(setup, cli, tmp_path, monkeypatch):
    from tests.fabricate import bag_bundle, labeled_arrays

    monkeypatch.setenv("PREROUTER_DATA_DIR", str(setup["tmp"] / "data"))
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "mlruns"))
    prompts, target, mask, split, models, _, _ = labeled_arrays("demo")
    train = split == "train"
    bundle = bag_bundle(tmp_path / "unpriced", [p for p, t in zip(prompts, train) if t], target[train], mask[train],
                        models, [None] * len(models))
    code, log = cli("calibrate", bundle, "--prompts", setup["traffic"], "--out", tmp_path / "new")
    assert code == 0, log
    report = json.loads((tmp_path / "new.calibration" / "calibration.json").read_text())
    assert report["assumed_costs"] == models and report["cost_lambdas"]
    assert "use index + 1 in their place" in (tmp_path / "new.calibration" / "calibration.md").read_text()
    assert "over assumed costs" in log
    # the priced bundle of the other tests says nothing of the kind
    code, log = cli("calibrate", setup["bundle"], "--prompts", setup["traffic"], "--out", tmp_path / "priced")
    assert code == 0 and "assumed" not in log
    assert json.loads((tmp_path / "priced.calibration" / "calibration.json").read_text())["assumed_costs"] == []
