"""`pip install prerouter` alone (no extras) in a fresh virtual environment loads a bundle and routes.

The venv is built offline: the project is built into a wheel with the build tools of the current
environment, its three runtime dependencies come from wheels pip already has (its configured
indexes and find-links: a local mirror or cache), and the install itself is `--no-index`. Where no
such wheels can be had, the test is skipped with the reason.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from .fabricate import tiny_bundle

ROOT = Path(__file__).parent.parent
RUNTIME = ("numpy", "onnxruntime", "tokenizers")
TRAINING = ("torch", "lightning", "transformers", "datasets", "mlflow", "optuna", "rich", "typer", "pydantic",
            "pandas", "sklearn", "pyarrow", "starlette", "uvicorn")


def _pip(python: Path | str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, timeout=timeout)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_runtime_only_install_routes_offline(tmp_path):
    wheels = tmp_path / "wheels"
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    built = _pip(sys.executable, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src))
    if built.returncode != 0:
        pytest.skip(f"cannot build the project wheel offline here: {built.stderr.strip().splitlines()[-1:]}")
    pins = [f"{d}=={metadata.version(d)}" for d in RUNTIME]  # the versions this environment tests with
    got = _pip(sys.executable, "download", "--only-binary", ":all:", "--retries", "0", "--timeout", "15",
               "-d", str(wheels), *pins)
    if got.returncode != 0:
        pytest.skip("no wheels for the runtime dependencies are available without a network "
                    f"({got.stderr.strip().splitlines()[-1:]})")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    base = _du(venv)
    done = _pip(python, "install", "--no-index", "--find-links", str(wheels), "prerouter")
    assert done.returncode == 0, done.stderr
    installed = {line.split("==")[0].lower() for line in _pip(python, "freeze").stdout.splitlines()}
    assert {"prerouter", "numpy", "onnxruntime", "tokenizers"} <= installed
    assert not installed & {"torch", "lightning", "transformers", "mlflow", "rich", "typer", "starlette"}

    bundle, _ = tiny_bundle(tmp_path / "bundle")
    code = (
        "import importlib.util, json, sys, time\n"
        "t = time.perf_counter()\n"
        "from pipeline.runtime import Router\n"
        "t_import = time.perf_counter() - t\n"
        f"router = Router.load({str(bundle)!r})\n"
        "print(json.dumps({'route': router.route('Explain quicksort.'), 'import_s': t_import,\n"
        f"  'absent': [m for m in {TRAINING!r} if importlib.util.find_spec(m) is None]}}))\n")
    ran = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout.strip().splitlines()[-1])
    assert out["route"] in ("weak", "strong")
    assert out["absent"] == list(TRAINING)

    # The console script exists in the slim install and says in one line what a training command needs.
    cli = subprocess.run([str(venv / "bin" / "prerouter"), "train", "demo"], capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 2 and "prerouter[train]" in cli.stderr and len(cli.stderr.strip().splitlines()) == 1

    t = time.perf_counter()
    subprocess.run([str(python), "-c", "import pipeline.runtime"], check=True, timeout=60)
    print(f"\nslim venv: {(_du(venv) - base) / 2**20:.0f} MiB of packages ({_du(venv) / 2**20:.0f} MiB in all); "
          f"import pipeline.runtime {out['import_s'] * 1000:.0f} ms in-process, "
          f"{(time.perf_counter() - t) * 1000:.0f} ms for a fresh interpreter")
