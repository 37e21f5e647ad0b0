"""Single-decision latency of the teacher and the students, fp32 and int8, into bench/results/latency.md.

    python bench/latency.py                       # 1000 decisions per student and precision, 200 for the teacher
    python bench/latency.py --decisions 200 --no-write

Each router goes through the pipeline's own exporter (`to_onnx`, `quantize`, `write_bundle`) and is
timed by `pipeline.latency` exactly as the gate times it, each in a fresh interpreter: `Router.route` on one prompt at a time,
one intra-op thread, tokenization included, over the seeded four-bucket prompt mix (a share of it
non-ASCII). When ../shared/data is there, as many real prompts from it are timed as well.
Students have random weights at the configured sizes (latency does not depend on weight values);
the teacher is the packaged all-MiniLM-L6-v2 encoder with a head over its normalised mean pool.
Goal: int8 student p99 ≤ 0.5 ms (the gate's default budget is 1 ms).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import StudentConfig, load_config  # noqa: E402
from pipeline.encoders import EmbeddingRouter, build_student, mean_pool, teacher_path, tokenizer_file  # noqa: E402
from pipeline.export import FP32, INT8, QUANT_RECIPES, quantize, to_onnx, write_bundle  # noqa: E402
from pipeline.tokenization import make_spec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "latency.md"
GOAL_MS = 0.5


class TeacherRouter(nn.Module):
    """The teacher as a router: encoder, normalised mean pool, the teacher head."""

    def __init__(self, path: str, hidden: int, n_models: int = 2):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        self.head = EmbeddingRouter(self.encoder.config.hidden_size, hidden, n_models)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1))


def routers() -> list[tuple[str, nn.Module, dict]]:
    """(label, module, tokenizer spec) for the teacher and each student family."""
    cfg = load_config()
    torch.manual_seed(0)
    vocab = 30522
    out = [("teacher: all-MiniLM-L6-v2 (6 layers, 384 wide) + head",
            TeacherRouter(teacher_path(cfg.teacher.path), cfg.teacher.head_hidden),
            make_spec(cfg.teacher.max_tokens, "head"))]
    members = StudentConfig().members
    students = [
        (f"student: static 30522×256, attention pooling, MLP head, {members} members averaged (default)",
         StudentConfig(family="static")),
        ("student: static 30522×256, attention pooling, MLP head, one member", StudentConfig(family="static", members=1)),
        ("student: transformer 2 layers × 128", StudentConfig(family="transformer", dim=128, layers=2, heads=4, members=1)),
        ("student: transformer 2 layers × 256", StudentConfig(family="transformer", members=1)),
    ]
    for label, s in students:
        out.append((label, build_student(s, vocab, 2, pretrained_init=False).eval(),
                    make_spec(s.max_tokens, s.truncation, s.head_fraction)))
    return out


def real_prompts(shared: Path, n: int, seed: int = 0) -> list[str]:
    import pandas as pd

    prompts = pd.read_csv(shared / "routellm_mmlu.csv")["prompt"].astype(str).tolist()
    prompts += pd.read_parquet(shared / "alpacaeval_pairwise.parquet")["prompt"].astype(str).unique().tolist()
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.choice(len(prompts), size=min(n, len(prompts)), replace=False)]


def measure(decisions: int, teacher_decisions: int, shared: Path | None, n_real: int) -> list[dict]:
    torch.set_num_threads(1)
    real = real_prompts(shared, n_real) if shared else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        for i, (label, net, spec) in enumerate(routers()):
            stage = Path(tmp) / str(i)
            stage.mkdir()
            to_onnx(net, stage / FP32)
            quantize(stage / FP32, stage / INT8, embeddings=QUANT_RECIPES[0][1])
            meta = {"name": f"bench{i}", "models": [{"name": "weak", "cost": 1.0, "index": 0},
                                                     {"name": "strong", "cost": 10.0, "index": 1}],
                    "tokenizer": {**spec, "source": str(tokenizer_file())},
                    "decision": {"kind": "pair", "weak": "weak", "strong": "strong", "thresholds": {"0.5": 0.5}}}
            bundle = write_bundle(stage / "bundle", stage / FP32, stage / INT8, meta)
            for quantized in (True, False):
                print(f"{label} · {'int8' if quantized else 'fp32'}", flush=True)
                n = teacher_decisions if label.startswith("teacher") else decisions
                f = in_fresh_process(bundle, n, quantized, real[:n] if real else None, Path(tmp))
                row = {"router": label, "precision": f["model"], "max_tokens": spec["max_tokens"], "decisions": n,
                       "mb": (bundle / (INT8 if quantized else FP32)).stat().st_size / 1e6, **f["overall"],
                       "bucket_p99": {b: v["p99"] for b, v in f["buckets"].items()}}
                if real:
                    row["real_p50"], row["real_p99"] = f["real_p50"], f["real_p99"]
                rows.append(row)
    return rows


def in_fresh_process(bundle: Path, decisions: int, quantized: bool, real: list[str] | None, tmp: Path) -> dict:
    """`check_latency` (and real prompts timed the same way) in a new interpreter, as `prerouter check-latency`
    runs: in this process, torch's export and the teacher's heap make the first router measured here slower."""
    import json
    import subprocess

    (tmp / "real.json").write_text(json.dumps(real))
    code = f"""
import json, numpy as np
from pipeline.latency import check_latency, time_decisions
from pipeline.runtime import Router
f = check_latency({str(bundle)!r}, budget_ms=None, decisions={decisions}, quantized={quantized}, show=False)
real = json.load(open({str(tmp / "real.json")!r}))
if real:
    wall, _ = time_decisions(Router.load({str(bundle)!r}, quantized={quantized}), real)
    f["real_p50"], f["real_p99"] = float(np.percentile(wall, 50)), float(np.percentile(wall, 99))
print(json.dumps(f))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    import onnxruntime
    import tokenizers

    return (f"{cpu}, {os.cpu_count()} logical cores; Python {platform.python_version()}, onnxruntime "
            f"{onnxruntime.__version__}, tokenizers {tokenizers.__version__}")


def markdown(rows: list[dict], load: tuple[float, float]) -> str:
    real = "real_p99" in rows[0]
    head = ["router", "precision", "max tokens", "MB", "decisions", "p50", "p95", "p99", "cpu p50", "cpu p99",
            "p99 short", "p99 medium", "p99 long", "p99 very long"] + (["real p50", "real p99"] if real else [])
    lines = ["# Single-decision latency", "",
             f"Machine: {machine()}. Load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after: on a shared "
             "machine the wall-clock tail (p95/p99) includes time the OS gave to other processes; the thread "
             "CPU columns (`cpu p50/p99`) are the router's own work.", "",
             "`Router.route(prompt)`: batch 1, one intra-op thread, tokenization included; timed decisions after "
             "warm-up over the seeded prompt mix of `pipeline.latency` (four length buckets, "
             "counted in tokens before truncation: short < 32, medium < max tokens, long < 2000, very long ≥ 2000; "
             "12% of prompts non-ASCII). Milliseconds."
             + (" `real`: prompts sampled from MMLU and AlpacaEval (../shared/data), as many as decisions."
                if real else ""), "",
             f"Goal: int8 student p99 ≤ {GOAL_MS} ms.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = r["bucket_p99"]
        cells = [r["router"], r["precision"], str(r["max_tokens"]), f"{r['mb']:.1f}", str(r["decisions"]),
                 *(f"{r[k]:.3f}" for k in ("p50", "p95", "p99", "cpu_p50", "cpu_p99")),
                 *(f"{b[k]:.3f}" if k in b else "–" for k in ("short", "medium", "long", "very long"))]
        if real:
            cells += [f"{r['real_p50']:.3f}", f"{r['real_p99']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Reproduce: `make bench-latency` (or `python bench/latency.py`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=1000)
    parser.add_argument("--teacher-decisions", type=int, default=200, help="the teacher is two orders of magnitude slower")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    shared = args.shared if (args.shared / "routellm_mmlu.csv").is_file() else None
    before = os.getloadavg()[0]
    rows = measure(args.decisions, args.teacher_decisions, shared, args.decisions)
    text = markdown(rows, (before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
