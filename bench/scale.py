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

This file runs the measurements; the synthetic data is made by `scale_data.py` and the tables, fits and
goals are written by `scale_report.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from scale_data import BATTLES_PER_PROMPT, make_battles, make_pairwise
from scale_report import TITLES, fits, ingest_report, machine, pipeline_report, write_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "results" / "scale.md"

PIPELINE_SIZES = [10_000, 30_000, 100_000]
INGEST_SIZES = [250_000, 500_000, 1_000_000]
DATASET = "scale"


# ----------------------------------------------------------------------------- ingest only (1M battles)

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
    return ingest_report(rows, load, command), {"command": command, "load_average": load, "sizes": rows}


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
        from pipeline.encoders import cache_dir, static_vectors, teacher_cache_dir, teacher_word_embeddings
        from pipeline.evaluate import evaluate
        from pipeline.export import export
        from pipeline.ingest import ingest
        from pipeline.label import label
        from pipeline.train import train

        stage("ingest", lambda: ingest(spec["data"], name=DATASET, force=True))
        stats = stage("label", lambda: label(DATASET, cfg.label, force=True))
        out["labels"] = {"prompts": stats["n_prompts"], "models": len(stats["models"]), "pair": stats.get("pair")}
        teacher_dir = teacher_cache_dir(cfg.teacher.path, cfg.teacher.max_tokens, cfg.teacher.pooling)
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


# ----------------------------------------------------------------------------- the parent: one process per size

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


# ----------------------------------------------------------------------------- command line

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
