"""promote / pull round trip through a local SQLite MLflow registry, and models:/ URIs in compare."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def registry(planted_bundles, tmp_path, monkeypatch):
    """A fresh registry in this test's folder holding `good` as version 1 and `reversed` as version 2."""
    from pipeline.export import log_bundle

    tmp = planted_bundles["tmp"]
    monkeypatch.setenv("PREROUTER_DATA_DIR", str(tmp / "data"))
    monkeypatch.setenv("PREROUTER_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert log_bundle(planted_bundles["good"], {}, "demo") == "1"
    assert log_bundle(planted_bundles["reversed"], {}, "demo") == "2"
    return planted_bundles


def _seal(bundle: Path) -> str:
    return json.loads((Path(bundle) / "router.json").read_text())["bundle_sha256"]


def test_promote_moves_champion_and_keeps_the_previous_one(registry, cli, tmp_path):
    from mlflow import MlflowClient

    from pipeline.common import setup_mlflow

    assert cli("promote", "demo", "1")[0] == 0
    code, out = cli("promote", "demo", "2")
    assert code == 0 and "previous: version 1" in out
    setup_mlflow()
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("prerouter-demo", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("prerouter-demo", "previous").version) == "1"

    code, out = cli("pull", "demo", "--out", tmp_path / "now")
    assert code == 0, out
    assert _seal(tmp_path / "now") == _seal(registry["reversed"])
    code, out = cli("pull", "demo@previous", "--out", tmp_path / "before")
    assert code == 0, out
    assert _seal(tmp_path / "before") == _seal(registry["good"])

    # a bundle folder names its version by its seal: rolling back is promoting it again
    code, out = cli("promote", "demo", registry["good"])
    assert code == 0, out
    assert str(client.get_model_version_by_alias("prerouter-demo", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("prerouter-demo", "previous").version) == "2"

    from pipeline.runtime import Router

    assert Router.load(tmp_path / "now", verify=True).models == ["small-7b", "medium-34b", "large-70b"]


def test_compare_takes_registry_uris(registry, cli, tmp_path):
    cli("promote", "demo", "1")
    cli("promote", "demo", "2")
    code, out = cli("compare", "models:/prerouter-demo@previous", "models:/prerouter-demo@champion",
                    "--data", "demo", "--out", tmp_path, "--resamples", 200)
    assert code == 1, out  # version 2 (reversed) against version 1 (good)
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["bundles"]["champion"]["bundle_sha256"] == _seal(registry["good"])
    assert result["bundles"]["challenger"]["bundle_sha256"] == _seal(registry["reversed"])


def test_pull_refuses_a_tampered_version_and_leaves_nothing(registry, cli, tmp_path):
    from mlflow import MlflowClient

    from pipeline.common import setup_mlflow

    cli("promote", "demo", "1")
    setup_mlflow()
    source = MlflowClient().get_model_version("prerouter-demo", "1").source
    folder = Path(source.removeprefix("file://"))
    (folder / "model.int8.onnx").write_bytes((folder / "model.int8.onnx").read_bytes() + b"\0")
    code, out = cli("pull", "demo@champion", "--out", tmp_path / "pulled")
    assert code == 2 and "sha256 mismatch" in out
    assert not (tmp_path / "pulled").exists()


@pytest.mark.parametrize("spec, message", [("demo@nobody", "no alias 'nobody'"), ("demo@7", "no version 7"),
                                           ("a/b", "not a registered bundle reference")])
def test_pull_of_something_missing_is_bad_input(registry, cli, tmp_path, spec, message):
    code, out = cli("pull", spec, "--out", tmp_path / "x")
    assert code == 2 and message in out, out


def test_allow_missing_champion_promotes_the_first_challenger(registry, cli, tmp_path):
    code, out = cli("compare", "models:/prerouter-demo@champion", registry["good"], "--data", "demo",
                    "--allow-missing-champion", "--out", tmp_path)
    assert code == 0 and "does not exist yet" in out
    code, out = cli("compare", "models:/prerouter-demo@champion", registry["good"], "--data", "demo", "--out", tmp_path)
    assert code == 2 and "no alias 'champion'" in out
