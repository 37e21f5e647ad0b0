"""The MLflow model registry as the record of which bundle is in production.

`export` registers every bundle as a version of the registered model `prerouter-NAME` (the version's
folder is the bundle and, beside its files, an MLflow pyfunc model of it: `pipeline/mlflow_model.py`).
Here:

- `promote(name, version)` points the alias `champion` at a version; the version that held it gets
  the alias `previous` (it keeps its version number, so rolling back is `promote NAME <previous>`).
- `pull(spec, out)` downloads the bundle of `NAME[@ALIAS]` (alias `champion` by default; a number
  is a version) into `out` and verifies it (`Router.load` with the sha256 checks) before it lands.
- `resolve_bundle(spec)` turns `models:/prerouter-NAME@ALIAS` (or `models:/prerouter-NAME/VERSION`)
  into a verified local bundle folder, so every command that takes a bundle path takes such a URI.

The store is `pipeline.common.setup_mlflow`'s (MLFLOW_TRACKING_URI, else SQLite under mlruns/).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .common import ConfigError, DataError, atomic_dir, console, read_json

PREFIX = "prerouter-"
CHAMPION, PREVIOUS = "champion", "previous"
URI_PREFIX = "models:/"


@dataclass
class Ref:
    """A registered bundle: registered model name and either an alias or a version."""

    model: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{URI_PREFIX}{self.model}" + (f"@{self.alias}" if self.alias else f"/{self.version}")


def registered_name(name: str) -> str:
    """`prerouter-NAME` for a dataset name (a name that already has the prefix is kept)."""
    if not name or "/" in name or "@" in name:
        raise ConfigError(f"invalid model name {name!r}")
    return name if name.startswith(PREFIX) else PREFIX + name


def parse(spec: str, default_alias: str = CHAMPION) -> Ref:
    """`NAME`, `NAME@ALIAS`, `NAME@3`, `models:/prerouter-NAME@ALIAS` or `models:/prerouter-NAME/3`."""
    text = spec[len(URI_PREFIX):] if spec.startswith(URI_PREFIX) else spec
    m = re.fullmatch(r"([^/@\s]+)(?:@([^/@\s]+)|/(\d+))?", text)
    if not m:
        raise ConfigError(f"not a registered bundle reference: {spec!r} (expected NAME[@ALIAS] or "
                          f"models:/prerouter-NAME@ALIAS)")
    name, alias, version = m.groups()
    model = registered_name(name)
    if alias is not None and alias.isdigit():
        alias, version = None, alias
    if alias is None and version is None:
        alias = default_alias
    return Ref(model, alias, version)


def is_uri(spec: str | Path) -> bool:
    return str(spec).startswith(URI_PREFIX)


def _client():
    from mlflow import MlflowClient

    from .common import setup_mlflow

    setup_mlflow()
    return MlflowClient()


def _version(client, ref: Ref):
    """The ModelVersion a reference names, or a DataError saying what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.model, ref.alias)
        return client.get_model_version(ref.model, ref.version)
    except MlflowException as e:
        what = f"alias {ref.alias!r}" if ref.alias else f"version {ref.version}"
        known = ""
        with contextlib.suppress(MlflowException):
            known = ", ".join(sorted(client.get_registered_model(ref.model).aliases)) or "none"
            known = f" (aliases: {known})"
        raise DataError(f"the registry has no {what} of {ref.model}{known}: {e.message.splitlines()[0]}",
                        file=str(ref)) from None


def exists(spec: str) -> bool:
    """Whether a registered bundle reference names an existing version."""
    try:
        _version(_client(), parse(spec))
        return True
    except DataError:
        return False


def version_of(name: str, bundle: Path) -> str:
    """The registered version of `prerouter-NAME` whose bundle is `bundle` (same bundle_sha256), newest first."""
    import mlflow

    client = _client()
    model = registered_name(name)
    seal = read_json(Path(bundle) / "router.json").get("bundle_sha256")
    versions = sorted(client.search_model_versions(f"name='{model}'"), key=lambda v: -int(v.version))
    with tempfile.TemporaryDirectory(prefix="prerouter-registry-") as tmp, _no_progress_bar():
        for v in versions:
            try:
                path = mlflow.artifacts.download_artifacts(artifact_uri=f"{v.source}/router.json",
                                                           dst_path=f"{tmp}/{v.version}")
                if read_json(Path(path)).get("bundle_sha256") == seal:
                    return str(v.version)
            except Exception:  # a version whose artifacts are gone: not this bundle
                continue
    raise DataError(f"no version of {model} holds this bundle (bundle_sha256 {seal}); export registers it",
                    file=bundle)


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow's download progress bar off: a bar per small router.json is noise in `run`'s output."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # read by MLflow at each download
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def promote(name: str, version: str | int) -> dict:
    """Alias `champion` -> `version` of `prerouter-NAME`; the previous champion's version gets `previous`.

    `version` is a version number or a bundle folder (its registered version is looked up by seal).
    Returns {"model", "champion", "previous"}."""
    client = _client()
    model = registered_name(name)
    version = str(version)
    if not version.isdigit():
        if not Path(version).is_dir():
            raise ConfigError(f"VERSION must be a registered version number or a bundle folder, got {version!r}")
        version = version_of(name, Path(version))
    _version(client, Ref(model, version=version))  # exists
    previous = None
    try:
        previous = str(client.get_model_version_by_alias(model, CHAMPION).version)
    except Exception:  # no champion yet
        previous = None
    if previous is not None and previous != version:
        client.set_registered_model_alias(model, PREVIOUS, previous)
    client.set_registered_model_alias(model, CHAMPION, version)
    shown = f" (previous: version {previous})" if previous and previous != version else ""
    console.print(f"[green]promoted[/] {model} version {version} to {CHAMPION}{shown}")
    return {"model": model, "champion": version, "previous": previous if previous != version else None}


def _bundle_files(folder: Path) -> set[str]:
    """router.json and the files it lists; every file of `folder` when router.json lists none (so that
    Router.load, not this filter, says what is wrong with such a bundle)."""
    try:
        listed = read_json(folder / "router.json").get("files")
    except Exception:
        listed = None
    if not isinstance(listed, dict) or not listed:
        return {f.name for f in folder.iterdir()}
    return {"router.json", *map(str, listed)}


def _download(client, ref: Ref, dst: Path) -> dict:
    """Download the bundle files of `ref` into the existing empty folder `dst`; returns version info."""
    import mlflow

    mv = _version(client, ref)
    with tempfile.TemporaryDirectory(prefix="prerouter-pull-") as tmp:
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp))
        except Exception as e:
            raise DataError(f"cannot download version {mv.version} of {ref.model} from {mv.source}: {e}",
                            file=str(ref)) from None
        if not (got / "router.json").is_file():
            raise DataError(f"version {mv.version} of {ref.model} holds no bundle (no router.json at {mv.source})",
                            file=str(ref))
        keep = _bundle_files(got)  # not the MLflow model's files beside the bundle (MLmodel, code/, ...)
        for f in got.iterdir():
            if f.name in keep:
                shutil.move(str(f), dst / f.name)
    return {"model": ref.model, "version": str(mv.version), "alias": ref.alias, "source": mv.source,
            "run_id": mv.run_id}


def pull(spec: str, out: Path) -> dict:
    """Download `NAME[@ALIAS]` into `out` (replaced whole, atomically) after verifying every sha256."""
    from .export import check_bundle_dir
    from .runtime import Router

    ref = parse(spec)
    out = check_bundle_dir(Path(out))
    client = _client()
    with atomic_dir(out) as tmp:
        info = _download(client, ref, tmp)
        Router.load(tmp, verify=True)  # a bundle that fails its checks never replaces `out`
    seal = read_json(out / "router.json")["bundle_sha256"]
    console.print(f"[green]pulled[/] {ref} = version {info['version']} -> {out} (verified, bundle_sha256 {seal[:12]}…)")
    return info | {"bundle_sha256": seal, "path": str(out)}


@contextlib.contextmanager
def resolve_bundle(spec: str | Path) -> Iterator[Path]:
    """A local bundle folder for a path or a `models:/` URI (downloaded into a temporary folder and
    verified; removed when the block ends)."""
    if not is_uri(spec):
        yield Path(spec)
        return
    from .runtime import Router

    ref = parse(str(spec))
    client = _client()
    with tempfile.TemporaryDirectory(prefix="prerouter-bundle-") as tmp:
        folder = Path(tmp) / "bundle"
        folder.mkdir()
        info = _download(client, ref, folder)
        Router.load(folder, verify=True)
        console.print(f"[dim]{spec}: version {info['version']}[/]")
        yield folder
