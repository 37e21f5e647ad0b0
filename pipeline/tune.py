"""Tune stage: an Optuna search over the student's training hyperparameters and architecture.

    prerouter tune NAME --trials 20                      # validation routing quality, pruned
    prerouter tune NAME --trials 20 --objective pareto   # validation routing quality x p99 decision latency

The objective is the data's routing measure on the validation split, the one the pipeline's own choices
use (`select.val_quality`): the pair's APGR for two models, the mean outcome of each prompt's argmax model
for more, the share of battles whose winner the strengths predict for pairwise data. The data are
prepared and the teacher head is fitted once per process; each trial only distils a student. Pruning
(median or Hyperband, `tune.pruner`) reads the same measure after every epoch (`val_quality`).

Search space: `SPACE` in `tune_space.py`, narrowed or extended per config key by `tune.space`.
Trial 0 of a new study is the base configuration (its values that lie inside the space); another trial
is chosen over it only when it routes validation better in at least 90% of paired bootstrap resamples
(`tune_results.py`).

Pareto mode. The second objective is the p99 of single int8 decisions (tokenization included, CPU
time of the deciding thread, steady when other processes share the machine) of the candidate
exported to ONNX, parity gate included. Optuna does not prune multi-objective studies. The chosen
trial is the best validation quality on the front whose p99 is within `export.budget_ms`.

Budget and resuming. `--trials N` is the size of the whole study: trials that finished (complete or
pruned) in earlier or parallel processes count, so a rerun of the same command runs only the rest.
The study is stored (default: a journal file `mlruns/optuna/STUDY.journal`) and reopened by name.
A trial whose worker died is marked failed and does not count (how it is found depends on the
storage, see `tune_storage.py`).

Workers. Processes that run the same command with the same `--storage` share the study: on one
machine the default journal file is enough (a dead worker's trial: its pid is gone; not retried);
across machines pass an SQL URL (`--storage postgresql://user@host/db`): Optuna's heartbeat fails a
trial silent for `tune.grace_period` seconds and queues its configuration again, at most
`tune.max_retry` times. Every trial is a nested MLflow run under the study's parent run. The last
worker to finish writes the results (`tune_results.py`): `models/NAME/tuned.yaml` (the chosen
configuration), plots and tables under `models/NAME/tune/`, and the retrained checkpoint
`models/NAME/checkpoint` of the chosen trial, ready for `prerouter export`.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import optuna
from optuna.trial import TrialState

from .common import ConfigError, console, mlruns_root, sha256_json
from .config import Config, check_machine, load_config
from .select import measure_name
from .tune_results import TuneResult, finish
from .tune_space import apply, base_values, search_space, suggest
from .tune_storage import StudyStorage, open_storage

LATENCY_DECISIONS = 300  # timed decisions per Pareto candidate (after 200 warm-up ones)
LATENCY_HOLDOUT = 512  # val prompts the candidate's export parity gate runs on
MAX_FAILURES = 3  # consecutive failed trials before the worker gives up


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

    from .select import prompt_parts
    from .train import fit_student, predict, split_metrics

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

        callbacks.append(PyTorchLightningPruningCallback(trial, "val_quality"))
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
            result = [metrics["val_quality"]]
            # per-prompt parts of the measure, for the out-of-fold check in `choose`
            trial.set_user_attr("val_parts", np.round(prompt_parts(prep, p_val, val), 6).tolist())
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
    from .data import prepare

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
    directions = ["maximize", "minimize"] if pareto else ["maximize"]
    study, store, lock = open_study(name, storage, study_name, directions, cfg, trials)
    with _locked(lock):  # one parent MLflow run and one base trial per study, even when workers start together
        experiment = setup_mlflow()
        _check_same_inputs(study, prep.data_hash, cfg)
        check_same_measure(study, f"val {measure_name(prep)}")
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


def check_same_measure(study: optuna.Study, measure: str) -> None:
    """A study's trials are compared on one measure. Studies from before the objective was the data's routing
    measure scored the labeled pair's APGR and stored no per-prompt parts for the out-of-fold check."""
    old = study.user_attrs.get("measure", "the labeled pair's val APGR")
    if study.trials and old != measure:
        raise ConfigError(f"study {study.study_name!r} scored its trials by {old}, not {measure}: pass another "
                          "--study-name (or delete the study)")
    study.set_user_attr("measure", measure)


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
