"""Shared plumbing: artifact paths, atomic writes, hashing, the error every stage raises on bad input."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from rich.console import Console

try:
    import fcntl
except ImportError:  # not on Windows: writers of one name are then not serialized
    fcntl = None

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


_TMP_SUFFIX = 40  # what atomic_dir adds to a name for its temporary siblings (".NAME.tmp-PID-XXXXXXXX")


def check_output_path(path: str | os.PathLike, kind: str = "dir", option: str = "--out") -> Path:
    """`path`, if a folder (`kind="dir"`) or file (`kind="file"`) can be written there; else a one-line
    ConfigError naming `option`: a NUL byte, a name or path longer than the file system takes (room left
    for the temporary sibling of an atomic write), a parent that is a file, a file where a folder is
    expected or the other way round, or a folder that cannot be written."""
    text = os.fspath(path)
    if "\0" in text:
        raise ConfigError(f"{option} {text!r}: a path cannot contain a NUL byte")
    if not text.strip():
        raise ConfigError(f"{option}: empty path")
    path = Path(text)
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        name_max = os.pathconf(ancestor if ancestor.is_dir() else ".", "PC_NAME_MAX")
        path_max = os.pathconf(ancestor if ancestor.is_dir() else ".", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    for i, part in enumerate(path.parts):
        room = name_max - (_TMP_SUFFIX if i == len(path.parts) - 1 else 0)
        if len(os.fsencode(part)) > room:
            raise ConfigError(f"{option}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes; the file "
                              f"system takes {name_max} (and this one needs room for a temporary copy: "
                              f"at most {room})")
    if len(os.fsencode(os.path.abspath(text))) + _TMP_SUFFIX > path_max:
        raise ConfigError(f"{option}: the path is longer than the file system takes ({path_max} bytes)")
    if os.path.lexists(ancestor) and not ancestor.is_dir():
        raise ConfigError(f"{option} {text}: {ancestor} is a file, not a folder")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {text} is a file; a folder is written there")
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{option} {text} is a folder; a file is written there")
    if ancestor.is_dir() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {text}: cannot write in {ancestor} (permission denied)")
    return path


def check_name(name: str, option: str = "--name") -> str:
    """A dataset / model name: one plain folder name that fits under data/processed and models/."""
    if not name or not name.strip() or "/" in name or name.startswith(".") or "\0" in name:
        raise ConfigError(f"invalid {option} {name!r}: a plain folder name, not empty, without /, "
                          "not starting with a dot")
    check_output_path(processed_dir(name), "dir", option)
    check_output_path(model_dir(name), "dir", option)
    return name


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
    """Yield a temporary sibling of `final`; on success make it the version `final` names.

    `final` is a symbolic link to a complete version folder beside it (`.NAME.v-TIME-PID`), swapped
    in one rename, so the name always exists. A reader that needs several files of one version
    resolves the name once (`Path.resolve()`, as `Router.load` does) and reads from there: the
    version it resolved stays on disk until two more versions have been written, so a swap never
    pulls files from under it. Writers of one name take turns: each holds an advisory lock
    (`name_lock`) from before it starts writing until its version is in place. On any exception the
    temporary folder is removed and `final` is untouched; a kill leaves a temporary folder, which
    the next writer removes. A `final` that is a plain folder (written before versions existed)
    becomes the previous version on the first write.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with name_lock(final):
        _recover(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
        try:
            yield tmp
            version = final.parent / f".{final.name}.v-{time.time_ns()}-{os.getpid()}"
            os.replace(tmp, version)  # complete: only finished folders carry a version name
        except BaseException:
            _remove(tmp)
            raise
        previous = _named_version(final)  # what readers may have resolved: kept one more write
        if os.path.lexists(final) and not final.is_symlink():  # a plain folder from before versions
            previous = final.parent / f".{final.name}.v-0-{os.getpid()}"
            os.replace(final, previous)
        link = final.parent / f".{final.name}.link-{os.getpid()}"
        _remove(link)
        os.symlink(version.name, link, target_is_directory=True)
        os.replace(link, final)  # the swap: one rename, `final` never missing
        # The new version and the one readers may have resolved; not e.g. a version a killed writer
        # finished but never swapped in, which `kept_versions` would take for the newest other.
        _prune_versions(final, keep=[version, previous])


def versions(final: Path) -> list[Path]:
    """The version folders of `final` on disk, oldest first (after a write: the one it names and the
    one before)."""
    final = Path(final)
    found = final.parent.glob(f".{final.name}.v-*")
    return sorted(found, key=lambda p: int(p.name.rsplit(".v-", 1)[1].split("-")[0]))


def kept_versions(final: Path) -> list[Path]:
    """The versions a writer finds and keeps: the one `final` names and the newest other (after a write,
    the one it named before the swap, for readers that resolved the name then); none when `final` is
    not a link."""
    current = _named_version(Path(final))
    if current is None:
        return []
    return [*[v for v in versions(final) if v != current][-1:], current]


def _named_version(final: Path) -> Path | None:
    """The version folder the link `final` names (None when `final` is missing or a plain folder)."""
    return final.parent / os.readlink(final) if final.is_symlink() else None


def remove_dir(final: Path) -> None:
    """Delete `final` and every version of it, under its lock."""
    final = Path(final)
    if not os.path.lexists(final.parent):
        return
    with name_lock(final):
        _remove(final)
        for path in [*versions(final), *final.parent.glob(f".{final.name}.tmp-*")]:
            _remove(path)


def _recover(final: Path) -> None:
    """Under the name's lock: remove what killed writers left (temporary folders, links, versions
    that `final` no longer names beyond the one before it), and put back a version that a writer of
    the earlier, two-rename kind set aside (`.NAME.old-*`) when it was killed mid-swap."""
    aside = [*final.parent.glob(f".{final.name}.old-*"), *final.parent.glob(f".{final.name}.tmp-old")]
    if aside and not os.path.lexists(final):
        newest = max(aside, key=lambda p: p.lstat().st_ctime_ns)  # a rename updates ctime: the last one set aside
        os.replace(newest, final)
        console.print(f"[yellow]{final}: restored the previous version, which an interrupted write had set aside[/]")
    stale = [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.link-*"),
             *final.parent.glob(f".{final.name}.old-*")]
    for path in stale:
        _remove(path)
    _prune_versions(final)


def _prune_versions(final: Path, keep: list[Path | None] | None = None) -> None:
    """Remove the versions of `final` other than `keep` (default: `kept_versions`)."""
    kept = kept_versions(final) if keep is None else keep
    for version in versions(final):
        if version not in kept:
            _remove(version)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_held_locks: set[tuple[str, int]] = set()  # (lock file, thread id) this process holds


@contextlib.contextmanager
def name_lock(final: Path) -> Iterator[None]:
    """Hold the advisory lock of `final`'s name (`flock` on `.NAME.lock` beside it) while the block runs.

    Other processes and threads that ask for it wait. The kernel drops the lock when its holder dies,
    so a killed writer never leaves a name locked. The holder deletes the lock file on release; a
    waiter that then gets the lock of the deleted file tries again on the current one.
    """
    final = Path(final)
    path = final.parent / f".{final.name}.lock"
    key = (os.path.abspath(path), threading.get_ident())
    if key in _held_locks:
        raise RuntimeError(f"{final} is already writing in this thread (nested writes of one name would deadlock)")
    if fcntl is None:  # no flock on this platform: no cross-process exclusion
        yield
        return
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    console.print(f"[dim]{final}: waiting for another writer of it to finish[/]")
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # the previous holder deleted that file: lock the one there now
    _held_locks.add(key)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
        yield
    finally:
        _held_locks.discard(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding the lock: nobody else can be using this file
        os.close(fd)


def process_start(pid: int) -> int | None:
    """Start time of a process (Linux clock ticks since boot), so a reused pid is not mistaken for it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has exited


def process_alive(pid: int, start: int | None) -> bool:
    """Whether process `pid` still runs and is the one that started at `start` (None: not known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or process_start(pid) == start


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


def prompt_id(prompt: str) -> str:
    """A prompt's id in datasets and caches: the first 16 hex digits of its sha256."""
    return prompt_hash(prompt)[:16]


def arrow_table(ds):
    """The pyarrow Table under a `datasets.Dataset`: columns read zero-copy, without Python rows."""
    return ds.data.table


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def mlruns_root() -> Path:
    return Path(os.environ.get("PREROUTER_MLRUNS_DIR", "mlruns"))


_LOCAL_URI: str | None = None  # the local store setup_mlflow last pointed MLflow at


def setup_mlflow(experiment: str = "prerouter") -> str:
    """Point MLflow at the team server in MLFLOW_TRACKING_URI, else a SQLite store under mlruns/.

    SQLite (not the deprecated file store) so the model registry works locally too; artifacts go to
    mlruns/artifacts. Returns the experiment id.
    """
    import mlflow

    global _LOCAL_URI
    artifact_location = None
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: a value this function set itself is not
    # a team server, and must follow PREROUTER_MLRUNS_DIR when that changes within one process.
    if os.environ.get("MLFLOW_TRACKING_URI") in (None, "", _LOCAL_URI):
        root = mlruns_root().resolve()
        root.mkdir(parents=True, exist_ok=True)
        _LOCAL_URI = f"sqlite:///{root / 'mlflow.db'}"
        mlflow.set_tracking_uri(_LOCAL_URI)
        artifact_location = (root / "artifacts").as_uri()
    else:  # the user's server, even where this process pointed MLflow elsewhere before
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
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
