"""Tune storages: an SQL URL gets Optuna's heartbeat and retry of a dead worker's trial; a journal file keeps
the same-machine pid checks. Real Optuna studies on a SQLite file or a journal file; no training."""
from __future__ import annotations

import subprocess
import time
import warnings

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pipeline.common import ConfigError
from pipeline.config import load_config
from pipeline.tune import fail_stale_trials, open_study
from pipeline.tune_space import search_space, suggest
from pipeline.tune_storage import HOST, JournalFile, SQLStorage

SPACE = "tune.space={student.family: static, student.dim: [16, 32], train.lr: [0.001, 0.02]}"


@pytest.fixture(autouse=True)
def mlruns(tmp_path, monkeypatch):
    monkeypatch.setenv("PREROUTER_MLRUNS_DIR", str(tmp_path / "mlruns"))


def _retried(trial) -> int | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def test_an_sql_url_gets_optunas_heartbeat_and_retry_and_a_journal_file_does_not(tmp_path):
    cfg = load_config()
    study, store, _ = open_study("demo", f"sqlite:///{tmp_path / 'study.db'}", None, ["maximize"], cfg, 4)
    assert isinstance(store, SQLStorage) and isinstance(store.backend, RDBStorage)
    assert (store.backend.heartbeat_interval, store.backend.grace_period) == (60, 120)  # tune section defaults
    assert isinstance(store.backend.heartbeat_stale_trial_callback, RetryHeartbeatStaleTrialCallback)
    assert study._storage.get_heartbeat_interval() == 60  # the study uses that storage (behind Optuna's cache)
    assert store.label == f"sqlite:///{tmp_path / 'study.db'}" and store.max_retry == 2

    study, store, _ = open_study("demo", None, None, ["maximize"], cfg, 4)
    assert isinstance(store, JournalFile) and isinstance(store.backend, JournalStorage)
    assert store.path == tmp_path / "mlruns" / "optuna" / "prerouter-demo-quality.journal"
    assert store.max_retry == 0 and not hasattr(study._storage, "get_heartbeat_interval")


def test_the_grace_period_must_outlast_a_heartbeat():
    with pytest.raises(ConfigError, match="grace_period"):
        load_config(overrides=["tune.heartbeat_interval=30", "tune.grace_period=30"])
    with pytest.raises(ConfigError, match="max_retry"):
        load_config(overrides=["tune.max_retry=-1"])


def test_a_dead_workers_trial_is_failed_and_run_again_with_its_configuration(tmp_path):
    """Worker A asks a trial and beats while it lives; when its beats stop (a killed process), the next worker
    fails the trial after the grace period and Optuna queues its configuration as a WAITING retry."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = load_config(overrides=[SPACE, "tune.heartbeat_interval=1", "tune.grace_period=2", "tune.max_retry=1"])
    space = search_space(cfg)
    study_a, store_a, _ = open_study("demo", url, None, ["maximize"], cfg, 4)
    trial = store_a.ask(study_a)
    values = suggest(trial, space, cfg)

    study_b, store_b, _ = open_study("demo", url, None, ["maximize"], cfg, 4)  # another worker
    with store_a.heartbeat(trial):  # alive for longer than the grace period: never failed
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            assert fail_stale_trials(study_b, store_b) == []
            time.sleep(0.25)
    assert study_b.trials[0].user_attrs["worker"]["host"] == HOST
    # worker A is gone: its trial is failed once its last heartbeat is older than the grace period
    failed = _wait_for_stale(study_b, store_b)
    assert failed == [0]
    trials = study_b.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[1].state == TrialState.WAITING and _retried(trials[1]) == 0
    assert fail_stale_trials(study_b, store_b) == []  # failed once, queued once

    retry = store_b.ask(study_b)  # the next trial any worker asks for is the retry, with the same values
    assert retry.number == 1 and suggest(retry, space, cfg) == values
    assert _wait_for_stale(study_b, store_b) == [1]  # the retry's worker dies too: max_retry=1 is spent
    assert [t.state for t in study_b.get_trials()] == [TrialState.FAIL, TrialState.FAIL]
    assert _retried(study_b.trials[1]) == 0


def _wait_for_stale(study, store, limit: float = 15.0) -> list[int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        failed = fail_stale_trials(study, store)
        if failed:
            return failed
        time.sleep(0.25)
    return []


def test_a_journal_trial_is_failed_when_its_process_is_gone_and_not_retried(tmp_path):
    cfg = load_config()
    study, store, _ = open_study("demo", str(tmp_path / "study.journal"), None, ["maximize"], cfg, 4)
    assert store.path == tmp_path / "study.journal"
    alive = store.ask(study)
    with store.heartbeat(alive):  # this process: alive
        dead = store.ask(study)
        gone = subprocess.Popen(["true"])
        gone.wait()
        dead.set_user_attr("worker", {"host": HOST, "pid": gone.pid, "start": None})
        assert fail_stale_trials(study, store) == [dead.number]
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.FAIL]  # nothing queued
