"""`make mlflow-ui` serves the store the stages log to: started as the Makefile starts it, it lists the
latest run through MLflow's REST API."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LOG_RUNS = textwrap.dedent("""
    import mlflow
    from pipeline.common import setup_mlflow

    setup_mlflow()
    for name in ("older", "latest"):
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_param("which", name)
            mlflow.log_text("hello", "note.txt")
    print(run.info.run_id)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read().decode()
    return json.loads(text) if text.strip().startswith("{") else {"text": text}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_mlflow_ui_finds_the_latest_run(tmp_path):
    mlruns = tmp_path / "mlruns"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PREROUTER_MLRUNS_DIR=str(mlruns), PYTHONPATH=str(REPO))
    logged = subprocess.run([sys.executable, "-c", LOG_RUNS], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert logged.returncode == 0, logged.stderr[-3000:]
    latest = logged.stdout.split()[-1]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # `-o setup`: the virtualenv is the one running this test; never reinstall it from a test.
    ui = subprocess.Popen(["make", "-s", "-o", "setup", "mlflow-ui", f"MLRUNS={mlruns}", f"MLFLOW_PORT={port}",
                           "MLFLOW_WORKERS=1"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert ui.poll() is None, f"the UI exited with {ui.returncode}: {ui.stdout.read()[-3000:]}"
            try:
                if call(f"{base}/health", timeout=2).get("text", "").strip() == "OK":
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the UI did not come up within 180 s"
            time.sleep(0.5)

        experiments = call(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
        exp = next(e for e in experiments if e["name"] == "prerouter")
        runs = call(f"{base}/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [exp["experiment_id"]], "order_by": ["attributes.start_time DESC"],
                     "max_results": 1})["runs"]
        assert runs[0]["info"]["run_id"] == latest and runs[0]["info"]["run_name"] == "latest"
        # The artifacts the runs logged are where the UI looks for them.
        files = call(f"{base}/api/2.0/mlflow/artifacts/list?run_id={latest}")["files"]
        assert [f["path"] for f in files] == ["note.txt"]
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)  # make and the server it started: their own process group
            try:
                ui.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
                ui.wait()
        for _ in range(40):  # the server processes of that group go with it
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            time.sleep(0.5)
        else:
            os.killpg(ui.pid, signal.SIGKILL)
