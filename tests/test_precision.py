"""train.precision: Lightning's precision string, validated against the accelerator; nets come back float32."""
from __future__ import annotations

import pytest
import torch

from pipeline.common import ConfigError
from pipeline.config import load_config

from .test_train import planted
from .tiny import make_tiny_teacher


@pytest.mark.parametrize("given, read", [("32-true", "32-true"), ("bf16-mixed", "bf16-mixed"), ("32", "32-true"),
                                         ("bf16", "bf16-mixed"), ("BF16-Mixed", "bf16-mixed")])
def test_precision_accepts_lightning_strings_and_aliases(given, read):
    assert load_config().train.precision == "32-true"
    assert load_config(overrides=[f"train.precision={given}"]).train.precision == read


@pytest.mark.parametrize("precision", ["16-mixed", "16", "16-true"])
def test_float16_on_cpu_is_a_one_line_config_error(precision):
    with pytest.raises(ConfigError, match=r"train.precision=16-(mixed|true) needs a GPU") as e:
        load_config(overrides=[f"train.precision={precision}"])
    assert "\n" not in str(e.value)
    gpu = load_config(overrides=[f"train.precision={precision}", "train.accelerator=gpu"])
    assert gpu.train.precision.startswith("16-")


def test_unknown_precision_names_the_choices():
    with pytest.raises(ConfigError, match=r"train.precision: .*32-true, bf16-mixed, 16-mixed.*'8-mixed'"):
        load_config(overrides=["train.precision=8-mixed"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_nets_trained_in_bf16_come_back_float32(precision, tmp_path, monkeypatch):
    """The Trainer gets the precision; whatever it trained in, the teacher head and the student that
    export reads are float32 (bf16 runs on CPU too, so this runs here)."""
    from pipeline.train import fit_student, fit_teacher, make_trainer, predict

    monkeypatch.setenv("PREROUTER_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    teacher = make_tiny_teacher(tmp_path / "teacher")
    cfg = load_config(overrides=[f"train.precision={precision}", "student.dim=16", "student.hidden=16",
                                 "student.max_tokens=16", "train.max_epochs=2", "teacher.epochs=2",
                                 f"teacher.path={teacher}"])
    trainer, _ = make_trainer(cfg, tmp_path / "probe")
    assert trainer.precision == precision
    prep = planted(120)
    head = fit_teacher(prep, cfg, tmp_path / "work")
    assert prep.teacher_prob.dtype == "float32" and all(p.dtype == torch.float32 for p in head.parameters())
    student, _ = fit_student(prep, cfg, tmp_path / "work")
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert predict(student, prep, cfg, prep.rows("test")).dtype == "float32"
