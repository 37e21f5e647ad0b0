"""The latency gate: single decisions (batch 1, one thread, tokenization included) per prompt-length bucket."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import GateError, console
from .runtime import Router

BUCKETS = ("short", "medium", "long", "very long")
PUNCT = [".", ",", "?", "!", ":", ";", "(", ")", "\n", "-", "'", "\""]


def bucket_ranges(max_tokens: int) -> dict[str, tuple[int, int]]:
    """Content tokens before truncation per bucket, [low, high); medium is empty when max_tokens <= 32."""
    short = min(32, max_tokens)
    ranges = {"short": (1, short), "medium": (short, max_tokens), "long": (max_tokens, 2000),
              "very long": (2000, 4000)}
    return {b: r for b, r in ranges.items() if r[0] < r[1]}


def prompt_mix(router: Router, n: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """`n` seeded prompts spread evenly over the buckets: [(bucket, prompt, tokens before truncation)].

    Prompts are whole-word vocabulary entries with punctuation, so each word is about one token.
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
        prompt = " ".join(units)
        tokens = len(tok.encode(prompt, add_special_tokens=False).ids)
        mix.append((bucket_of(tokens, ranges), prompt, tokens))
    return [mix[i] for i in rng.permutation(n)]


def bucket_of(tokens: int, ranges: dict[str, tuple[int, int]]) -> str:
    """The bucket of a prompt with `tokens` content tokens (a dropped "\\n" can move it down one)."""
    return next((b for b, (_, hi) in ranges.items() if tokens < hi), list(ranges)[-1])


def _percentiles(ms: np.ndarray) -> dict:
    return {"n": int(ms.size), "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "max": float(ms.max())}


def time_decisions(router: Router, prompts: list[str], warmup: int = 200) -> np.ndarray:
    """Milliseconds per `router.route(prompt)`, one call at a time, after `warmup` untimed calls."""
    for i in range(warmup if prompts else 0):
        router.route(prompts[i % len(prompts)])
    ms = np.empty(len(prompts))
    clock = time.perf_counter_ns
    for i, prompt in enumerate(prompts):
        t0 = clock()
        router.route(prompt)
        ms[i] = (clock() - t0) / 1e6
    return ms


def check_latency(bundle: str | Path, budget_ms: float | None = 1.0, decisions: int = 1000, quantized: bool = True,
                  threads: int = 1, seed: int = 0, show: bool = True) -> dict:
    """Time `decisions` single routing decisions; raise GateError when the overall p99 exceeds `budget_ms`.

    `budget_ms=None` only measures. Returns the figures (ms) per bucket and overall.
    """
    router = Router.load(bundle, threads=threads, quantized=quantized)
    mix = prompt_mix(router, decisions, seed)
    ms = time_decisions(router, [p for _, p, _ in mix], warmup=min(200, decisions))
    names = np.array([b for b, _, _ in mix])
    tokens = np.array([t for _, _, t in mix])
    overall = _percentiles(ms)
    figures = {
        "model": "int8" if quantized else "fp32", "threads": threads, "batch": 1, "decisions": decisions,
        "max_tokens": router.spec["max_tokens"], "budget_ms": budget_ms,
        "passed": None if budget_ms is None else overall["p99"] <= budget_ms,
        "buckets": {b: {**_percentiles(ms[names == b]), "median_tokens": int(np.median(tokens[names == b]))}
                    for b in BUCKETS if (names == b).any()},
        "overall": overall,
    }
    if show:
        _print(figures, Path(bundle))
    if figures["passed"] is False:
        raise GateError(f"latency gate failed: p99 {overall['p99']:.3f} ms > budget {budget_ms:g} ms "
                        f"({figures['model']}, batch 1, {threads} thread{'s' * (threads > 1)})")
    return figures


def _print(figures: dict, bundle: Path) -> None:
    from rich.table import Table

    budget = figures["budget_ms"]
    table = Table(title=f"{bundle} · {figures['model']} · batch 1 · {figures['threads']} thread(s) · ms per decision",
                  caption=None if budget is None else f"budget: p99 ≤ {budget:g} ms")
    for col in ("bucket", "n", "median tokens", "p50", "p95", "p99", "max"):
        table.add_column(col, justify="left" if col == "bucket" else "right")
    for b, f in [*figures["buckets"].items(), ("overall", figures["overall"])]:
        p99 = f"{f['p99']:.3f}"
        if b == "overall" and budget is not None:
            p99 = f"[{'green' if f['p99'] <= budget else 'red'}]{p99}[/]"
        table.add_row(b, str(f["n"]), str(f.get("median_tokens", "")), f"{f['p50']:.3f}", f"{f['p95']:.3f}",
                      p99, f"{f['max']:.3f}")
    console.print(table)
