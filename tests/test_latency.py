"""The latency gate: a seeded prompt mix over four length buckets, per-bucket percentiles, exit 1 over budget."""
from __future__ import annotations

import json

import pytest

from pipeline.common import GateError
from pipeline.latency import bucket_ranges, check_latency, prompt_mix
from pipeline.runtime import Router

from .test_runtime import tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("lat") / "bundle", max_tokens=64)[0]


def test_prompt_mix_covers_every_bucket_and_is_seeded(bundle):
    router = Router.load(bundle)
    mix = prompt_mix(router, 80, seed=3)
    assert mix == prompt_mix(router, 80, seed=3) and mix != prompt_mix(router, 80, seed=4)
    ranges = bucket_ranges(64)
    for name, prompt, tokens in mix:
        lo, hi = ranges[name]
        assert tokens < hi and (tokens >= lo or name == "short")
        assert tokens == len(router.tokenizer.encode(prompt, add_special_tokens=False).ids)  # the library's count
    counts = {b: sum(m[0] == b for m in mix) for b in ranges}
    assert min(counts.values()) >= 15 and max(t for *_, t in mix) >= 2000


def test_bucket_ranges_follow_max_tokens():
    assert bucket_ranges(128) == {"short": (1, 32), "medium": (32, 128), "long": (128, 2000),
                                  "very long": (2000, 4000)}
    assert list(bucket_ranges(16)) == ["short", "long", "very long"]


def test_check_latency_reports_percentiles(bundle):
    figures = check_latency(bundle, budget_ms=10_000, decisions=60, show=False)
    assert figures["passed"] is True and figures["model"] == "int8" and figures["threads"] == 1
    assert set(figures["buckets"]) == {"short", "medium", "long", "very long"}
    assert sum(b["n"] for b in figures["buckets"].values()) == figures["overall"]["n"] == 60
    assert figures["buckets"]["very long"]["median_tokens"] >= 2000
    for f in [*figures["buckets"].values(), figures["overall"]]:
        assert 0 < f["p50"] <= f["p95"] <= f["p99"] <= f["max"]
        assert 0 < f["cpu_p50"] <= f["cpu_p99"] <= f["max"] * 1.05  # CPU time fits inside wall time
    json.dumps(figures, allow_nan=False)  # stored in router.json as is


def test_over_budget_raises_gate_error(bundle):
    for clock in ("wall", "cpu"):
        with pytest.raises(GateError, match=rf"{clock} p99 .* ms > budget 1e-06 ms") as e:
            check_latency(bundle, budget_ms=1e-6, decisions=20, clock=clock, show=False)
        assert e.value.exit_code == 1
    assert check_latency(bundle, budget_ms=None, decisions=20, show=False)["passed"] is None


def test_cli_check_latency_exit_codes(bundle, cli):
    code, out = cli("check-latency", bundle, "--budget-ms", "10000", "--decisions", "20", "--fp32")
    assert code == 0 and "very long" in out and "fp32" in out
    code, out = cli("check-latency", bundle, "--budget-ms", "0.000001", "--decisions", "20", "--clock", "cpu")
    assert code == 1 and "latency gate failed: cpu p99" in out
    assert cli("check-latency", bundle, "--clock", "sundial")[0] == 2
