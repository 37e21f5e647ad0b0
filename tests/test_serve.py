"""`prerouter serve`: the real server on 127.0.0.1 (a free port, started as a process, killed at the end),
called with a real HTTP client; the proxy forwards to a stub upstream HTTP server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from pipeline.runtime import Router, prompt_from_messages, RouterError

from .fabricate import tiny_bundle

ROOT = Path(__file__).parent.parent
HOST = "127.0.0.1"  # loopback only
MULTI = {"kind": "multi", "cost_lambdas": {"0.25": 0.4, "0.5": 0.1, "1.0": 0.0}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def server(*args: str, timeout: float = 60.0):
    """`prerouter serve ARGS` on a free loopback port; yields (base URL, process); killed at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from pipeline.serve import entry; entry()", "serve", *args,
                             "--host", HOST, "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not answer /healthz in time")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"pair": tiny_bundle(root / "pair")[0],
            "multi": tiny_bundle(root / "multi", n_models=3, decision=MULTI)[0]}


@pytest.fixture(scope="module")
def pair_server(bundles):
    with server(str(bundles["pair"])) as (url, _):
        yield url


def test_route_scores_metadata_and_metrics(pair_server, bundles):
    router = Router.load(bundles["pair"])
    with httpx.Client(base_url=pair_server, timeout=10) as c:
        r = c.post("/route", json={"prompt": "Prove that there are infinitely many primes."})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == router.route("Prove that there are infinitely many primes.")
        assert set(out["scores"]) == {"weak", "strong"} and 0 <= out["score"] <= 1
        for f in (0.0, 1.0):
            assert c.post("/route", json={"prompt": "x", "strong_fraction": f}).json()["model"] == (
                "strong" if f == 1.0 else "weak")
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]}]
        r = c.post("/route", json={"messages": msgs})
        assert r.status_code == 200 and r.json()["scores"] == pytest.approx(
            dict(zip(router.models, router.scores(["What is 2+2?\n\nAnd 3+3?"])[0])), abs=1e-6)
        prompts = ["a", "", "日本語 😀", "long " * 500]
        r = c.post("/scores", json={"prompts": prompts, "strong_fraction": 0.3})
        assert r.status_code == 200
        assert [x["model"] for x in r.json()["results"]] == router.decide(prompts, strong_fraction=0.3)
        meta = c.get("/metadata").json()
        assert meta["decision"] == "pair" and meta["settings"] == ["strong_fraction", "threshold"]
        assert meta["bundle_sha256"] == router.config["bundle_sha256"]
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
        text = metrics.text
        for needle in ('prerouter_decisions_total{model="weak"}', "prerouter_decision_seconds_bucket",
                       "prerouter_strong_share ", "prerouter_strong_share_target 0.5"):
            assert needle in text, needle


@pytest.mark.parametrize("body, status, needle", [
    ("not json", 400, "must be JSON"),
    ([1, 2], 400, "JSON object"),
    ({}, 422, "exactly one of prompt"),
    ({"prompt": 3}, 422, "prompt must be a string"),
    ({"prompt": "x", "messages": []}, 422, "exactly one of"),
    ({"messages": [{"role": "system", "content": "hi"}]}, 422, "no user text"),
    ({"messages": "hi"}, 422, "non-empty list"),
    ({"prompt": "x", "cost_weight": 0.1}, 422, "cost_weight does not apply"),
    ({"prompt": "x", "strong_fraction": 2}, 422, "strong_fraction must be"),
    ({"prompt": "x", "strong_fraction": "half"}, 422, "finite number"),
])
def test_bad_requests_are_4xx_with_a_message(pair_server, body, status, needle):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{pair_server}/route", content=content, timeout=10)
    assert r.status_code == status and needle in r.json()["error"], r.text


def test_bad_batches(pair_server):
    with httpx.Client(base_url=pair_server, timeout=10) as c:
        assert c.post("/scores", json={"prompts": []}).status_code == 422
        r = c.post("/scores", json={"prompts": ["a", 2]})
        assert r.status_code == 422 and "prompts[1]" in r.json()["error"]
        assert c.post("/scores", json={"prompts": ["a"] * 1025}).status_code == 413
        assert c.get("/route").status_code == 405 and c.get("/nowhere").status_code == 404
        assert c.get("/healthz").status_code == 200  # still serving


def test_multi_bundle_server_takes_cost_weight(bundles):
    router = Router.load(bundles["multi"])
    with server(str(bundles["multi"])) as (url, _), httpx.Client(base_url=url, timeout=10) as c:
        r = c.post("/route", json={"prompt": "hello", "cost_weight": 0.0})
        assert r.status_code == 200 and r.json()["model"] == router.route("hello", cost_weight=0.0)
        assert r.json()["score"] is None
        r = c.post("/route", json={"prompt": "hello", "strong_fraction": 0.3})
        assert r.status_code == 422 and "strong_fraction does not apply" in r.json()["error"]
        c.post("/route", json={"prompt": "hello"})
        text = c.get("/metrics").text
        assert "prerouter_mean_relative_cost_target 0.5" in text and "prerouter_mean_relative_cost " in text


def test_a_bundle_failing_verification_stops_start_up(bundles, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundles["pair"], bad)
    with open(bad / "model.int8.onnx", "ab") as f:
        f.write(b"\0")
    done = subprocess.run([sys.executable, "-c", "from pipeline.serve import entry; entry()", "serve", str(bad),
                           "--host", HOST, "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "sha256 mismatch" in done.stderr and len(done.stderr.strip().splitlines()) == 1


class Upstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible stub: echoes the model it was asked for, and the Authorization header."""

    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Upstream.seen.append({"path": self.path, "body": body, "auth": self.headers.get("authorization")})
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for word in ("Hel", "lo"):
                chunk = {"choices": [{"delta": {"content": word}}], "model": body["model"]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"data: [DONE]\n\n")
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}}],
                           "model": body["model"]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_openai_proxy_forwards_to_the_chosen_upstream(bundles, tmp_path, monkeypatch):
    stub = ThreadingHTTPServer((HOST, 0), Upstream)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    base = f"http://{HOST}:{stub.server_address[1]}/v1"
    config = tmp_path / "upstreams.yaml"
    config.write_text(f"upstreams:\n  weak: {{base_url: '{base}', model: small-upstream, api_key_env: TEST_WEAK_KEY}}\n"
                      f"  strong: {{base_url: '{base}', model: big-upstream}}\n")
    monkeypatch.setenv("TEST_WEAK_KEY", "sk-test")
    router = Router.load(bundles["pair"])
    msgs = [{"role": "user", "content": "Prove Fermat's little theorem."}]
    want = router.route(prompt_from_messages(msgs))
    try:
        with server(str(bundles["pair"]), "--upstreams", str(config)) as (url, _), \
                httpx.Client(base_url=url, timeout=20) as c:
            r = c.post("/v1/chat/completions", json={"model": "router", "messages": msgs})
            assert r.status_code == 200, r.text
            assert r.headers["x-prerouter-model"] == want
            assert r.json()["model"] == {"weak": "small-upstream", "strong": "big-upstream"}[want]
            assert Upstream.seen[-1]["path"] == "/v1/chat/completions"
            assert Upstream.seen[-1]["auth"] == ("Bearer sk-test" if want == "weak" else None)
            with c.stream("POST", "/v1/chat/completions",
                          json={"model": "router", "messages": msgs, "stream": True}) as s:
                assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
                events = [line for line in s.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and len(events) == 3
            assert "".join(json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]) == "Hello"
            r = c.post("/v1/chat/completions", json={"model": "strong", "messages": msgs})
            assert r.json()["model"] == "big-upstream" and r.headers["x-prerouter-model"] == "strong"
            r = c.post("/v1/chat/completions", json={"model": "gpt-9", "messages": msgs})
            assert r.status_code == 404 and "router" in r.json()["error"]
            r = c.post("/v1/chat/completions", json={"model": "router", "messages": []})
            assert r.status_code == 422
    finally:
        stub.shutdown()
        stub.server_close()


def test_upstreams_file_must_cover_every_model(bundles, tmp_path):
    config = tmp_path / "u.json"
    config.write_text(json.dumps({"upstreams": {"weak": {"base_url": f"http://{HOST}:1/v1"}}}))
    done = subprocess.run([sys.executable, "-c", "from pipeline.serve import entry; entry()", "serve",
                           str(bundles["pair"]), "--upstreams", str(config), "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no upstream for the bundle's model(s) ['strong']" in done.stderr


CHATS = [
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "image_url", "image_url": {}}]}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "developer", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "p"}, "q"]},
     {"role": "assistant", "content": None, "tool_calls": []}, {"role": "tool", "content": "42"},
     {"role": "user", "content": "and then?"}],
]


@pytest.mark.parametrize("chat", CHATS)
def test_prompt_from_messages_is_the_ingest_rule(chat):
    """A service that receives a chat routes on the text that ingest made of the same chat in the training data."""
    import pyarrow as pa

    from pipeline.ingest_columns import as_text

    trained, dropped = as_text(pa.chunked_array([pa.array([json.dumps(chat)])]), turns_json=True)
    assert not dropped.any() and prompt_from_messages(chat) == trained.to_pylist()[0]
    assert "You are terse." not in trained.to_pylist()[0]


def test_prompt_from_messages_errors_name_the_message():
    for bad, where in [([{"role": "user", "content": 3}], "messages[0].content"),
                       ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages[0].content[0].text"),
                       ([{"role": "user"}, {"role": "assistant", "content": "x"}], "messages[0] has no content"),
                       ([{"content": "x"}], "messages[0] must be an object with a string role")]:
        with pytest.raises(RouterError, match=re.escape(where)):
            prompt_from_messages(bad)
    with pytest.raises(RouterError, match="no user text"):
        prompt_from_messages([{"role": "system", "content": "only instructions"}])


def test_two_workers_answer_without_delayed_ack_stalls(bundles):
    # --workers 2: both processes serve, and a keep-alive request is not held ~40 ms by Nagle + delayed ACK.
    with server(str(bundles["pair"]), "--workers", "2", timeout=90) as (url, _), httpx.Client(base_url=url) as c:
        for _ in range(5):
            c.post("/route", json={"prompt": "warm up"})
        times = []
        for _ in range(20):
            t = time.perf_counter()
            assert c.post("/route", json={"prompt": "What is 2+2?"}).status_code == 200
            times.append(time.perf_counter() - t)
        assert sorted(times)[len(times) // 2] < 0.03, times
