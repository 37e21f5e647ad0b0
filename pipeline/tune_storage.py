"""Where a tune study is stored, and how a trial whose worker died is found: one mechanism per storage.

Journal file (the default, `mlruns/optuna/STUDY.journal`, or `--storage PATH`): workers on one machine.
    Each running trial records its worker (host, pid, process start time) and refreshes a `heartbeat`
    user attribute every HEARTBEAT_S seconds. A worker that starts, or is about to ask for a trial, fails
    the RUNNING trials whose process is gone (same host) or whose heartbeat is older than STALE_AFTER_S
    (a file shared with another host). Their configurations are not retried. (Optuna's JournalStorage
    has no heartbeat of its own.)

SQL URL (`--storage postgresql://user@host/db`, `mysql://…`, `sqlite:///…`; any SQLAlchemy URL): workers
    on several machines. Optuna's own mechanism, `RDBStorage(heartbeat_interval, grace_period,
    heartbeat_stale_trial_callback)`: the worker of a running trial records a heartbeat in the database
    every `tune.heartbeat_interval` seconds; a trial with none for `tune.grace_period` seconds (database
    clock) is failed by the next worker that looks, and `RetryHeartbeatStaleTrialCallback` (formerly
    `RetryFailedTrialCallback`) queues its configuration again as a WAITING trial, at most `tune.max_retry`
    times per original trial, which the next `ask` takes. Optuna drives that heartbeat only inside
    `Study.optimize`; tune asks and tells itself, so `SQLStorage` records the heartbeats with the storage's
    `record_heartbeat`, the first one as soon as the trial is asked (a trial without any is never stale).
    The hand-written pid/heartbeat checks of the journal file do not run for an SQL storage.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from .common import process_alive, process_start

HEARTBEAT_S, STALE_AFTER_S = 30.0, 300.0  # journal file: heartbeat period, and silence after which a trial is dead
HOST = socket.gethostname()


def is_sql(storage: str | None) -> bool:
    """Whether `--storage` names a database (a URL) rather than a journal file."""
    return bool(storage) and "://" in storage


def open_storage(storage: str | None, default: Path, settings: Any) -> "StudyStorage":
    """The storage `--storage` names: None (the journal file `default`), a journal file path, or an SQL URL.
    `settings` is the config's `tune` section (heartbeat_interval, grace_period, max_retry: SQL only)."""
    if is_sql(storage):
        return SQLStorage(storage, settings.heartbeat_interval, settings.grace_period, settings.max_retry)
    return JournalFile(Path(storage) if storage else default)


class StudyStorage:
    """An Optuna storage (`backend`, for `optuna.create_study`) and its way of telling dead trials."""

    backend: optuna.storages.BaseStorage
    label: str  # what MLflow records as the study's storage (no password)
    max_retry = 0  # times a dead worker's trial is queued again

    def ask(self, study: optuna.Study) -> optuna.Trial:
        return study.ask()

    @contextlib.contextmanager
    def heartbeat(self, trial: optuna.Trial) -> Iterator[None]:
        """While the trial runs in this process: record who runs it and keep it alive for other workers."""
        raise NotImplementedError

    def fail_stale_trials(self, study: optuna.Study) -> list[FrozenTrial]:
        """Mark FAIL the RUNNING trials whose worker died; returns them (as they were when failed)."""
        raise NotImplementedError


def _record_worker(trial: optuna.Trial) -> None:
    trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid(), "start": process_start(os.getpid())})


@contextlib.contextmanager
def _every(seconds: float, beat) -> Iterator[None]:
    """Call `beat()` every `seconds` in a daemon thread until the block ends (or `beat` returns False)."""
    stop = threading.Event()

    def loop():
        while not stop.wait(seconds):
            if beat() is False:
                return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class JournalFile(StudyStorage):
    """A journal file: same-host pid checks, and a `heartbeat` user attribute for other hosts."""

    def __init__(self, path: Path):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.label = path, "journal"
        self.backend = JournalStorage(JournalFileBackend(str(path)))

    @contextlib.contextmanager
    def heartbeat(self, trial: optuna.Trial) -> Iterator[None]:
        _record_worker(trial)

        def beat():
            try:
                trial.set_user_attr("heartbeat", time.time())
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker gave up on it
                return False

        with _every(HEARTBEAT_S, beat):
            yield

    def fail_stale_trials(self, study: optuna.Study) -> list[FrozenTrial]:
        failed = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker") or {}
            beat = t.user_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else time.time())
            dead = worker.get("host") == HOST and not process_alive(worker["pid"], worker.get("start"))
            if dead or time.time() - beat > STALE_AFTER_S:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                failed.append(t)
        return failed


class RetryStaleTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial, also noting the trials this process failed."""

    def __init__(self, max_retry: int):
        super().__init__(max_retry=max_retry)
        self.failed: list[FrozenTrial] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.failed.append(trial)
        super().__call__(study, trial)


class SQLStorage(StudyStorage):
    """An SQL database through Optuna's RDBStorage, with its heartbeat and the retry of stale trials."""

    def __init__(self, url: str, heartbeat_interval: int, grace_period: int, max_retry: int):
        import sqlalchemy

        self.interval, self.max_retry = heartbeat_interval, max_retry
        self.label = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
        with warnings.catch_warnings():  # the heartbeat and the retry callback are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryStaleTrial(max_retry)
            self.backend = optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval,
                                                      grace_period=grace_period,
                                                      heartbeat_stale_trial_callback=self.retry)

    def ask(self, study: optuna.Study) -> optuna.Trial:
        with warnings.catch_warnings():  # Optuna warns that its heartbeat needs Study.optimize: we record it here
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = study.ask()
        self.backend.record_heartbeat(trial._trial_id)  # at once: a trial without a heartbeat is never stale
        return trial

    @contextlib.contextmanager
    def heartbeat(self, trial: optuna.Trial) -> Iterator[None]:
        import sqlalchemy

        _record_worker(trial)  # who ran it (for reading the study; failure is decided by the heartbeat alone)

        def beat():
            try:
                self.backend.record_heartbeat(trial._trial_id)
            except sqlalchemy.exc.SQLAlchemyError:  # the database was briefly unreachable: the next beat retries
                pass

        with _every(self.interval, beat):
            yield

    def fail_stale_trials(self, study: optuna.Study) -> list[FrozenTrial]:
        self.retry.failed.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # calls self.retry for each trial it failed
        failed, self.retry.failed = self.retry.failed, []
        return failed
