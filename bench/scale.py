"""Scale: the whole pipeline on synthetic pairwise data, timed and measured stage by stage.

    python bench/scale.py                                    # 10k, 30k, 100k prompts over 20 models on cpu
    python bench/scale.py --device cuda                      # the same on one GPU, its own section
    python bench/scale.py --ingest-only                      # ingest + label of 250k, 500k, 1M battles over 50 models
    python bench/scale.py --sizes 300,600 --models 5 --set train.max_epochs=1 --out /tmp/scale.md   # smoke run

Pipeline (the default). For each size, a seeded parquet of `size` prompts with 5 battles each between
random pairs of `--models` models (`make_pairwise`: prompts of 10-120 words, mostly drawn from one of
8 topic vocabularies; each model has its own skill per topic and stronger models gain on longer
prompts, so the router has something to learn; 10% ties; per-side costs) runs through the pipeline's
own entry functions, each a stage timed on its own:

    ingest         pipeline.ingest.ingest
    label          pipeline.label.label
    teacher        pipeline.data.prepare: labels loaded and the teacher's embeddings computed (templates
                   learned on the train split and compacted), so the train stage finds them cached
    student init   pipeline.encoders.static_vectors (teacher_word_embeddings for a transformer student):
                   the teacher-derived token vectors the student starts from; a fixed cost, not growing with n
    train          pipeline.train.train (teacher head, group-smoothing choice, student, cluster prior)
    export         pipeline.export.export (ONNX fp32 + int8, parity gate, MLflow registration)
    evaluate       pipeline.evaluate.evaluate on the int8 bundle (router, teacher, baselines on test)

Every size runs in a fresh child process with its own data, models, MLflow and cache folders
(PREROUTER_DATA_DIR, PREROUTER_MODELS_DIR, PREROUTER_MLRUNS_DIR, PREROUTER_CACHE_DIR; no inherited
MLFLOW_TRACKING_URI), so the teacher embeddings and token vectors are computed from scratch (unless
`--reuse-cache`). `startup` is the child's import of the libraries the stages share (torch, Lightning,
MLflow, transformers, onnxruntime, datasets, scikit-learn); the default config
(pipeline/configs/default.yaml) is used, with teacher.device and train.accelerator set by `--device`
(cuda: train.precision=bf16-mixed) and then any `--set` overrides. Peak RSS per stage is the kernel's
VmHWM after resetting it at the stage's start (writing 5 to /proc/self/clear_refs; where that is
refused, the largest VmRSS sampled every 20 ms); the size's peak RSS is the largest stage's (the reset
also resets what `ru_maxrss` reports); on cuda, peak GPU memory per stage is
torch.cuda.max_memory_allocated. The child checks that train and evaluate found every teacher
embedding in the cache (else it says so in the report). Growth per stage is b of time = a * n^b, a
least-squares fit of log time on log prompts over the measured sizes; a stage's time at 1M prompts is
projected from the largest size along that slope, t(n_max) * (1M / n_max)^max(b, 0);
peak RSS is projected linearly.
Goals: on cpu, 100k prompts end to end in at most 60 min with at most 8 GiB peak RSS; on one GPU, at
most 30 min projected for 1M prompts.

Ingest only (`--ingest-only`, the earlier form of this benchmark). Each size is a seeded parquet of
battles between random pairs of 50 models whose strengths are evenly spaced, over a pool of
`rows // 10` distinct prompts of 10-80 words, written in row groups of 100k rows (`datasets` decodes a
parquet file one row group at a time). Ingest and label run in a fresh child process each, which
reports its own wall time and peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), so one size's
memory never hides another's, plus the peak anonymous RSS sampled from /proc: ru_maxrss also counts
the pages of the memory-mapped Arrow input that have been read, which the kernel can drop at will.
Goal: 1M battles in at most 3 minutes and 4 GB peak RSS, with memory roughly flat as rows grow.

Results: `--out` (default bench/results/scale.md) holds one section per measurement (ingest only,
pipeline on cpu, pipeline on cuda); a run rewrites its own section and keeps the others. The same
numbers, per size and per stage, go to the JSON file beside it (scale.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "results" / "scale.md"
N_MODELS = 50
GOAL_SECONDS, GOAL_GB = 180, 4.0
WORDS = ("explain write compute prove summarize translate compare design debug list describe why how what "
         "model data graph prime string function poem essay email market theory cell river planet war "
         "history algorithm vector matrix network protein language music city law").split()

PIPELINE_SIZES = [10_000, 30_000, 100_000]
INGEST_SIZES = [250_000, 500_000, 1_000_000]
PROJECT_TO = 1_000_000
CPU_GOAL_PROMPTS, CPU_GOAL_S, CPU_GOAL_GIB = 100_000, 3600, 8.0
GPU_GOAL_S = 1800
STAGES = ("ingest", "label", "teacher", "student_init", "train", "export", "evaluate")
TITLES = {"startup": "startup", "ingest": "ingest", "label": "label", "teacher": "teacher emb.",
          "student_init": "student init", "train": "train", "export": "export", "evaluate": "evaluate"}
SECTIONS = ("ingest", "pipeline-cpu", "pipeline-cuda")  # order of the sections in the results file
DATASET = "scale"


# ----------------------------------------------------------------------------- ingest only (1M battles)

def make_battles(path: Path, rows: int, seed: int = 0) -> None:
    """A seeded pairwise parquet: `rows` battles, 50 models, rows // 10 distinct prompts."""
    rng = np.random.default_rng(seed)
    n_prompts = max(rows // 10, 1)
    words = np.array(WORDS)
    lengths = rng.integers(10, 81, size=n_prompts)
    pool = [f"#{i} " + " ".join(words[rng.integers(len(words), size=k)]) for i, k in enumerate(lengths)]
    strength = np.linspace(-2, 2, N_MODELS)
    a = rng.integers(N_MODELS, size=rows)
    b = (a + rng.integers(1, N_MODELS, size=rows)) % N_MODELS
    p_a = 1 / (1 + np.exp(strength[b] - strength[a]))
    u = rng.random(rows)
    winner = np.where(u < 0.1, "tie", np.where(u < 0.1 + 0.9 * p_a, "model_a", "model_b"))
    names = np.array([f"model-{i:02d}" for i in range(N_MODELS)])
    table = pa.table({
        "prompt": pa.array(pool).take(pa.array(rng.integers(n_prompts, size=rows))),
        "model_a": names[a], "model_b": names[b], "winner": winner,
    })
    pq.write_table(table, path, row_group_size=100_000)


CHILD = """
import json, resource, sys, threading, time
from pipeline.ingest import ingest
from pipeline.label import label

peak_anon = 0
def sample():
    global peak_anon
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon = max(peak_anon, int(line.split()[1]))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter(); ingest(sys.argv[1], name="scale", force=True)
t1 = time.perf_counter(); stats = label("scale", force=True)
t2 = time.perf_counter()
print(json.dumps({"ingest_s": t1 - t0, "label_s": t2 - t1, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_anon_mb": peak_anon / 1024, "n_prompts": stats["n_prompts"], "n_models": len(stats["models"])}))
"""


def measure(path: Path) -> dict:
    env = {**os.environ, "PREROUTER_DATA_DIR": str(OUT / "data")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"ingest + label failed on {path}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "process_s": wall}


def report(rows: list[dict], load: tuple[float, float], command: str) -> str:
    import datasets
    import pyarrow

    big = rows[-1]
    ok = big["process_s"] <= GOAL_SECONDS and big["peak_rss_mb"] <= GOAL_GB * 1024
    lines = [
        "## Ingest + label of pairwise battles",
        "",
        f"Generated by `{command}` on {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, pyarrow {pyarrow.__version__}, datasets {datasets.__version__}.",
        f"Data: seeded battles between random pairs of {N_MODELS} models (10% ties) over `rows // 10` distinct "
        "prompts of 10-80 words, parquet row groups of 100k rows. Each size runs in a fresh process; `total` "
        "is that process's wall time including Python and library start-up; peak RSS is its `ru_maxrss`, "
        "which includes the read pages of the memory-mapped input; peak anon is the largest anonymous "
        "(heap) RSS sampled every 20 ms.",
        f"Load average (1 min) before / after the runs: {load[0]:.1f} / {load[1]:.1f} on a machine shared with "
        "other work, so times are upper bounds.",
        "",
        "| battles | prompts | models | ingest s | label s | total s | peak RSS MB | peak anon MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['rows']:,} | {r['n_prompts']:,} | {r['n_models']} | {r['ingest_s']:.1f} | "
                     f"{r['label_s']:.1f} | {r['process_s']:.1f} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['peak_anon_mb']:,.0f} |")
    lines += ["", f"Goal for {big['rows']:,} battles: at most {GOAL_SECONDS} s and {GOAL_GB:g} GB peak RSS: "
              + ("**met**." if ok else "**not met**.")]
    if len(rows) > 1:
        small = rows[0]
        lines += ["", f"From {small['rows']:,} to {big['rows']:,} battles (x{big['rows'] / small['rows']:g}) peak "
                  f"anonymous memory grew x{big['peak_anon_mb'] / small['peak_anon_mb']:.2f}: no per-row Python "
                  "objects; what grows is the per-battle numpy columns and the output, whose prompts x models "
                  "cells grow with the prompt pool."]
    lines.append("")
    return "\n".join(lines)


def run_ingest_only(args, command: str) -> tuple[str, dict]:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    load_before = os.getloadavg()[0]
    for size in args.sizes or INGEST_SIZES:
        path = OUT / f"battles_{size}.parquet"
        if not path.is_file():
            make_battles(path, size)
        result = {"rows": size, **measure(path)}
        print(json.dumps(result), flush=True)
        rows.append(result)
    load = (load_before, os.getloadavg()[0])
    return report(rows, load, command), {"command": command, "load_average": load, "sizes": rows}


# ----------------------------------------------------------------------------- synthetic pairwise prompts

TOPICS = {
    "math": "integral derivative prime theorem proof equation matrix vector probability polynomial geometry "
            "triangle limit series convergence eigenvalue algebra modular lemma inequality logarithm fraction",
    "code": "python function class bug compile runtime error stack array pointer recursion loop thread async "
            "api database query index regex test refactor memory exception",
    "science": "cell protein gene enzyme molecule atom electron photon gravity orbit planet climate carbon "
               "reaction energy entropy quantum evolution species virus bacteria neuron",
    "history": "empire war treaty revolution dynasty king queen colony republic senate medieval ancient battle "
               "parliament constitution independence migration trade plague crusade",
    "writing": "poem story essay novel character plot dialogue metaphor rhyme verse chapter narrator tone draft "
               "edit headline letter speech sonnet haiku",
    "business": "market revenue profit budget invoice tax customer sales strategy startup investor equity loan "
                "interest inflation pricing contract supplier forecast quarter",
    "health": "diet exercise sleep symptom fever headache vitamin calorie muscle injury therapy dose allergy "
              "heart blood pressure stress anxiety recovery",
    "travel": "flight hotel visa passport itinerary museum beach mountain train luggage airport restaurant "
              "currency weather tour island city map hostel",
}
COMMON = ("the a an of to in for with on about and or but that this my your is are was can should would how "
          "why what when which please explain describe write list compare summarize give show help me best "
          "way difference between example simple detailed short step").split()
OPENERS = ("Explain", "Write", "How do I", "Why does", "Compare", "Summarize", "Can you help me with",
           "What is the difference between", "Give me an example of", "List", "Fix", "Plan")
BATTLES_PER_PROMPT = 5


def make_pairwise(path: Path, n_prompts: int, n_models: int, battles_per_prompt: int = BATTLES_PER_PROMPT,
                  seed: int = 0) -> dict:
    """A seeded pairwise parquet (prompt, model_a, model_b, winner, cost_a, cost_b): `n_prompts` distinct
    prompts, `battles_per_prompt` battles each between two distinct random models, rows shuffled.

    A prompt has a topic; its 10-120 words (log-normal around 40) are 55% from the topic's vocabulary,
    10% from another topic's and 35% common words, after an opener. Model m's skill on topic t is
    strength[m] + Normal(0, 0.8) (strengths evenly spaced in [-1.5, 1.5]), plus 0.5 * strength[m] *
    (words - 40) / 40 on the prompt: stronger models gain on long prompts. A battle is a tie with
    probability 0.1, else won by a with probability sigmoid(skill_a - skill_b). A call costs
    price[m] * (1.3 * words + 200) / 1e6, prices log-spaced from 0.1 to 10 per 1M tokens by strength."""
    rng = np.random.default_rng(seed)
    topic_words = [np.array(v.split()) for v in TOPICS.values()]
    common = np.array(COMMON)
    n_topics = len(topic_words)
    topic = rng.integers(n_topics, size=n_prompts)
    length = np.clip(np.rint(rng.lognormal(np.log(40), 0.6, size=n_prompts)), 10, 120).astype(int)
    total = int(length.sum())
    owner = np.repeat(topic, length)
    source = rng.random(total)
    other = (owner + rng.integers(1, n_topics, size=total)) % n_topics
    pick = rng.random(total)
    words = np.empty(total, dtype=object)
    for t in range(n_topics):  # each word from its topic's vocabulary, another topic's, or the common words
        own, off = (owner == t) & (source < 0.55), (other == t) & (source >= 0.55) & (source < 0.65)
        words[own] = topic_words[t][(pick[own] * len(topic_words[t])).astype(int)]
        words[off] = topic_words[t][(pick[off] * len(topic_words[t])).astype(int)]
    rest = source >= 0.65
    words[rest] = common[(pick[rest] * len(common)).astype(int)]
    openers = rng.integers(len(OPENERS), size=n_prompts)
    ends = np.cumsum(length)
    prompts = [f"{OPENERS[o]} {' '.join(words[e - k:e])}{'?' if o % 3 == 2 else '.'}"
               for o, e, k in zip(openers, ends, length)]

    strength = np.linspace(-1.5, 1.5, n_models)
    skill = strength[:, None] + rng.normal(0, 0.8, size=(n_models, n_topics))
    price = np.logspace(-1, 1, n_models)  # per 1M tokens, the strongest model the priciest
    rows = rng.permutation(np.repeat(np.arange(n_prompts), battles_per_prompt))
    a = rng.integers(n_models, size=rows.size)
    b = (a + rng.integers(1, n_models, size=rows.size)) % n_models
    long = 0.5 * (length[rows] - 40) / 40
    margin = skill[a, topic[rows]] - skill[b, topic[rows]] + long * (strength[a] - strength[b])
    u = rng.random(rows.size)
    winner = np.where(u < 0.1, "tie", np.where(rng.random(rows.size) < 1 / (1 + np.exp(-margin)), "model_a", "model_b"))
    tokens = 1.3 * length[rows] + 200
    names = np.array([f"model-{i:02d}" for i in range(n_models)])
    pq.write_table(pa.table({
        "prompt": pa.array(prompts).take(pa.array(rows)), "model_a": names[a], "model_b": names[b],
        "winner": winner, "cost_a": np.round(price[a] * tokens / 1e6, 9),
        "cost_b": np.round(price[b] * tokens / 1e6, 9),
    }), path, row_group_size=100_000)
    return {"prompts": n_prompts, "battles": int(rows.size), "models": n_models, "mean_words": float(length.mean())}


# ----------------------------------------------------------------------------- the child: one size, every stage

class Memory:
    """Peak RSS per stage: VmHWM reset at the stage's start through /proc/self/clear_refs, else the largest
    VmRSS sampled every 20 ms; also the largest anonymous RSS sampled, and on cuda the peak GPU memory."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak_rss = self.peak_anon = 0
        self.exact = True
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def _status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])  # kB
        return out

    def _sample(self) -> None:
        while True:
            s = self._status()
            self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
            self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
            time.sleep(0.02)

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.exact = False
        s = self._status()
        self.peak_rss, self.peak_anon = s.get("VmRSS", 0), s.get("RssAnon", 0)
        if self.cuda:
            import torch

            if torch.cuda.is_initialized():  # else nothing to reset, and creating the context here would
                torch.cuda.reset_peak_memory_stats()  # leave its seconds out of every stage's time

    def peaks(self) -> dict:
        s = self._status()
        rss = s.get("VmHWM", 0) if self.exact else max(self.peak_rss, s.get("VmRSS", 0))
        out = {"peak_rss_mib": rss / 1024, "peak_anon_mib": max(self.peak_anon, s.get("RssAnon", 0)) / 1024}
        if self.cuda:
            import torch

            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def _shards(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")}


def child(spec_file: str) -> None:
    """One size, every stage, in this fresh process; progress and results go to spec["result"] as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    result_file = Path(spec["result"])
    cuda = spec["device"] == "cuda"
    t_start = time.perf_counter()
    out: dict = {"stages": {}, "notes": []}

    def save() -> None:
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, result_file)

    memory = Memory(cuda)

    def stage(key: str, fn):
        memory.reset()
        t0 = time.perf_counter()
        value = fn()
        out["stages"][key] = {"s": time.perf_counter() - t0, **memory.peaks()}
        print(f"[scale] {key}: {out['stages'][key]['s']:.1f} s", file=sys.stderr, flush=True)
        save()
        return value

    from pipeline.common import PrerouterError

    try:
        def startup():
            import datasets  # noqa: F401  the libraries every stage shares, imported once, up front
            import lightning  # noqa: F401
            import mlflow  # noqa: F401
            import onnxruntime  # noqa: F401
            import sklearn.cluster  # noqa: F401
            import torch
            import transformers  # noqa: F401

            import pipeline.evaluate  # noqa: F401
            import pipeline.export  # noqa: F401
            import pipeline.ingest  # noqa: F401
            import pipeline.label  # noqa: F401
            import pipeline.train  # noqa: F401
            from pipeline.config import check_machine, load_config

            cfg = load_config(spec["config"], spec["overrides"])
            check_machine(cfg.train)
            if cuda:
                torch.zeros(1, device="cuda")  # the CUDA context, created here rather than in the first stage
            return cfg

        cfg = stage("startup", startup)
        out["config"] = cfg.to_dict()
        out["torch_threads"] = __import__("torch").get_num_threads()
        from pipeline.data import prepare
        from pipeline.encoders import cache_dir, encoder_key, static_vectors, teacher_word_embeddings
        from pipeline.evaluate import evaluate
        from pipeline.export import export
        from pipeline.ingest import ingest
        from pipeline.label import label
        from pipeline.train import train

        stage("ingest", lambda: ingest(spec["data"], name=DATASET, force=True))
        stats = stage("label", lambda: label(DATASET, cfg.label, force=True))
        out["labels"] = {"prompts": stats["n_prompts"], "models": len(stats["models"]), "pair": stats.get("pair")}
        teacher_dir = cache_dir() / "teacher" / encoder_key(cfg.teacher.path, cfg.teacher.max_tokens)
        before = _shards(teacher_dir)

        def embed():  # `prepare` as `train` calls it; its time is the teacher's embeddings
            prep = prepare(DATASET, cfg)
            templates = prep.templates
            learned = 0 if templates is None else len(templates["prefixes"]) + len(templates["suffixes"])
            out["teacher"] = {"prompts": len(prep.prompts), "dim": int(prep.teacher_emb.shape[1]),
                              "templates": learned}

        stage("teacher", embed)
        out["teacher"]["computed_shards"] = len(_shards(teacher_dir) - before)
        if spec["reuse_cache"] and not out["teacher"]["computed_shards"]:
            out["notes"].append("teacher embeddings were already cached (--reuse-cache): not computed from scratch")
        if cfg.student.family == "static":
            stage("student_init", lambda: static_vectors(cfg.teacher.path, cfg.student.dim))
        else:
            stage("student_init", lambda: teacher_word_embeddings(cfg.teacher.path, cfg.student.dim))
        cached = _shards(cache_dir())
        stage("train", lambda: train(DATASET, cfg, force=True))
        bundle = stage("export", lambda: export(DATASET, config=cfg))
        result = stage("evaluate", lambda: evaluate(DATASET, bundle=bundle))
        late = sorted(_shards(cache_dir()) - cached)
        if late:
            out["notes"].append(f"train or evaluate wrote {len(late)} cache files the earlier stages had not "
                                "(teacher embeddings or token vectors not matched): their time is in those stages")
        routers = result.get("routers", {})
        router = next((v for k, v in routers.items() if k.startswith("router")), {})
        out["quality"] = {"router_apgr": router.get("apgr"), "teacher_apgr": routers.get("teacher", {}).get("apgr"),
                          "n_test": result.get("n_test"), "win_accuracy": result.get("win_accuracy")}
    except PrerouterError as e:
        out["error"] = str(e)
        save()
        sys.exit(2)
    out["memory_exact"] = memory.exact
    out["process_s"] = time.perf_counter() - t_start
    # clear_refs also resets the high-water mark ru_maxrss reads: the process's peak is the largest stage's
    out["peak_rss_mib"] = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               *(v["peak_rss_mib"] for v in out["stages"].values())])
    out["done"] = True
    save()


# ----------------------------------------------------------------------------- the parent: sizes, fits, report

def machine(device: str) -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        mem_kb = 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cpus": os.cpu_count(), "usable_cpus": usable, "memory_gib": mem_kb / 2**20,
            "platform": platform.platform(), "python": platform.python_version(), "gpu": None}
    import torch

    info["torch"] = torch.__version__
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda, gpus=torch.cuda.device_count())
    for lib in ("lightning", "onnxruntime", "transformers"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            pass
    return info


def machine_line(m: dict) -> str:
    text = (f"{m['cpu']}, {m['cpus']} CPUs ({m['usable_cpus']} usable), {m['memory_gib']:.1f} GiB RAM, "
            f"{m['platform']}; ")
    if m.get("gpu"):
        text += f"GPU: {m['gpu']} ({m['gpu_memory_gib']:.0f} GiB, CUDA {m['cuda']}); "
    else:
        text += "no GPU used; "
    return text + ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "lightning", "onnxruntime", "transformers")
                            if m.get(k))


def power_fit(n: list[float], t: list[float]) -> tuple[float, float] | None:
    """(a, b) of t = a * n^b, least squares in log-log; None without two sizes with positive times."""
    pts = [(x, y) for x, y in zip(n, t) if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    b, log_a = np.polyfit(np.log([x for x, _ in pts]), np.log([y for _, y in pts]), 1)
    return float(math.exp(log_a)), float(b)


def linear_fit(n: list[float], y: list[float]) -> tuple[float, float] | None:
    if len(set(n)) < 2:
        return None
    slope, icpt = np.polyfit(n, y, 1)
    return float(icpt), float(slope)


def fits(rows: list[dict]) -> dict:
    """Per stage: a, b, projected seconds at PROJECT_TO prompts; the total; peak RSS projected linearly."""
    n = [r["prompts"] for r in rows]
    big = max(rows, key=lambda r: r["prompts"])
    out: dict = {"stages": {}, "project_to": PROJECT_TO}
    total = 0.0
    for key in STAGES:
        fit = power_fit(n, [r["stages"][key]["s"] for r in rows])
        if fit is None:
            out["stages"][key] = None
            continue
        a, b = fit
        # from the largest measured size along the fitted slope (never shrinking): the least-squares line
        # need not pass through the point that is nearest the projection
        projected = big["stages"][key]["s"] * (PROJECT_TO / big["prompts"]) ** max(b, 0.0)
        out["stages"][key] = {"a": a, "b": b, "projected_s": projected}
        total += projected
    startup = float(np.mean([r["stages"]["startup"]["s"] for r in rows]))
    out["stages"]["startup"] = {"a": startup, "b": 0.0, "projected_s": startup}
    out["projected_total_s"] = total + startup if all(out["stages"][k] for k in STAGES) else None
    mem = linear_fit(n, [r["peak_rss_mib"] for r in rows])
    out["projected_peak_rss_mib"] = None if mem is None else max(mem[0] + mem[1] * PROJECT_TO,
                                                                 big["peak_rss_mib"])
    return out


def _seconds(s: float) -> str:
    return f"{s:,.1f}" if s < 10 else f"{s:,.0f}"


def _minutes(s: float) -> str:
    return f"{s:,.0f} s ({s / 60:,.1f} min)" if s >= 60 else f"{s:.1f} s"


def pipeline_report(rows: list[dict], fit: dict, meta: dict) -> str:
    device = meta["device"]
    cols = ["startup", *STAGES]
    lines = [
        f"## Pipeline on {device}: ingest → label → teacher embeddings → train → export → evaluate",
        "",
        f"Generated by `{meta['command']}`.",
        f"Machine: {machine_line(meta['machine'])}.",
        f"Config: pipeline/configs/default.yaml{' + ' + meta['config_file'] if meta['config_file'] else ''} with "
        f"`{' '.join(meta['overrides'])}`; torch threads {rows[0].get('torch_threads', '?')}.",
        f"Data: {meta['models']} models, {meta['battles_per_prompt']} battles per prompt (seeded, "
        f"`make_pairwise`: 8 topics, per-topic skills, 10% ties, 10-120 words per prompt, mean "
        f"{rows[0]['data']['mean_words']:.0f}). Each size runs in a fresh process with its own data, models, "
        "MLflow and cache folders: teacher embeddings and token vectors computed from scratch"
        + (" unless noted" if meta["reuse_cache"] else "") + ". Seconds per stage; `total` is startup plus every "
        "stage; peak RSS is the size's process's largest.",
        f"Load average (1 min) before / after the runs: {meta['load'][0]:.1f} / {meta['load'][1]:.1f}"
        + (" on a machine shared with other work, so times are upper bounds." if meta["load"][0] > 1.5 else "."),
        "",
        "| prompts | battles | " + " | ".join(f"{TITLES[c]} s" for c in cols) + " | total s | peak RSS MiB |",
        "|---:|---:|" + "---:|" * (len(cols) + 2),
    ]
    for r in rows:
        total = sum(r["stages"][c]["s"] for c in cols)
        lines.append(f"| {r['prompts']:,} | {r['data']['battles']:,} | "
                     + " | ".join(f"{r['stages'][c]['s']:,.1f}" for c in cols)
                     + f" | **{total:,.1f}** | {r['peak_rss_mib']:,.0f} |")
    lines += ["", "Peak RSS per stage, MiB (VmHWM reset at each stage's start"
              + ("" if rows[0].get("memory_exact", True) else "; here sampled every 20 ms") + "):", "",
              "| prompts | " + " | ".join(TITLES[c] for c in cols) + " |", "|---:|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['prompts']:,} | " + " | ".join(f"{r['stages'][c]['peak_rss_mib']:,.0f}" for c in cols) + " |")
    if device == "cuda":
        lines += ["", "Peak GPU memory per stage, MiB (torch.cuda.max_memory_allocated):", "",
                  "| prompts | " + " | ".join(TITLES[c] for c in cols) + " |", "|---:|" + "---:|" * len(cols)]
        for r in rows:
            lines.append(f"| {r['prompts']:,} | "
                         + " | ".join(f"{r['stages'][c].get('peak_gpu_mib', 0):,.0f}" for c in cols) + " |")
    lines += ["", "Teacher embeddings: " + ", ".join(
        f"{r['prompts']:,} prompts at {r['teacher']['prompts'] / r['stages']['teacher']['s']:,.0f} prompts/s"
        for r in rows) + ".",
        "Routing quality on the test split, a check that every size trained a router (APGR of the weakest → "
        "strongest pair; accuracy predicting the winners of test battles against the global Bradley–Terry "
        "ranking's): " + "; ".join(f"{r['prompts']:,}: {_quality(r['quality'])}" for r in rows) + "."]
    notes = [f"{r['prompts']:,} prompts: {note}" for r in rows for note in r.get("notes", [])]
    if notes:
        lines += ["", "**Notes:** " + "; ".join(notes) + "."]

    sizes = ", ".join(f"{r['prompts']:,}" for r in rows)
    lines += ["", f"Growth per stage: b of time = a · n^b, fitted (least squares on log-log) over {sizes} prompts; "
              f"projected to {PROJECT_TO:,} prompts on this machine from the largest size along that slope, "
              "t(n_max) · (1M / n_max)^max(b, 0):", "", "| stage | b | projected s at 1M |", "|---|---:|---:|"]
    if len(rows) < 2:
        lines += ["| (one size: no fit) | | |"]
    else:
        for key in cols:
            f = fit["stages"][key]
            if key == "startup":
                lines.append(f"| startup | (constant) | {f['projected_s']:,.1f} |")
            elif f:
                lines.append(f"| {TITLES[key]} | {f['b']:.2f} | {_seconds(f['projected_s'])} |")
        if fit["projected_total_s"] is not None:
            lines.append(f"| **total** | | **{_minutes(fit['projected_total_s'])}** |")
        if fit["projected_peak_rss_mib"] is not None:
            lines += ["", f"Peak RSS at {PROJECT_TO:,} prompts, extrapolated linearly: "
                      f"{fit['projected_peak_rss_mib']:,.0f} MiB. A fit over a few sizes is a rough guide: "
                      "stages of a few seconds fit noise, and fixed costs inside a stage (loading the teacher, "
                      "MLflow's store) pull b down."]
    lines += ["", *goal_lines(rows, fit, device), ""]
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _quality(q: dict) -> str:
    text = f"router APGR {_fmt(q.get('router_apgr'))} (teacher {_fmt(q.get('teacher_apgr'))})"
    wins = q.get("win_accuracy") or {}
    router = next((v for k, v in wins.items() if k.startswith("router")), None)
    if router is not None:
        text += f", win accuracy {_fmt(router)} (Bradley–Terry {_fmt(wins.get('bradley_terry'))})"
    return text


def goal_lines(rows: list[dict], fit: dict, device: str) -> list[str]:
    out = []
    at = next((r for r in rows if r["prompts"] == CPU_GOAL_PROMPTS), None)
    if device == "cpu":
        if at is None:
            out.append(f"Goal on cpu, {CPU_GOAL_PROMPTS:,} prompts end to end in at most {CPU_GOAL_S // 60} min with "
                       f"at most {CPU_GOAL_GIB:g} GiB peak RSS: not measured at {CPU_GOAL_PROMPTS:,} prompts.")
        else:
            total = sum(at["stages"][c]["s"] for c in ("startup", *STAGES))
            ok = total <= CPU_GOAL_S and at["peak_rss_mib"] <= CPU_GOAL_GIB * 1024
            out.append(f"Goal on cpu, {CPU_GOAL_PROMPTS:,} prompts end to end in at most {CPU_GOAL_S // 60} min with "
                       f"at most {CPU_GOAL_GIB:g} GiB peak RSS: {_minutes(total)}, {at['peak_rss_mib']:,.0f} MiB: "
                       + ("**met**." if ok else "**not met**."))
    if device == "cuda":
        total = fit.get("projected_total_s")
        out.append(f"Goal on one GPU, {PROJECT_TO:,} prompts projected in at most {GPU_GOAL_S // 60} min: "
                   + ("no projection (fewer than two sizes)." if total is None else
                      f"{_minutes(total)}: " + ("**met**." if total <= GPU_GOAL_S else "**not met**.")))
    return out


def parse_sizes(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    sizes = []
    for v in values:
        for part in v.split(","):
            if part.strip():
                try:
                    n = int(part.strip().replace("_", ""))
                except ValueError:
                    sys.exit(f"--sizes: {part!r} is not a whole number")
                if n < 1:
                    sys.exit(f"--sizes: {n} must be at least 1")
                sizes.append(n)
    return sizes


def device_overrides(device: str) -> list[str]:
    if device == "cuda":
        return ["teacher.device=cuda", "train.accelerator=gpu", "train.precision=bf16-mixed"]
    return ["teacher.device=cpu", "train.accelerator=cpu"]


def require_cuda() -> None:
    """Exit with one line, not a traceback, when `--device cuda` cannot run here."""
    try:
        import torch
    except ImportError:
        sys.exit("--device cuda: torch is not installed in this environment")
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        sys.exit(f"--device cuda: torch sees no CUDA device on this machine (torch {torch.__version__}, {build}); "
                 "run with --device cpu, or on a machine with a GPU")


def run_size(size: int, args, overrides: list[str], work: Path) -> dict:
    root = work / f"n{size}"
    shutil.rmtree(root, ignore_errors=True)  # fresh data, models and MLflow store for every size
    root.mkdir(parents=True)
    cache = (Path(args.cache_dir).resolve() if args.cache_dir else work / "cache") / f"n{size}"
    if not args.reuse_cache:
        shutil.rmtree(cache, ignore_errors=True)
    data = work / f"pairwise_{size}p_{args.models}m_{args.battles_per_prompt}b_seed{args.seed}.parquet"
    info_file = data.with_suffix(".json")
    if not (data.is_file() and info_file.is_file()):
        print(f"generating {size:,} prompts over {args.models} models -> {data}", flush=True)
        info_file.write_text(json.dumps(make_pairwise(data, size, args.models, args.battles_per_prompt, args.seed)))
    info = json.loads(info_file.read_text())
    result_file, log = root / "result.json", root / "log.txt"
    spec = {"data": str(data), "device": args.device, "config": args.config, "overrides": overrides,
            "result": str(result_file), "reuse_cache": args.reuse_cache}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PREROUTER_DATA_DIR": str(root / "data"), "PREROUTER_MODELS_DIR": str(root / "models"),
           "PREROUTER_MLRUNS_DIR": str(root / "mlruns"), "PREROUTER_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    print(f"{size:,} prompts: running, log in {log}", flush=True)
    start = time.perf_counter()
    shown: set[str] = set()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(root / "spec.json")],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            while True:
                code = proc.poll()
                if result_file.is_file():
                    try:
                        partial = json.loads(result_file.read_text())
                    except ValueError:
                        partial = {}
                    for key, value in partial.get("stages", {}).items():
                        if key not in shown:
                            shown.add(key)
                            print(f"  {TITLES[key]:<13} {value['s']:9.1f} s  peak RSS {value['peak_rss_mib']:8,.0f} MiB",
                                  flush=True)
                if code is not None:
                    break
                time.sleep(2)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    wall = time.perf_counter() - start
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if code or not result.get("done"):
        if result.get("error"):
            sys.exit(f"{size:,} prompts: {result['error']}  (log: {log})")
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        sys.exit(f"{size:,} prompts: the run failed (exit {code}); end of {log}:\n{tail}")
    return {"prompts": size, "data": info, **result, "wall_s": wall}


def run_pipeline(args, command: str) -> tuple[str, dict]:
    if args.device == "cuda":
        require_cuda()
    from pipeline.common import PrerouterError
    from pipeline.config import load_config

    overrides = device_overrides(args.device) + list(args.set)
    try:
        load_config(args.config, overrides)  # a bad --set or --config fails here, before any data is written
    except PrerouterError as e:
        sys.exit(str(e))
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    info = machine(args.device)
    load_before = os.getloadavg()[0]
    rows = []
    for size in args.sizes or PIPELINE_SIZES:
        rows.append(run_size(size, args, overrides, work))
    load = (load_before, os.getloadavg()[0])
    fit = fits(rows)
    meta = {"command": command, "device": args.device, "machine": info, "overrides": overrides,
            "config_file": args.config, "models": args.models, "battles_per_prompt": args.battles_per_prompt,
            "seed": args.seed, "load": load, "reuse_cache": args.reuse_cache}
    return pipeline_report(rows, fit, meta), {**meta, "sizes": rows, "fit": fit}


# ----------------------------------------------------------------------------- the results file, by section

def _sections(text: str) -> dict[str, str]:
    found = dict(re.findall(r"<!-- scale:(\S+) -->\n(.*?)<!-- /scale:\1 -->", text, flags=re.S))
    if not found and text.strip():  # written before sections existed: the ingest + label measurement
        found["ingest"] = re.sub(r"^# Scale: ingest \+ label of pairwise battles", "## Ingest + label of pairwise battles",
                                 text.strip() + "\n")
    return found


def write_results(md: Path, key: str, text: str, data: dict) -> None:
    md.parent.mkdir(parents=True, exist_ok=True)
    sections = _sections(md.read_text() if md.is_file() else "")
    sections[key] = text.rstrip() + "\n"
    order = [k for k in SECTIONS if k in sections] + sorted(k for k in sections if k not in SECTIONS)
    head = ["# Scale", "", "Written by `bench/scale.py`, one section per measurement; a run rewrites its own "
            "section and keeps the others. The numbers behind each are in `" + md.with_suffix(".json").name + "`.", ""]
    body = [f"<!-- scale:{k} -->\n{sections[k]}<!-- /scale:{k} -->\n" for k in order]
    head[-1:] = ["", ""]
    md.write_text("\n".join(head) + "\n".join(body))
    js = md.with_suffix(".json")
    try:
        saved = json.loads(js.read_text()) if js.is_file() else {}
    except ValueError:
        saved = {}
    saved[key] = data
    js.write_text(json.dumps(saved, indent=1, default=str) + "\n")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:7]))
    parser.add_argument("--sizes", nargs="+", help="prompts per size, e.g. 10000,30000,100000 (pipeline; default); "
                        "battles with --ingest-only (default 250000,500000,1000000)")
    parser.add_argument("--models", type=int, default=20, help="models in the pipeline's data (default 20; "
                        "--ingest-only keeps its 50)")
    parser.add_argument("--battles-per-prompt", type=int, default=BATTLES_PER_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu, or cuda: teacher.device=cuda, train.accelerator=gpu, train.precision=bf16-mixed")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override after the device's (repeatable); a real run uses none")
    parser.add_argument("--config", help="a config YAML over the defaults (as `prerouter train -c`)")
    parser.add_argument("--out", default=str(RESULTS), help="results markdown (default bench/results/scale.md); "
                        "the JSON goes beside it")
    parser.add_argument("--work-dir", default=str(OUT / "pipeline"),
                        help="data files and one folder per size: data, models, mlruns, log (default bench/out/pipeline)")
    parser.add_argument("--cache-dir", help="teacher cache root; each size uses a fresh CACHE_DIR/nSIZE "
                        "(PREROUTER_CACHE_DIR), emptied first (default: WORK_DIR/cache)")
    parser.add_argument("--reuse-cache", action="store_true",
                        help="keep the per-size caches: teacher embeddings are then not computed from scratch")
    parser.add_argument("--ingest-only", action="store_true",
                        help="the ingest + label measurement of 250k, 500k, 1M battles over 50 models")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave the results files alone")
    args = parser.parse_args()
    args.sizes = parse_sizes(args.sizes)
    if args.models < 2:
        sys.exit("--models: at least 2")
    if args.battles_per_prompt < 1:
        sys.exit("--battles-per-prompt: at least 1")
    command = "python bench/scale.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    if args.ingest_only:
        text, data = run_ingest_only(args, command)
        key = "ingest"
    else:
        text, data = run_pipeline(args, command)
        key = f"pipeline-{args.device}"
    print(text)
    if not args.no_write:
        write_results(Path(args.out), key, text, data)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")


if __name__ == "__main__":
    main()
