"""Tune search space: the config keys a trial draws, and how drawn values become a configuration.

`SPACE` below; `tune.space` in the config narrows or extends it, per dotted config key:
    a scalar               fixed value, not searched            student.family: static
    a list                 categorical choices                  train.batch_size: [32, 64]
                           ([low, high] narrows a numeric range of SPACE, keeping its scale)
    {low, high[, log]}     a numeric range (int when both ends are ints)
Any `section.key` of the config may be added; `student.layers` is searched for transformers only.
"""
from __future__ import annotations

from typing import Any

import optuna

from .common import ConfigError
from .config import Config, load_config

# The default search space, one entry per dotted config key (format in the module docstring).
SPACE: dict[str, Any] = {
    "train.lr": {"low": 1e-4, "high": 3e-2, "log": True},
    "train.weight_decay": {"low": 1e-5, "high": 1e-1, "log": True},
    "train.batch_size": [32, 64, 128],
    "train.max_epochs": {"low": 4, "high": 30},
    "train.distill_weight": {"low": 0.0, "high": 1.0},
    "student.dropout": {"low": 0.0, "high": 0.5},
    "student.family": ["static", "transformer"],
    "student.dim": [64, 128, 256],
    "student.layers": {"low": 1, "high": 4},
    "student.max_tokens": [64, 128, 256],
    "student.truncation": ["head_tail", "head"],
}
ONLY_WHEN = {"student.layers": ("student.family", "transformer")}  # searched only under this condition

FIXED_PER_STUDY = ("train.group_by", "train.group_smoothing")  # read once, when the study prepares the data


def search_space(cfg: Config) -> dict[str, dict]:
    """SPACE narrowed by `cfg.tune.space`: key -> {"fixed": v} | {"choices": [...]} | {"low", "high", "log"}."""
    space = {key: _normalise(key, spec, None) for key, spec in SPACE.items()}
    for key, spec in cfg.tune.space.items():
        if key.startswith("tune.") or "." not in key:
            raise ConfigError(f"tune.space key {key!r} must be a `section.key` of the config outside `tune`")
        if key in FIXED_PER_STUDY:
            raise ConfigError(f"tune.space key {key!r} is fixed for a study: it changes the targets the shared "
                              "teacher head fits; set it in the config instead")
        space[key] = _normalise(key, spec, space.get(key))
    for key, spec in space.items():  # every value must make a valid config on its own, before any trial runs
        for value in spec.get("choices") or [spec.get("fixed", spec.get("low")), spec.get("high")]:
            if value is not None:
                apply(cfg, {key: value})
    return space


def _normalise(key: str, spec: Any, default: dict | None) -> dict:
    if isinstance(spec, dict):
        if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
            raise ConfigError(f"tune.space.{key}: a range is {{low, high[, log]}}, got {spec!r}")
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise ConfigError(f"tune.space.{key}: need numbers low <= high, got {spec!r}")
        if log and low <= 0:
            raise ConfigError(f"tune.space.{key}: a log range needs low > 0, got {spec!r}")
        return {"low": low, "high": high, "log": log}
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"tune.space.{key}: empty list of choices")
        if default is not None and "low" in default and len(spec) == 2:  # narrows a numeric range
            return _normalise(key, {"low": spec[0], "high": spec[1], "log": default["log"]}, None)
        return {"choices": list(spec)} if len(spec) > 1 else {"fixed": spec[0]}
    return {"fixed": spec}


def suggest(trial: optuna.trial.BaseTrial, space: dict[str, dict], cfg: Config) -> dict[str, Any]:
    """Draw one configuration: dotted key -> value, fixed values included."""
    values: dict[str, Any] = {}
    for key, spec in space.items():
        if key in ONLY_WHEN:
            cond, wanted = ONLY_WHEN[key]
            if values.get(cond, _get(cfg, cond)) != wanted:
                continue
        if "fixed" in spec:
            values[key] = spec["fixed"]
        elif "choices" in spec:
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec["log"])
        else:
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])
    return values


def base_values(space: dict[str, dict], cfg: Config) -> dict[str, Any]:
    """The base configuration's values of the searched keys, where they lie inside the space."""
    values = {}
    for key, spec in space.items():
        value = _get(cfg, key)
        if value in spec.get("choices", ()) or ("low" in spec and spec["low"] <= value <= spec["high"]):
            values[key] = value
    return values


def apply(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with dotted-key values set, validated (a bad value is a ConfigError naming the key)."""
    tree = cfg.to_dict()
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"tune.space: unknown config key {key!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"tune.space: unknown config key {key!r}")
        node[leaf] = value
    return load_config(base=tree)


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
