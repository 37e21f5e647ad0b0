"""Tune stage: an Optuna search over the student's training hyperparameters and architecture.

    prerouter tune NAME --trials 20                      # validation APGR, pruned
    prerouter tune NAME --trials 20 --objective pareto   # validation APGR x p99 decision latency

The data are prepared and the teacher head is fitted once per process; each trial only distils a
student. Pruning (median or Hyperband, `tune.pruner`) reads the per-epoch validation APGR, or the
validation loss when the data have no weak/strong pair.

Search space. `SPACE` below; `tune.space` in the config narrows or extends it, per dotted config key:
    a scalar               fixed value, not searched            student.family: static
    a list                 categorical choices                  train.batch_size: [32, 64]
                           ([low, high] narrows a numeric range of SPACE, keeping its scale)
    {low, high[, log]}     a numeric range (int when both ends are ints)
Any `section.key` of the config may be added; `student.layers` is searched for transformers only.
Trial 0 of a new study is the base configuration (its values that lie inside the space). The chosen
trial is the best validation APGR among the trials that beat the base one in at least 90% of paired
bootstrap resamples of the validation prompts, else the base: differences of a few thousandths of
APGR on a thousand prompts are noise, and picking the top of 20 noisy scores would often pick a
worse router than the default.

Pareto mode. The second objective is the p99 of single int8 decisions (tokenization included, CPU
time of the deciding thread, steady when other processes share the machine) of the candidate
exported to ONNX, parity gate included. Optuna does not prune multi-objective studies. The chosen
trial is the best validation APGR on the front whose p99 is within `export.budget_ms`.

Budget and resuming. `--trials N` is the size of the whole study: trials that finished (complete or
pruned) in earlier or parallel processes count, so a rerun of the same command runs only the rest.
The study is stored (default: a journal file `mlruns/optuna/STUDY.journal`) and reopened by name.
A trial whose worker died is marked failed and does not count (how it is found depends on the
storage, see `tune_storage.py`).

Workers. Processes that run the same command with the same `--storage` share the study: on one
machine the default journal file is enough (a dead worker's trial: its pid is gone; not retried);
across machines pass an SQL URL (`--storage postgresql://user@host/db`): Optuna's heartbeat fails a
trial silent for `tune.grace_period` seconds and queues its configuration again, at most
`tune.max_retry` times. Every trial is a nested MLflow run under the study's
parent run. The last worker to finish writes the results: `models/NAME/tuned.yaml` (the chosen
configuration), plots and tables under `models/NAME/tune/`, and the retrained checkpoint
`models/NAME/checkpoint` of the chosen trial, ready for `prerouter export`.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from .common import ConfigError, console, mlruns_root, model_dir, sha256_json, write_json
from .config import Config, check_machine, load_config
from .tune_storage import StudyStorage, open_storage

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

LATENCY_DECISIONS = 300  # timed decisions per Pareto candidate (after 200 warm-up ones)
LATENCY_HOLDOUT = 512  # val prompts the candidate's export parity gate runs on
MAX_FAILURES = 3  # consecutive failed trials before the worker gives up
CONFIDENCE, BOOTSTRAP = 0.9, 1000  # a trial replaces the base one when it is better in 90% of val resamples


@dataclass
class TuneResult:
    config: Config  # the base configuration with the chosen trial's values applied
    study: optuna.Study
    best_params: dict  # dotted config key -> value (searched and fixed)
    best_value: float | list[float] | None  # quality: val APGR (or loss); pareto: [quality, p99 ms]
    best_trial: int | None
    out_dir: Path


# ----------------------------------------------------------------------------- search space

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


# ----------------------------------------------------------------------------- storage, workers, MLflow

def open_study(name: str, storage: str | None, study_name: str | None, directions: list[str],
               cfg: Config, n_trials: int) -> tuple[optuna.Study, StudyStorage, Path]:
    """Create or reopen the study; returns it, its storage (a journal file, or an SQL database with
    Optuna's heartbeat) and the local lock file that serialises its set-up."""
    study_name = study_name or f"prerouter-{name}-{'pareto' if len(directions) > 1 else 'quality'}"
    root = mlruns_root() / "optuna"
    root.mkdir(parents=True, exist_ok=True)
    store = open_storage(storage, root / f"{study_name}.journal", cfg.tune)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=store.backend, directions=directions,
                                sampler=_sampler(cfg.tune.seed, 0, n_trials), pruner=make_pruner(cfg),
                                load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {study_name!r} optimises {[d.name.lower() for d in study.directions]}, "
                          f"not {directions}: pass another --study-name")
    return study, store, root / f".{study_name}.lock"


def _sampler(seed: int, trial_number: int, n_trials: int) -> optuna.samplers.TPESampler:
    """TPE seeded by (seed, trial number): reproducible in one process, and parallel or resumed
    workers never replay each other's random draws (one shared seed would give them equal params).
    A third of the budget (2 to 10 trials) samples at random before TPE models the results."""
    state = int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=state, n_startup_trials=min(10, max(2, n_trials // 3)),
                                      constant_liar=True)


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    """Median: stop a trial below the median of earlier ones at the same epoch; Hyperband: successive halving."""
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=int(_epochs_high(cfg)),
                                              reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)


def _epochs_high(cfg: Config) -> int:
    spec = search_space(cfg).get("train.max_epochs", {})
    return max(spec.get("choices") or [spec.get("high", spec.get("fixed", cfg.train.max_epochs))])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine (study set-up, writing results)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fail_stale_trials(study: optuna.Study, store: StudyStorage) -> list[int]:
    """Mark RUNNING trials whose worker died as FAIL (and their MLflow runs as failed); returns their numbers.
    With an SQL storage Optuna also queues their configurations again (tune.max_retry)."""
    failed = store.fail_stale_trials(study)
    for t in failed:
        if t.user_attrs.get("mlflow_run_id"):
            _end_run(t.user_attrs["mlflow_run_id"], "FAIL")
    numbers = [t.number for t in failed]
    if numbers:
        again = f", to run again (a configuration at most {store.max_retry} more times)" if store.max_retry else ""
        console.print(f"[yellow]tune: trials {numbers} were left running by a stopped worker; marked failed{again}[/]")
    return numbers


def _parent_run(study: optuna.Study, experiment: str, settings: dict) -> str:
    """The study's MLflow run (created by its first worker, reused by the others and on resume)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except MlflowException:
            console.print(f"[yellow]tune: MLflow run {run_id} is not in this tracking store; starting a new one[/]")
    active = mlflow.active_run()
    tags = {"optuna.study": study.study_name, **({"mlflow.parentRunId": active.info.run_id} if active else {})}
    run_id = client.create_run(experiment, run_name=f"tune-{study.study_name}", tags=tags).info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in settings.items()])
    study.set_user_attr("mlflow_run_id", run_id)
    return run_id


def _end_run(run_id: str, state: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_tag(run_id, "optuna.state", state)
    client.set_terminated(run_id, "FAILED" if state == "FAIL" else "FINISHED")


# ----------------------------------------------------------------------------- one trial

def run_trial(trial: optuna.Trial, prep, cfg: Config, space: dict, pareto: bool, parent: str,
              experiment: str, teachers: dict) -> list[float]:
    """Distil one candidate student; returns [quality] or [quality, p99 ms]. Raises TrialPruned."""
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    from .train import fit_student, pair_score, predict, split_metrics

    values = suggest(trial, space, cfg)
    trial.set_user_attr("config", values)
    tcfg = apply(cfg, values)
    client = MlflowClient()
    run_id = client.create_run(experiment, run_name=f"trial-{trial.number}", tags={
        "mlflow.parentRunId": parent, "optuna.study": trial.study.study_name,
        "optuna.trial": str(trial.number)}).info.run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in values.items()])
    callbacks = []
    if not pareto:  # Optuna prunes single-objective studies only
        from optuna_integration import PyTorchLightningPruningCallback

        callbacks.append(PyTorchLightningPruningCallback(trial, "val_apgr" if prep.pair is not None else "val_loss"))
    state, t0 = "FAIL", time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="prerouter-trial-") as work:
            fit_teacher_once(prep, tcfg, teachers)
            logger = MLFlowLogger(run_id=run_id, tracking_uri=mlflow.get_tracking_uri())
            # Checkpointing and early stopping as in `prerouter train`, so the retrain reproduces the trial.
            net, _ = fit_student(prep, tcfg, Path(work), callbacks=callbacks, logger=logger)
            val = prep.rows("val")
            p_val = predict(net, prep, tcfg, val)
            metrics = {f"val_{k}": v for k, v in split_metrics(prep, p_val, val).items()
                       if isinstance(v, (int, float))}
            result = [metrics["val_apgr"] if prep.pair is not None else metrics["val_bce"]]
            if prep.pair is not None:  # per-prompt routing scores, for the noise check in `choose`
                trial.set_user_attr("val_scores", np.round(pair_score(p_val[_pair_rows(prep)], prep.pair), 6).tolist())
            if pareto:
                latency = candidate_latency(net, prep, tcfg, p_val, Path(work))
                metrics |= {"latency_p99_ms": latency["p99"], "latency_cpu_p99_ms": latency["cpu_p99"],
                            "latency_p50_ms": latency["p50"]}
                result.append(latency["cpu_p99"])
        metrics["seconds"] = time.perf_counter() - t0
        now = int(time.time() * 1000)  # per-epoch val_* curves keep their names; the result is `result.*`
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"result.{k}", float(v), now, 0)
                                          for k, v in metrics.items()])
        for k, v in metrics.items():
            trial.set_user_attr(k, float(v))
        state = "COMPLETE"
        return result
    except optuna.TrialPruned:
        state = "PRUNED"
        raise
    finally:
        _end_run(run_id, state)


def fit_teacher_once(prep, cfg: Config, fitted: dict) -> None:
    """Set `prep.teacher_prob` to the teacher head `prerouter train` fits under `cfg`. It reads only the
    teacher section and the seed, so one fit per worker serves every trial (`fitted`: settings -> outputs)."""
    from .train import fit_teacher

    t = cfg.train
    key = sha256_json([cfg.teacher.model_dump(), t.seed, t.patience, t.accelerator, str(t.devices), t.num_nodes,
                       t.strategy])
    if key not in fitted:
        with tempfile.TemporaryDirectory(prefix="prerouter-teacher-") as work:
            console.print(f"[bold]teacher[/] head on {prep.teacher_emb.shape[1]}-d embeddings")
            fit_teacher(prep, cfg, Path(work))
        fitted[key] = prep.teacher_prob
    prep.teacher_prob = fitted[key]


def candidate_latency(net, prep, cfg: Config, p_val: np.ndarray, work: Path) -> dict:
    """p50/p99 ms of single int8 decisions of the exported candidate (tokenization included, no gate)."""
    from .common import read_json
    from .export import export_module
    from .train import bundle_meta

    val = prep.rows("val")[:LATENCY_HOLDOUT]
    outcomes = np.where(prep.mask[val], prep.target[val], np.nan)
    export_cfg = cfg.export.model_copy(update={"latency_decisions": LATENCY_DECISIONS})
    bundle = export_module(net, bundle_meta(prep, cfg, p_val), work / "bundle", [prep.prompts[i] for i in val],
                           outcomes, export_cfg)
    return read_json(bundle / "router.json")["latency"]["overall"]


# ----------------------------------------------------------------------------- the study

def tune(name: str, cfg: Config | None = None, trials: int | None = None, timeout: float | None = None,
         storage: str | None = None, study_name: str | None = None, objective: str | None = None) -> TuneResult:
    """Run this worker's share of a `trials`-trial study, then (as the last worker) retrain the chosen trial."""
    from .common import setup_mlflow
    from .train import prepare

    cfg = cfg or load_config()
    trials = cfg.tune.trials if trials is None else trials
    timeout = cfg.tune.timeout if timeout is None else timeout
    objective = objective or cfg.tune.objective
    if objective not in ("quality", "pareto"):
        raise ConfigError(f"objective must be quality or pareto, got {objective!r}")
    if trials < 0:
        raise ConfigError(f"trials must be >= 0, got {trials}")
    pareto = objective == "pareto"
    check_machine(cfg.train)
    space = search_space(cfg)
    prep = prepare(name, cfg)
    if cfg.train.group_by == "auto":  # the trials fit the targets `prerouter train` would choose (select.py)
        from .select import choose_group_by

        with tempfile.TemporaryDirectory(prefix="prerouter-select-") as work:
            choose_group_by(prep, cfg, Path(work))  # leaves the chosen targets in prep.fit_target
    quality = "maximize" if prep.pair is not None else "minimize"  # val APGR, else val loss
    directions = [quality, "minimize"] if pareto else [quality]
    study, store, lock = open_study(name, storage, study_name, directions, cfg, trials)
    with _locked(lock):  # one parent MLflow run and one base trial per study, even when workers start together
        experiment = setup_mlflow()
        _check_same_inputs(study, prep.data_hash, cfg)
        if not study.trials:  # start from the base configuration: never worse on validation
            study.enqueue_trial(base_values(space, cfg), user_attrs={"base": True})
        else:
            fail_stale_trials(study, store)  # a base trial its killed worker left RUNNING is failed now, then rerun
            requeue_base(study, space, cfg)
        parent = _parent_run(study, experiment, {"dataset": name, "objective": objective, "trials": trials,
                                                 "pruner": cfg.tune.pruner, "seed": cfg.tune.seed,
                                                 "storage": store.label})
    console.print(f"[bold]tune[/] study {study.study_name}: {_count(study)} of {trials} trials done")
    # A rerun base trial takes the next slot; when every slot is taken, it gets one of its own.
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    waiting_base = any(t.user_attrs.get("base") for t in waiting)
    budget = max(trials, _count(study) + 1) if waiting_base and trials > 0 else trials
    if _count(study) < budget:
        _optimise(study, store, prep, cfg, space, pareto, budget, timeout, parent, experiment)
    with _locked(lock):
        return finish(name, study, cfg, pareto, prep, parent)


def requeue_base(study: optuna.Study, space: dict, cfg: Config) -> bool:
    """Enqueue the base configuration again when its trial failed (a worker killed during trial 0) and none
    is complete, running, waiting or pruned: without it `choose` has nothing to beat and the 90% bootstrap
    rule would be skipped. Gives up after MAX_FAILURES failed base trials (a base that cannot train)."""
    bases = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("base")]
    if not bases or any(t.state != TrialState.FAIL for t in bases):
        return False
    if len(bases) >= MAX_FAILURES:
        console.print(f"[yellow]tune: the base trial failed {len(bases)} times; not running it again, so no "
                      "trial is compared with the default configuration[/]")
        return False
    study.enqueue_trial(base_values(space, cfg), user_attrs={"base": True})
    console.print(f"[yellow]tune: the base trial {bases[-1].number} did not finish; running it again[/]")
    return True


def _optimise(study, store, prep, cfg, space, pareto, n_trials, timeout, parent, experiment) -> None:
    teachers: dict = {}
    deadline = time.monotonic() + timeout if timeout else math.inf
    failures = 0
    while time.monotonic() < deadline:
        fail_stale_trials(study, store)
        if _count(study, running=True) >= n_trials:
            break
        trial = store.ask(study)  # a WAITING trial first: the base one, or a dead worker's trial queued again
        study.sampler = _sampler(cfg.tune.seed, trial.number, n_trials)  # before the first suggest
        ahead = [t for t in study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state != TrialState.FAIL and t.state != TrialState.WAITING]
        if len(ahead) >= n_trials:  # another worker took the last slot between the check and ask()
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            break
        try:
            with store.heartbeat(trial):
                values = run_trial(trial, prep, cfg, space, pareto, parent, experiment, teachers)
        except optuna.TrialPruned as e:
            study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            console.print(f"trial {trial.number}: [yellow]pruned[/] ({e})")
            failures = 0
            continue
        except (Exception, KeyboardInterrupt) as e:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            if isinstance(e, KeyboardInterrupt):
                raise
            failures += 1
            console.print(f"[red]trial {trial.number} failed:[/] {type(e).__name__}: {e}")
            if failures >= MAX_FAILURES:
                raise
            continue
        study.tell(trial, values, skip_if_finished=True)
        failures = 0
        console.print(f"trial {trial.number}: " + ", ".join(f"{v:.4f}" for v in values))


def _count(study: optuna.Study, running: bool = False) -> int:
    states = (TrialState.COMPLETE, TrialState.PRUNED) + ((TrialState.RUNNING,) if running else ())
    return len(study.get_trials(deepcopy=False, states=states))


def _check_same_inputs(study: optuna.Study, data_hash: str, cfg: Config) -> None:
    """A study continues only on the labels and the training sections it started with (the `tune`
    and `export` sections may change: a narrower space, another latency budget)."""
    trained = {k: v for k, v in cfg.to_dict().items() if k not in ("tune", "export")}
    for key, value in {"data_hash": data_hash, "config_hash": sha256_json(trained)}.items():
        old = study.user_attrs.get(key)
        if old is None:
            study.set_user_attr(key, value)
        elif old != value:
            what = "labels" if key == "data_hash" else f"configuration ({', '.join(trained)} sections)"
            raise ConfigError(f"study {study.study_name!r} was started on other {what}; pass another "
                              "--study-name (or delete the study) to tune on these")


# ----------------------------------------------------------------------------- results

def choose(study: optuna.Study, pareto: bool, budget_ms: float, prep=None) -> optuna.trial.FrozenTrial | None:
    """Quality: the best trial that beats the base trial beyond validation noise, else the base trial
    (with `prep`, when the objective is APGR). Pareto: the best quality on the front whose p99 is
    within budget (the fastest front trial, with a warning, when none is)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    if pareto:
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
        front = study.best_trials
        within = [t for t in front if t.values[1] <= budget_ms]
        if within:
            return max(within, key=lambda t: sign * t.values[0])
        console.print(f"[yellow]tune: no candidate is within the {budget_ms:g} ms budget; choosing the fastest[/]")
        return min(front, key=lambda t: t.values[1])
    base = next((t for t in done if t.user_attrs.get("base")), None)
    if prep is None or prep.pair is None or base is None or "val_scores" not in base.user_attrs:
        return study.best_trial
    for t in sorted(done, key=lambda t: -t.value):
        if t.number == base.number:
            return base
        win = bootstrap_win_rate(prep, t.user_attrs["val_scores"], base.user_attrs["val_scores"])
        if win >= CONFIDENCE:
            return t
        console.print(f"[dim]tune: trial {t.number} (val APGR {t.value:.4f}) beats the base trial {base.number} "
                      f"({base.value:.4f}) in only {win:.0%} of bootstrap resamples[/]")
    return base


def _pair_rows(prep) -> np.ndarray:
    """Positions, within the val rows, of the prompts with both pair models observed."""
    weak, strong = prep.pair
    val = prep.rows("val")
    return np.flatnonzero(prep.mask[val, weak] & prep.mask[val, strong])


def bootstrap_win_rate(prep, scores: list[float], base_scores: list[float], seed: int = 0) -> float:
    """Share of paired bootstrap resamples of the val prompts where `scores` route with a higher APGR."""
    from .metrics import apgr

    rows = prep.rows("val")[_pair_rows(prep)]
    weak, strong = prep.target[rows, prep.pair[0]], prep.target[rows, prep.pair[1]]
    a, b = np.asarray(scores), np.asarray(base_scores)
    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(BOOTSTRAP):
        i = rng.integers(len(rows), size=len(rows))
        wins += apgr(a[i], weak[i], strong[i]) > apgr(b[i], weak[i], strong[i])
    return wins / BOOTSTRAP


def finish(name: str, study: optuna.Study, cfg: Config, pareto: bool, prep, parent: str) -> TuneResult:
    """Write tuned.yaml, tables and plots, log them to the study's run, retrain the chosen trial.

    Left to the last worker: while other trials still run, this only returns the best so far."""
    import mlflow
    from mlflow import MlflowClient

    from .train import train

    out = model_dir(name) / "tune"
    best = choose(study, pareto, cfg.export.budget_ms, prep)
    if best is None:
        console.print("[yellow]tune: no completed trial yet; the configuration is unchanged[/]")
        return TuneResult(cfg, study, {}, None, None, out)
    params = dict(best.user_attrs.get("config", best.params))
    tuned = apply(cfg, params)
    value = list(best.values) if pareto else best.value
    result = TuneResult(tuned, study, params, value, best.number, out)
    others = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if others:
        console.print(f"[dim]tune: {len(others)} trial(s) still running in other workers; the last one "
                      f"to finish writes the results[/]")
        return result
    out.mkdir(parents=True, exist_ok=True)
    (model_dir(name) / "tuned.yaml").write_text(yaml.safe_dump(tuned.to_dict(), sort_keys=False))
    files = write_tables(study, out, pareto, best, cfg.export.budget_ms)
    client = MlflowClient()
    client.log_metric(parent, "best_value", float(value[0] if pareto else value))
    for k, v in {"best_trial": best.number, **{f"best.{k}": v for k, v in params.items()}}.items():
        client.set_tag(parent, k, str(v))
    client.log_dict(parent, {"trial": best.number, "values": best.values, "config": params}, "best_params.json")
    for f in [*files, model_dir(name) / "tuned.yaml"]:
        client.log_artifact(parent, str(f), artifact_path="tune")
    _print_summary(study, best, params)
    console.print(f"[bold]retrain[/] trial {best.number}'s configuration into {model_dir(name) / 'checkpoint'}")
    # Training is deterministic, so a checkpoint with the same fingerprint already is this trial's model.
    with mlflow.start_run(run_id=parent, nested=mlflow.active_run() is not None):
        train(name, tuned, prep=prep)
    client.set_terminated(parent, "FINISHED")
    return result


def write_tables(study: optuna.Study, out: Path, pareto: bool, best, budget_ms: float) -> list[Path]:
    """trials.csv, history.png, importance.png (and pareto.md, pareto.png) under `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    files = [out / "trials.csv"]
    study.trials_dataframe().to_csv(files[0], index=False)
    target = (lambda t: t.values[0]) if pareto else None
    label = "val APGR" if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else "val loss"
    plots = {"history.png": lambda: vis.plot_optimization_history(study, target=target, target_name=label),
             "importance.png": lambda: vis.plot_param_importances(study, target=target, target_name=label)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is "experimental" in Optuna
        for fname, plot in plots.items():
            try:
                ax = plot()
            except (ValueError, RuntimeError) as e:  # e.g. importance when no parameter varied
                console.print(f"[dim]tune: no {fname}: {e}[/]")
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=100)
            plt.close(fig)
            files.append(out / fname)
    if pareto:
        files += write_front(study, out, best, budget_ms, label)
    write_json(out / "summary.json", {"study": study.study_name, "best_trial": best.number,
                                      "best_values": best.values, "config": best.user_attrs.get("config"),
                                      "states": _states(study)})
    return files + [out / "summary.json"]


def write_front(study: optuna.Study, out: Path, chosen, budget_ms: float, label: str) -> list[Path]:
    """The Pareto front as a Markdown table and a scatter plot (all trials, front, budget, chosen)."""
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    keys = ["student.family", "student.dim", "student.layers", "student.max_tokens", "student.truncation"]
    lines = [f"| trial | {label} | p99 ms (cpu) | p99 ms (wall) | " + " | ".join(k.split(".")[1] for k in keys)
             + " | |", "|" + "---|" * (len(keys) + 5)]
    for t in front:
        cfg = t.user_attrs.get("config", t.params)
        mark = "chosen" if t.number == chosen.number else ("" if t.values[1] <= budget_ms else "over budget")
        lines.append(f"| {t.number} | {t.values[0]:.4f} | {t.values[1]:.3f} | "
                     f"{t.user_attrs.get('latency_p99_ms', float('nan')):.3f} | "
                     + " | ".join(str(cfg.get(k, "")) for k in keys) + f" | {mark} |")
    (out / "pareto.md").write_text(f"# Pareto front of {study.study_name}\n\nBudget: p99 <= {budget_ms:g} ms "
                                   f"(single int8 decisions, tokenization included). {len(done)} completed "
                                   f"trials, {len(front)} on the front.\n\n" + "\n".join(lines) + "\n")
    with plt.style.context("default"):  # Optuna's plots switch the global style
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], c="0.7", label="trials")
        ax.plot([t.values[1] for t in front], [t.values[0] for t in front], "o-", c="tab:blue", label="Pareto front")
        ax.scatter([chosen.values[1]], [chosen.values[0]], marker="*", s=250, c="tab:red", zorder=3, label="chosen")
        ax.axvline(budget_ms, ls="--", c="tab:red", lw=1, label=f"budget {budget_ms:g} ms")
        ax.set_xlabel("p99 decision latency, ms (cpu)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=100)
        plt.close(fig)
    return [out / "pareto.md", out / "pareto.png"]


def _states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def _print_summary(study: optuna.Study, best, params: dict) -> None:
    from rich.table import Table

    table = Table(title=f"study {study.study_name}: " + ", ".join(f"{n} {s}" for s, n in _states(study).items()))
    for col in ("trial", "state", "value(s)", "epochs", "family", "dim", "max_tokens"):
        table.add_column(col, justify="right")
    for t in study.get_trials(deepcopy=False):
        cfg = t.user_attrs.get("config", t.params)
        vals = ", ".join(f"{v:.4f}" for v in t.values) if t.values else ""
        style = "bold green" if t.number == best.number else None
        table.add_row(str(t.number), t.state.name.lower(), vals, str(t.last_step + 1 if t.last_step is not None else ""),
                      str(cfg.get("student.family", "")), str(cfg.get("student.dim", "")),
                      str(cfg.get("student.max_tokens", "")), style=style)
    console.print(table)
    console.print(f"best: trial {best.number} " + " ".join(f"{k}={v}" for k, v in params.items()))
