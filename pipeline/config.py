"""One validated configuration object: defaults < YAML file < `section.key=value` overrides.

Unknown keys, wrong types and impossible values fail here, before any work starts.
"""
from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .common import ConfigError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1  # the hash split's shares: test, then validation of the rest


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
    test_fraction: float = Field(TEST_FRACTION, ge=0.0, lt=1.0)
    val_fraction: float = Field(VAL_FRACTION, ge=0.0, lt=1.0)
    score_range: Optional[tuple[float, float]] = None  # None: inferred (1-10 judges, 0-1, ...)
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0)  # binarise normalised scores
    relaxation: float = Field(0.0, ge=0.0, le=1.0)  # Hybrid-LLM t in P[q(weak) >= q(strong) - t]
    tiers: int = Field(2, ge=2)  # strength tiers for pairwise data (RouteLLM strong/weak)
    weak: Optional[str] = None  # routing pair; default: the strongest model and the weakest (with costs: cheapest)
    strong: Optional[str] = None

    @model_validator(mode="after")
    def _increasing_range(self):
        if self.score_range is not None and self.score_range[1] <= self.score_range[0]:
            raise ValueError(f"label.score_range must be increasing, got {list(self.score_range)}")
        return self


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


class TeacherConfig(_Section):
    path: Optional[str] = None  # local checkpoint dir or hub id; None: packaged all-MiniLM-L6-v2
    max_tokens: int = Field(256, ge=8, le=512)
    batch_size: int = Field(64, ge=1)  # embedding passes and head training
    # embedding passes; auto: cuda when available. When the training job is several processes on this kind
    # of device (train.accelerator / devices / num_nodes / strategy, e.g. ddp), the pass is spread over them
    # with Lightning's Trainer.predict, each rank writing its share to the cache (pipeline/teacher_predict.py)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the sentence embedding: "last", the last layer's mean pool; "layers", the mean of every layer's (unit length)
    pooling: Literal["last", "layers"] = "last"
    head_hidden: int = Field(256, ge=1)
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # the head's own, so tuning the student leaves the teacher as is
    weight_decay: float = Field(0.01, ge=0.0)

    @field_validator("path")
    @classmethod
    def _local_dir_or_hub_id(cls, value):
        """A folder here holding tokenizer.json, or something shaped like a hub id (org/name); a path-like
        value that does not exist is a typo, which would otherwise fail deep in training."""
        if value is None:
            return value
        if not value.strip():
            raise ValueError("empty; leave it out (null) for the packaged all-MiniLM-L6-v2")
        path = Path(value).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{value!r} is a file; give the checkpoint folder (with config.json and tokenizer.json)")
            if not (path / "tokenizer.json").is_file():
                raise ValueError(f"folder {value!r} has no tokenizer.json (the students use the teacher's tokenizer)")
            return value
        if not _HUB_ID.fullmatch(value) or value.endswith((".", "-")) or ".." in value:
            raise ValueError(f"{value!r} does not exist here and is not a hub id (org/name)")
        return value


# What Lightning accepts (lightning.pytorch's AcceleratorRegistry / StrategyRegistry; a test compares them).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_false",
              "ddp_find_unused_parameters_true", "ddp_spawn_find_unused_parameters_false",
              "ddp_spawn_find_unused_parameters_true", "ddp_fork_find_unused_parameters_false",
              "ddp_fork_find_unused_parameters_true", "ddp_notebook_find_unused_parameters_false",
              "ddp_notebook_find_unused_parameters_true", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
              "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
              "deepspeed_stage_3_offload_nvme", "fsdp", "fsdp_cpu_offload", "single_device", "single_xla",
              "xla_debug", "xla", "single_tpu")


def _device_ids(devices: Any) -> Optional[list[int]]:
    """train.devices as Lightning reads it: None for "auto" and -1 (all), else a count [n] or ids (a list
    or "0,2"); ValueError for anything else."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto" or text == "-1":
            return None
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"expected auto, -1, a count or a list of device ids, got {devices!r}")
        if len(parts) == 1:
            return _device_ids(int(parts[0]))
        return _unique_ids([int(p) for p in parts])
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices == -1:
            return None
        if devices < 1:
            raise ValueError(f"must be at least 1 (or -1 for all, or auto), got {devices}")
        return [devices]
    if isinstance(devices, (list, tuple)) and devices \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices):
        return _unique_ids(list(devices))
    raise ValueError(f"expected auto, -1, a count or a list of device ids, got {devices!r}")


def _unique_ids(ids: list[int]) -> list[int]:
    if len(set(ids)) != len(ids):
        raise ValueError(f"device ids listed twice: {ids}")
    return ["ids", *ids]  # marker: a list of ids, not a count


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
    # Students trained with different seeds whose logits are averaged inside one graph (encoders.Ensemble)
    members: int = Field(3, ge=1, le=8)

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
    contrast_weight: float = Field(0.0, ge=0.0)  # BCE on logit differences between models (see module.contrast_loss)
    # Per-prompt outcomes are single noisy draws; with a metadata column that groups prompts (MMLU's
    # `subject`), training targets move this share of the way to their group's train-split rate.
    # Only training reads the column: serving still sees the prompt alone.
    group_by: Optional[str] = "auto"  # "auto": chosen by cross-validation among metadata columns (pipeline/select.py)
    group_smoothing: float = Field(0.6, ge=0.0, le=1.0)
    # k-means rates of the nearest train prompts blended into the student's outputs, inside the graph;
    # true: tried on validation and kept only where it routes better (pipeline/prior.py)
    cluster_prior: bool = True
    seed: int = 0
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    num_workers: int = Field(0, ge=0)
    limit_train_prompts: Optional[int] = Field(None, ge=1)  # smoke runs, learning curves: a random N (label.training_split)
    # Lightning's precision: 32-true; on GPU bf16-mixed or 16-mixed (weights stay float32, the
    # exported ONNX is float32/int8 whatever was chosen); on CPU 32-true or bf16-mixed.
    precision: str = "32-true"

    @field_validator("precision", mode="before")
    @classmethod
    def _known_precision(cls, value):
        text = str(value).strip().lower()
        text = PRECISION_ALIASES.get(text, text)
        if text not in PRECISIONS:
            raise ValueError(f"must be one of {', '.join(PRECISIONS)} (or 32, 16, bf16, 64), got {value!r}")
        return text

    @field_validator("accelerator")
    @classmethod
    def _known_accelerator(cls, value):
        if value.strip().lower() not in ACCELERATORS:
            raise ValueError(f"must be one of {', '.join(ACCELERATORS)}, got {value!r}")
        return value.strip().lower()

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value):
        if value.strip().lower() not in STRATEGIES:
            raise ValueError(f"must be one of Lightning's strategies ({', '.join(STRATEGIES[:6])}, ... "
                             f"{STRATEGIES[-1]}), got {value!r}")
        return value.strip().lower()

    @field_validator("devices")
    @classmethod
    def _device_spec(cls, value):
        _device_ids(value)
        return value

    @model_validator(mode="after")
    def _cpu_devices_are_a_count(self):
        ids = _device_ids(self.devices)
        if self.accelerator == "cpu" and ids is not None and ids[0] == "ids":
            raise ValueError(f"train.devices={self.devices!r}: with train.accelerator=cpu devices is a number of "
                             "processes, not a list of device ids")
        if self.accelerator == "cpu" and ids is None and str(self.devices).strip() == "-1":
            raise ValueError("train.devices=-1 (all devices) needs a GPU accelerator; with cpu give a number")
        if self.accelerator == "cpu" and self.precision.startswith("16-"):
            raise ValueError(f"train.precision={self.precision} needs a GPU (train.accelerator=gpu); on cpu use "
                             "32-true or bf16-mixed")
        return self


def check_machine(cfg: "TrainConfig") -> None:
    """Fail with one line when this machine lacks what train.accelerator / train.devices ask for (a GPU,
    enough of them), or Lightning refuses train.strategy here (FSDP without a GPU, DeepSpeed not installed),
    before any data is read. Imports torch only for accelerators other than cpu/auto, Lightning only for a
    strategy other than auto."""
    _check_devices(cfg)
    if cfg.strategy != "auto":
        _check_strategy(cfg)


def _check_strategy(cfg: "TrainConfig") -> None:
    """Lightning's own checks of the hardware settings: the Trainer `train` would build is built (nothing
    is launched), and what it refuses becomes a ConfigError."""
    import logging

    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # "GPU available: ..." lines
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        pl.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                   precision=cfg.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
    except (MisconfigurationException, ValueError, ImportError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"train.strategy={cfg.strategy} with train.accelerator={cfg.accelerator}, "
                          f"devices={cfg.devices}: Lightning refuses it on this machine ({first})") from None
    finally:
        quiet.setLevel(level)


def _check_devices(cfg: "TrainConfig") -> None:
    accelerator = cfg.accelerator
    if accelerator in ("cpu", "auto"):
        return
    ids = _device_ids(cfg.devices)
    if accelerator in ("gpu", "cuda"):
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0:
            raise ConfigError(f"train.accelerator={accelerator} but this machine has no CUDA GPU "
                              "(torch.cuda.is_available() is false); use train.accelerator=cpu or auto")
        what = "CUDA GPU"
    elif accelerator == "mps":
        import torch

        have = 1 if torch.backends.mps.is_available() else 0
        if not have:
            raise ConfigError("train.accelerator=mps but MPS (Apple GPU) is not available here; use cpu or auto")
        what = "MPS device"
    else:  # tpu
        import importlib.util

        if importlib.util.find_spec("torch_xla") is None:
            raise ConfigError("train.accelerator=tpu needs torch_xla, which is not installed; use cpu or auto")
        return
    if ids is None:
        return
    wanted = ids[1:] if ids[0] == "ids" else None
    if wanted is None and ids[0] > have:
        raise ConfigError(f"train.devices={cfg.devices} but this machine has {have} {what}{'s' * (have != 1)}")
    if wanted is not None and max(wanted) >= have:
        raise ConfigError(f"train.devices={cfg.devices!r}: no device {max(wanted)} here "
                          f"({have} {what}{'s' * (have != 1)}, ids 0..{have - 1})")


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
    space: dict[str, Any] = Field(default_factory=dict)  # narrows the search space, see tune_space.py
    # SQL storages only (workers on several machines; see tune_storage.py): Optuna's heartbeat and retry
    heartbeat_interval: int = Field(60, ge=1)  # seconds between the heartbeats of a running trial
    grace_period: int = Field(120, ge=1)  # seconds without one before another worker fails the trial
    max_retry: int = Field(2, ge=0)  # times a failed trial's configuration is queued again

    @model_validator(mode="after")
    def _grace_outlasts_a_beat(self):
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"tune.grace_period ({self.grace_period} s) must be longer than "
                             f"tune.heartbeat_interval ({self.heartbeat_interval} s)")
        return self


class Config(_Section):
    label: LabelConfig = Field(default_factory=LabelConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


MAX_YAML_NODES = 10_000  # a configuration has about a hundred; aliases must not expand a file beyond this


def _yaml_load(text: str):
    """`yaml.safe_load`, refusing documents whose aliases expand them past MAX_YAML_NODES nodes ("billion
    laughs") or refer to themselves: the node graph is measured before anything is built, so it is fast."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError("YAML nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the document once every alias is replaced by a copy of its anchor, counted without copying."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("YAML alias refers to the node that contains it (a recursive document)")
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise ConfigError(f"YAML expands to more than {MAX_YAML_NODES:,} values through its aliases "
                                  "(&anchor / *alias); a configuration needs far fewer")
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


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
            loaded = _yaml_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
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
            value = _yaml_load(raw) if raw.strip() else None
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
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
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None
