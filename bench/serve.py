"""`make bench-serve`: throughput and latency of `prerouter serve`'s POST /route at 1, 8 and 64 concurrent
clients, against one process and against --workers 2, beside the in-process decision time; results into
bench/results/serve.md.

The load generator is one asyncio process with one keep-alive HTTP/1.1 connection per client, written
on raw sockets so that it costs the machine as little as possible (it shares the CPUs with the server).
Every request must come back 200 (a dropped or failed request is counted); the server's resident
memory (all its processes) is read before and after each point.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def prompts(n: int = 500, seed: int = 0) -> list[str]:
    """A seeded mix of short questions, paragraphs and long documents, some non-ASCII."""
    rng = random.Random(seed)
    words = ("the of and to in is what how why explain prove write code function integer prime capital "
             "France sum list sort graph derivative essay poem summarize translate compare theorem").split()
    out = []
    for _ in range(n):
        k = rng.choice([5, 12, 40, 120, 600])
        text = " ".join(rng.choice(words) for _ in range(k))
        if rng.random() < 0.12:
            text += " 日本語のテキスト 😀 café"
        out.append(text + "?")
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total / 1024


def start_server(bundle: Path, port: int, workers: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "from pipeline.serve import entry; entry()", "serve", str(bundle),
                             "--host", HOST, "--port", str(port), "--workers", str(workers)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()}")
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    time.sleep(1.0 if workers > 1 else 0.2)  # every worker up
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


async def client(port: int, bodies: list[bytes], stop_at: float, lat: list[float], errors: list[int], offset: int):
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        errors[0] += 1
        return
    i = offset
    try:
        while time.perf_counter() < stop_at:
            body = bodies[i % len(bodies)]
            i += 1
            t = time.perf_counter()
            writer.write(b"POST /route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            if not head.startswith(b"HTTP/1.1 200"):
                errors[0] += 1
    except (OSError, asyncio.IncompleteReadError, StopIteration):
        errors[0] += 1
    finally:
        writer.close()


async def load(port: int, clients: int, seconds: float, texts: list[str]) -> dict:
    bodies = [json.dumps({"prompt": t}).encode() for t in texts]
    lat: list[float] = []
    errors = [0]
    start = time.perf_counter()
    await asyncio.gather(*[client(port, bodies, start + seconds, lat, errors, k * 37) for k in range(clients)])
    wall = time.perf_counter() - start
    ms = np.array(lat) * 1000
    return {"clients": clients, "requests": len(lat), "rps": len(lat) / wall, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "errors": errors[0]}


def in_process(bundle: Path, texts: list[str]) -> dict:
    from pipeline.runtime import Router

    router = Router.load(bundle)
    for t in texts[:50]:
        router.route(t)
    ms = []
    for t in texts * 2:
        s = time.perf_counter()
        router.route(t)
        ms.append((time.perf_counter() - s) * 1000)
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "n": len(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=60.0, help="Load per point (the issue's protocol: 60).")
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.md")
    args = ap.parse_args()
    texts = prompts()
    rows = []
    base = in_process(args.bundle, texts)
    print(f"in-process Router.route: p50 {base['p50']:.3f} ms, p99 {base['p99']:.3f} ms", flush=True)
    for workers in map(int, args.workers.split(",")):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        proc = start_server(args.bundle, port, workers)
        try:
            asyncio.run(load(port, 4, 2.0, texts))  # warm-up
            for clients in map(int, args.clients.split(",")):
                before = rss_mb(proc.pid)
                r = asyncio.run(load(port, clients, args.seconds, texts))
                r.update(workers=workers, rss_before=before, rss_after=rss_mb(proc.pid))
                rows.append(r)
                print(json.dumps(r), flush=True)
        finally:
            stop(proc)
    load_avg = os.getloadavg()
    lines = ["# `prerouter serve`: POST /route throughput and latency", "",
             f"Bundle `{args.bundle}`; {args.seconds:g} s of load per point after a 2 s warm-up; one keep-alive "
             f"connection per client (asyncio, raw HTTP/1.1) on the same {os.cpu_count()}-core machine as the "
             f"server; prompts: a seeded mix of 500 (5 to 600 words, 12% with non-ASCII). Load average at the "
             f"end: {load_avg[0]:.2f} (other work on the machine inflates the tail).", "",
             f"In-process `Router.route` (the same prompts, batch 1, one thread): p50 {base['p50']:.3f} ms, "
             f"p99 {base['p99']:.3f} ms over {base['n']} decisions. The difference to the HTTP latency below is "
             "the service's overhead (HTTP parsing, JSON, the event loop, metrics) and queueing.", "",
             "| workers | clients | requests | req/s | p50 ms | p99 ms | failed | server RSS MiB before → after |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['clients']} | {r['requests']} | {r['rps']:.0f} | {r['p50']:.2f} | "
                     f"{r['p99']:.2f} | {r['errors']} | {r['rss_before']:.0f} → {r['rss_after']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
