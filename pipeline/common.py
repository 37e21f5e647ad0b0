"""Shared plumbing: artifact paths, atomic writes, hashing, the error every stage raises on bad input."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from rich.console import Console

console = Console(stderr=True)


class PrerouterError(Exception):
    """A user-facing failure: the CLI prints it and exits with `exit_code`, no traceback."""

    exit_code = 2

    def __init__(self, reason: str, *, file: str | os.PathLike | None = None, row: int | None = None):
        self.reason, self.file, self.row = reason, file, row
        where = ""
        if file is not None:
            where = f"{file}"
            if row is not None:
                where += f", row {row}"
            where += ": "
        super().__init__(where + reason)


class DataError(PrerouterError):
    """Input data that cannot be used (missing column, unreadable file, zero usable rows...)."""


class ConfigError(PrerouterError):
    """A configuration value that is unknown, of the wrong type or impossible."""


class GateError(PrerouterError):
    """A quality gate (parity, latency) that failed; exit code 1 like a failing check."""

    exit_code = 1


def data_root() -> Path:
    return Path(os.environ.get("PREROUTER_DATA_DIR", "data"))


def models_root() -> Path:
    return Path(os.environ.get("PREROUTER_MODELS_DIR", "models"))


def processed_dir(name: str) -> Path:
    return data_root() / "processed" / name


def labels_dir(name: str) -> Path:
    return processed_dir(name) / "labels"


def model_dir(name: str) -> Path:
    return models_root() / name


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success replace `final` with it in one rename.

    On any exception (or a kill) the temporary directory is what is left, never a half `final`;
    stale temporaries are removed on the next write.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.tmp-old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def mlruns_root() -> Path:
    return Path(os.environ.get("PREROUTER_MLRUNS_DIR", "mlruns"))


def setup_mlflow(experiment: str = "prerouter") -> str:
    """Point MLflow at the team server in MLFLOW_TRACKING_URI, else a SQLite store under mlruns/.

    SQLite (not the deprecated file store) so the model registry works locally too; artifacts go to
    mlruns/artifacts. Returns the experiment id.
    """
    import mlflow

    artifact_location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        root = mlruns_root().resolve()
        root.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        artifact_location = (root / "artifacts").as_uri()
    exp = mlflow.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(d: Mapping, prefix: str = "", lists: bool = True) -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config/metrics as flat MLflow keys (`lists=False` drops lists)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}.", lists))
        elif lists or not isinstance(v, (list, tuple)):
            out[f"{prefix}{k}"] = v
    return out
