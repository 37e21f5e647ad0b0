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
