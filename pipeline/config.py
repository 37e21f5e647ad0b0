"""One validated configuration object: defaults < YAML file < `section.key=value` overrides.

Unknown keys, wrong types and impossible values fail here, before any work starts.
"""
from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .common import ConfigError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        # YAML reads yes/no/on/off/true as booleans, which pydantic would quietly turn into 1 or 0.
        annotation = cls.model_fields[info.field_name].annotation
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        if isinstance(value, bool) and annotation is not Any and bool not in kinds:
            raise ValueError(f"expected {' or '.join(getattr(k, '__name__', repr(k)) for k in kinds)}, not a boolean")
        return value


class LabelConfig(_Section):
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    score_range: Optional[tuple[float, float]] = None  # None: inferred (1-10 judges, 0-1, ...)
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0)  # binarise normalised scores
    relaxation: float = Field(0.0, ge=0.0, le=1.0)  # Hybrid-LLM t in P[q(weak) >= q(strong) - t]
    tiers: int = Field(2, ge=2)  # strength tiers for pairwise data (RouteLLM strong/weak)
    weak: Optional[str] = None  # routing pair; default: weakest and strongest model
    strong: Optional[str] = None

    @model_validator(mode="after")
    def _increasing_range(self):
        if self.score_range is not None and self.score_range[1] <= self.score_range[0]:
            raise ValueError(f"label.score_range must be increasing, got {list(self.score_range)}")
        return self


class TeacherConfig(_Section):
    path: Optional[str] = None  # local checkpoint dir or hub id; None: packaged all-MiniLM-L6-v2
    max_tokens: int = Field(256, ge=8, le=512)
    batch_size: int = Field(64, ge=1)  # embedding passes and head training
    head_hidden: int = Field(256, ge=1)
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # the head's own, so tuning the student leaves the teacher as is
    weight_decay: float = Field(0.01, ge=0.0)


class StudentConfig(_Section):
    family: Literal["static", "transformer"] = "static"
    dim: int = Field(256, ge=8, le=1024)  # static: embedding width; transformer: hidden size
    layers: int = Field(2, ge=1, le=12)  # transformer only
    heads: int = Field(4, ge=1, le=16)  # transformer only
    max_tokens: int = Field(128, ge=8, le=512)
    truncation: Literal["head_tail", "head"] = "head_tail"
    templates: bool = True  # shorten prefixes/suffixes shared by many train prompts before tokenizing
    head_fraction: float = Field(0.75, gt=0.0, le=1.0)  # share of max_tokens kept from the start
    hidden: int = Field(256, ge=8)  # MLP head width
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.family == "transformer" and self.dim % self.heads:
            raise ValueError(f"student.dim={self.dim} must be divisible by student.heads={self.heads}")
        return self


class TrainConfig(_Section):
    lr: float = Field(2e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    batch_size: int = Field(64, ge=1)
    max_epochs: int = Field(20, ge=1)
    patience: int = Field(3, ge=1)
    distill_weight: float = Field(0.5, ge=0.0, le=1.0)  # soft-target share of the label loss
    repr_weight: float = Field(0.1, ge=0.0)  # representation regression onto teacher embeddings
    contrast_weight: float = Field(0.0, ge=0.0)  # BCE on logit differences between models (see train.contrast_loss)
    # Per-prompt outcomes are single noisy draws; with a metadata column that groups prompts (MMLU's
    # `subject`), training targets move this share of the way to their group's train-split rate.
    # Only training reads the column: serving still sees the prompt alone.
    group_by: Optional[str] = "auto"  # "auto": chosen on validation among metadata columns (pipeline/select.py)
    group_smoothing: float = Field(0.6, ge=0.0, le=1.0)
    seed: int = 0
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    num_workers: int = Field(0, ge=0)
    limit_train_prompts: Optional[int] = Field(None, ge=1)  # for smoke runs


class ExportConfig(_Section):
    opset: int = Field(17, ge=17)
    parity_atol: float = Field(1e-4, gt=0)
    min_int8_agreement: float = Field(0.99, ge=0, le=1)
    max_int8_apgr_drop: float = Field(0.01, ge=0)
    budget_ms: float = Field(1.0, gt=0)
    latency_decisions: int = Field(1000, ge=10)


class TuneConfig(_Section):
    trials: int = Field(20, ge=0)
    timeout: Optional[float] = Field(None, gt=0)
    objective: Literal["quality", "pareto"] = "quality"
    pruner: Literal["median", "hyperband"] = "median"
    seed: int = 0
    space: dict[str, Any] = Field(default_factory=dict)  # narrows the search space, see tune.py


class Config(_Section):
    label: LabelConfig = Field(default_factory=LabelConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides (values parsed as YAML)."""
    tree: dict = copy.deepcopy(base or {})  # overrides below must not write into the caller's dict
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in loaded.items():  # a file section updates the base section, key by key
            if isinstance(values, dict) and isinstance(tree.get(section), dict):
                tree[section].update(values)
            else:
                tree[section] = values
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key; it must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({' '.join(str(e).split())})") from None
        _set_dotted(tree, key.strip(), value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"{loc}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err else ""))
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
