"""Shared fixtures: an isolated data root, the CLI entry point, and a small demo set."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch):
    """Every test starts without MLFLOW_TRACKING_URI: mlflow.set_tracking_uri exports it, so one test's
    store (or a developer's team server) would otherwise become the next test's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """PREROUTER_DATA_DIR pointed at an empty folder of this test."""
    root = tmp_path / "data"
    monkeypatch.setenv("PREROUTER_DATA_DIR", str(root))
    return root


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `prerouter ARGS...` through the console entry point; returns (exit code, stdout + stderr)."""
    from pipeline.cli import main
    from pipeline.common import console

    monkeypatch.setattr(console, "_width", 400)  # no line wrapping inside messages under test

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["prerouter", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    """The demo set in its three layouts (600 prompts, seed 0), written once per test session."""
    from pipeline.demo import generate

    return generate(tmp_path_factory.mktemp("demo"), n_prompts=600, seed=0)


@pytest.fixture(scope="session")
def pair_bundle(tmp_path_factory):
    """(folder, graph weights) of a tiny two-model bundle (a random mean-pool graph), for tests that only read it."""
    from tests.fabricate import tiny_bundle

    return tiny_bundle(tmp_path_factory.mktemp("pair") / "bundle")


@pytest.fixture(scope="session")
def pair_router(pair_bundle):
    """`pair_bundle` loaded at fp32."""
    from pipeline.runtime import Router

    return Router.load(pair_bundle[0], quantized=False)


@pytest.fixture(scope="module")
def planted_bundles(tmp_path_factory, demo_files):
    """A labeled demo dataset, a held-out demo file and bag-of-tokens bundles of planted quality (`good`,
    `reversed`, `shuffled`, and `two`: a two-model one), for compare and the registry; built once per module."""
    from pipeline.demo import generate
    from pipeline.ingest import ingest
    from pipeline.label import label
    from tests.fabricate import bag_bundle, labeled_arrays

    tmp = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("PREROUTER_DATA_DIR", "data"), ("PREROUTER_MLRUNS_DIR", "mlruns"),
                         ("PREROUTER_MODELS_DIR", "models")):
            mp.setenv(var, str(tmp / sub))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ingest(str(demo_files["wide"]), name="demo")
        label("demo")
        prompts, target, mask, split, models, costs, data_hash = labeled_arrays("demo")
        train = split == "train"
        fit = ([p for p, t in zip(prompts, train) if t], target[train], mask[train])
        out = {"tmp": tmp, "held_out": generate(tmp / "heldout", n_prompts=400, seed=1)["wide"]}
        for kind, kwargs in (("good", {}), ("reversed", {"negate": True}), ("shuffled", {"shuffle": True})):
            out[kind] = bag_bundle(tmp / kind, *fit, models, costs, data_hash=data_hash, **kwargs)
        two = [0, 2]  # small-7b and large-70b only
        out["two"] = bag_bundle(tmp / "two", fit[0], fit[1][:, two], fit[2][:, two], [models[j] for j in two],
                                [costs[j] for j in two], data_hash=data_hash)
        yield out
