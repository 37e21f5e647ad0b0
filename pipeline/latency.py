"""The latency gate: single decisions (batch 1, one thread, tokenization included) per prompt-length bucket."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import GateError, console
from .runtime import Router

BUCKETS = ("short", "medium", "long", "very long")
PUNCT = [".", ",", "?", "!", ":", ";", "(", ")", "\n", "-", "'", "\""]
# About 12% of real prompts (../shared/data) hold a non-ASCII character; those take the slower
# per-character branch of the tokenizer's fast path (or the library), so the mix keeps that share.
NON_ASCII, NON_ASCII_SHARE = ["café", "naïve", "—", "“quoted”", "über", "日本語", "😀", "…", "µs", "Ω"], 0.12


def bucket_ranges(max_tokens: int) -> dict[str, tuple[int, int]]:
    """Content tokens before truncation per bucket, [low, high); medium is empty when max_tokens <= 32."""
    short = min(32, max_tokens)
    ranges = {"short": (1, short), "medium": (short, max_tokens), "long": (max_tokens, 2000),
              "very long": (2000, 4000)}
    return {b: r for b, r in ranges.items() if r[0] < r[1]}


def prompt_mix(router: Router, n: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """`n` seeded prompts spread evenly over the buckets: [(bucket, prompt, tokens before truncation)].

    Prompts are whole-word vocabulary entries with punctuation (each word about one token) and,
    in 12% of them, a non-ASCII word.
    """
    rng = np.random.default_rng(seed)
    tok = router.tokenizer
    words = np.array(sorted(w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 2))
    ranges = bucket_ranges(router.spec["max_tokens"])
    mix = []
    for i in range(n):
        name = list(ranges)[i % len(ranges)]
        units = rng.choice(words, size=int(rng.integers(*ranges[name]))).astype(object)
        punct = rng.random(units.size) < 0.1
        units[punct] = rng.choice(PUNCT, size=int(punct.sum()))
        if rng.random() < NON_ASCII_SHARE:
            units[rng.integers(units.size)] = rng.choice(NON_ASCII)
        prompt = " ".join(units)
        tokens = len(tok.content_ids(prompt))
        mix.append((bucket_of(tokens, ranges), prompt, tokens))
    return [mix[i] for i in rng.permutation(n)]


def bucket_of(tokens: int, ranges: dict[str, tuple[int, int]]) -> str:
    """The bucket of a prompt with `tokens` content tokens (a dropped "\\n" can move it down one)."""
    return next((b for b, (_, hi) in ranges.items() if tokens < hi), list(ranges)[-1])


def _percentiles(wall: np.ndarray, cpu: np.ndarray) -> dict:
    return {"n": int(wall.size), "p50": float(np.percentile(wall, 50)), "p95": float(np.percentile(wall, 95)),
            "p99": float(np.percentile(wall, 99)), "mean": float(wall.mean()), "max": float(wall.max()),
            "cpu_p50": float(np.percentile(cpu, 50)), "cpu_p99": float(np.percentile(cpu, 99))}


def time_decisions(router: Router, prompts: list[str], warmup: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(wall, cpu) milliseconds per `router.route(prompt)`, one call at a time, after `warmup` untimed calls.

    With one intra-op thread onnxruntime computes on the calling thread, so the thread's CPU time is
    the router's own work; wall time also counts time the OS gave to other processes.
    """
    for i in range(warmup if prompts else 0):
        router.route(prompts[i % len(prompts)])
    wall, cpu = np.empty(len(prompts)), np.empty(len(prompts))
    clock, thread_clock = time.perf_counter_ns, time.thread_time_ns
    for i, prompt in enumerate(prompts):
        t0, c0 = clock(), thread_clock()
        router.route(prompt)
        cpu[i], wall[i] = thread_clock() - c0, clock() - t0
    return wall / 1e6, cpu / 1e6


def check_latency(bundle: str | Path, budget_ms: float | None = 1.0, decisions: int = 1000, quantized: bool = True,
                  threads: int = 1, seed: int = 0, clock: str = "cpu", show: bool = True) -> dict:
    """Time `decisions` single routing decisions; raise GateError when the overall p99 exceeds `budget_ms`.

    Every decision is timed on both clocks: wall time (what a caller waits, including time the OS
    gives to other processes) and the calling thread's CPU time (the router's own work: with one
    intra-op thread onnxruntime computes on the caller's thread). `clock` picks the p99 the gate
    reads: "cpu" (default: a busy or shared machine does not fail a fast router) or "wall" (on a
    quiet, dedicated machine, what a caller waits). The figures hold both and name the gating clock
    (`clock`), which is what router.json's `latency` records. `budget_ms=None` only measures.
    Returns the figures in ms.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    router = Router.load(bundle, threads=threads, quantized=quantized)
    mix = prompt_mix(router, decisions, seed)
    wall, cpu = time_decisions(router, [p for _, p, _ in mix], warmup=min(200, decisions))
    names = np.array([b for b, _, _ in mix])
    tokens = np.array([t for _, _, t in mix])
    overall = _percentiles(wall, cpu)
    p99 = overall["p99" if clock == "wall" else "cpu_p99"]
    figures = {
        "model": "int8" if quantized else "fp32", "threads": threads, "batch": 1, "decisions": decisions,
        "max_tokens": router.spec["max_tokens"], "budget_ms": budget_ms, "clock": clock,
        "passed": None if budget_ms is None else p99 <= budget_ms,
        "buckets": {b: {**_percentiles(wall[names == b], cpu[names == b]),
                        "median_tokens": int(np.median(tokens[names == b]))}
                    for b in BUCKETS if (names == b).any()},
        "overall": overall,
    }
    if show:
        _print(figures, Path(bundle))
    if figures["passed"] is False:
        raise GateError(f"latency gate failed: {clock} p99 {p99:.3f} ms > budget {budget_ms:g} ms "
                        f"({figures['model']}, batch 1, {threads} thread{'s' * (threads > 1)})")
    return figures


def _print(figures: dict, bundle: Path) -> None:
    from rich.table import Table

    budget, gated = figures["budget_ms"], "p99" if figures["clock"] == "wall" else "cpu_p99"
    table = Table(title=f"{bundle} · {figures['model']} · batch 1 · {figures['threads']} thread(s) · ms per decision",
                  caption=None if budget is None else f"budget: {figures['clock']} p99 ≤ {budget:g} ms")
    columns = {"p50": "p50", "p95": "p95", "p99": "p99", "max": "max", "cpu_p50": "cpu p50", "cpu_p99": "cpu p99"}
    for col in ("bucket", "n", "median tokens", *columns.values()):
        table.add_column(col, justify="left" if col == "bucket" else "right")
    for b, f in [*figures["buckets"].items(), ("overall", figures["overall"])]:
        cells = {k: f"{f[k]:.3f}" for k in columns}
        if b == "overall" and budget is not None:
            cells[gated] = f"[{'green' if f[gated] <= budget else 'red'}]{cells[gated]}[/]"
        table.add_row(b, str(f["n"]), str(f.get("median_tokens", "")), *cells.values())
    console.print(table)
