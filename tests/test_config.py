"""Configuration errors: unknown keys, wrong types, impossible values and broken YAML files are
reported by `load_config` and by every command that takes a config, naming the key, before any work."""
from __future__ import annotations

import pytest

from pipeline.common import ConfigError
from pipeline.config import DEFAULT_CONFIG, load_config


def error_of(*overrides: str, path=None, base=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides), base=base)
    return str(e.value)


def test_defaults_are_the_shipped_yaml_and_valid_values_load():
    assert load_config().to_dict() == load_config(DEFAULT_CONFIG).to_dict()
    cfg = load_config(None, ["train.lr=1e-3", "student.family=transformer", "student.dim=64", "student.heads=4",
                             "label.score_range=[1, 10]", "label.weak=a", "label.strong=b", "train.devices=auto"])
    assert cfg.train.lr == 0.001 and cfg.student.dim == 64 and cfg.label.score_range == (1.0, 10.0)
    assert cfg.train.devices == "auto"
    # static students have no attention heads: any dim goes
    assert load_config(None, ["student.dim=100", "student.heads=3"]).student.dim == 100


@pytest.mark.parametrize("override, key, why", [
    ("label.bogus=1", "label.bogus", "Extra inputs are not permitted"),
    ("bogus.x=1", "bogus", "Extra inputs are not permitted"),
    ("train.lr=abc", "train.lr", "valid number"),
    ("train.lr=yes", "train.lr", "not a boolean"),  # YAML's yes is True, which must not become 1.0
    ("train.max_epochs=true", "train.max_epochs", "not a boolean"),
    ("train.max_epochs=2.5", "train.max_epochs", "fractional part"),
    ("train.accelerator=5", "train.accelerator", "valid string"),
    ("train=5", "train", "valid dictionary"),
    ("train.lr.x=1", "train.lr", "valid number"),
    ("train.lr=-1", "train.lr", "greater than 0"),
    ("train.lr=0", "train.lr", "greater than 0"),
    ("train.max_epochs=0", "train.max_epochs", "greater than or equal to 1"),
    ("label.test_fraction=1", "label.test_fraction", "less than 1"),
    ("label.val_fraction=1.5", "label.val_fraction", "less than 1"),
    ("student.dropout=1", "student.dropout", "less than 1"),
    ("student.family=lstm", "student.family", "'static' or 'transformer'"),
    ("teacher.max_tokens=4", "teacher.max_tokens", "greater than or equal to 8"),
    ("label.score_range=[10, 1]", "label.score_range", "must be increasing"),
    ("label.threshold=1.5", "label.threshold", "less than or equal to 1"),
])
def test_bad_values_are_reported_with_their_key(override, key, why):
    message = error_of(override)
    assert f"{key}:" in message or f"{key} " in message, message
    assert why in message, message


def test_heads_must_divide_dim_for_transformer_students():
    message = error_of("student.family=transformer", "student.dim=100", "student.heads=3")
    assert "student.dim=100 must be divisible by student.heads=3" in message


def test_every_error_is_reported_at_once():
    message = error_of("train.lr=-1", "train.max_epochs=0", "label.bogus=1")
    assert "train.lr:" in message and "train.max_epochs:" in message and "label.bogus:" in message


@pytest.mark.parametrize("override, why", [
    ("train.lr", "must look like section.key=value"),
    ("=1", "empty key"),
    ("train..lr=1", "empty key"),
    ("train.lr=[1", "not valid YAML"),
])
def test_malformed_overrides(override, why):
    message = error_of(override)
    assert repr(override) in message and why in message, message


@pytest.mark.parametrize("text, why", [
    (b"- 1\n- 2\n", "top level must be a mapping of sections"),
    (b"train:\n\tlr: 1\n", "not valid YAML"),
    (b"train: [1\n", "not valid YAML"),
    (b"train:\n  lr: \xff\n", "not valid YAML"),  # not UTF-8
])
def test_broken_yaml_files_name_the_file(tmp_path, text, why):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text)
    message = error_of(path=path)
    assert str(path) in message and why in message, message


def test_yaml_file_values_are_checked_like_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: -1\n  colour: blue\nstudent: 3\n")
    message = error_of(path=path)
    assert "train.lr:" in message and "train.colour:" in message and "student:" in message


def test_missing_config_file(tmp_path):
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in error_of(path=tmp_path / "nope.yaml")
    assert "config file not found" in error_of(path=tmp_path)  # a folder is not a file


def test_layers_defaults_then_base_then_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  max_epochs: 4\n  seed: 1\n")
    base = {"train": {"lr": 0.1, "seed": 9}}
    cfg = load_config(path, ["train.seed=3"], base=base)
    assert (cfg.train.lr, cfg.train.max_epochs, cfg.train.seed, cfg.train.batch_size) == (0.1, 4, 3, 64)
    assert base == {"train": {"lr": 0.1, "seed": 9}}  # the caller's dict is left alone
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml").to_dict() == load_config().to_dict()


# --- the CLI: exit 2 on the config, before the stage looks at any data ---------------------------


@pytest.mark.parametrize("command", ["label", "train", "export", "tune"])
def test_cli_fails_on_the_config_before_the_missing_data(command, data_dir, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("PREROUTER_MODELS_DIR", str(tmp_path / "models"))
    code, out = cli(command, "nothing-here", "--set", "train.lr=-1", "-s", "label.bogus=1")
    assert code == 2, out
    assert "train.lr:" in out and "label.bogus:" in out and "nothing-here" not in out, out
    assert "Traceback" not in out
    assert not data_dir.exists() and not (tmp_path / "models").exists()


def test_cli_label_without_config_errors_reaches_the_data(data_dir, cli):
    # the control for the test above: with a valid config the same command fails on the data
    code, out = cli("label", "nothing-here", "-s", "label.test_fraction=0.3")
    assert code == 2 and "no ingested dataset 'nothing-here'" in out, out


def test_cli_run_checks_the_config_before_ingesting(data_dir, tmp_path, monkeypatch, demo_files, cli):
    monkeypatch.setenv("PREROUTER_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "mlruns"))
    code, out = cli("run", demo_files["wide"], "--set", "student.family=lstm")
    assert code == 2 and "student.family:" in out, out
    assert not data_dir.exists() and not (tmp_path / "models").exists() and not (tmp_path / "mlruns").exists()


def test_cli_run_refuses_an_out_dir_that_is_not_a_bundle_before_any_work(data_dir, tmp_path, monkeypatch,
                                                                         demo_files, cli):
    # The bundle write swaps the whole folder: pointed at a model folder, it would delete its checkpoint.
    monkeypatch.setenv("PREROUTER_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "mlruns"))
    keep = tmp_path / "models" / "mine" / "checkpoint" / "best.ckpt"
    keep.parent.mkdir(parents=True)
    keep.write_text("weights")
    code, out = cli("run", demo_files["wide"], "--out", tmp_path / "models" / "mine")
    assert code == 2 and "is not a prerouter bundle" in out and "--out" in out, out
    assert keep.read_text() == "weights" and not data_dir.exists() and not (tmp_path / "mlruns").exists()
    (tmp_path / "models" / "mine" / "router.json").write_text("{}")  # an earlier bundle may be replaced
    from pipeline.export import check_bundle_dir

    assert check_bundle_dir(tmp_path / "models" / "mine") == tmp_path / "models" / "mine"


@pytest.mark.parametrize("text, why", [
    (None, "config file not found: {path}"),
    ("train: [1\n", "{path}: not valid YAML"),
    ("label:\n  bogus: 1\n", "label.bogus: Extra inputs are not permitted"),
])
def test_cli_reports_yaml_file_errors(text, why, data_dir, tmp_path, cli):
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    code, out = cli("label", "nothing-here", "--config", path)
    assert code == 2 and why.format(path=path) in out, out
    assert not data_dir.exists()


def test_the_shipped_mmlu_config_loads_over_the_defaults():
    cfg = load_config(DEFAULT_CONFIG.parent / "mmlu.yaml")
    assert cfg.train.group_by == "subject" and cfg.train.distill_weight == 0.8  # what bench-quality trains MMLU with
    assert cfg.student == load_config().student  # the rest stays default
