"""Teacher embeddings: chosen device, shards written as they are computed, a killed job resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from .tiny import count_teacher_inputs, finished_shards, make_tiny_teacher, shard_ids, word_prompts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.mark.timeout(180)
def test_a_killed_embedding_job_resumes_without_recomputing_finished_shards(tmp_path, tiny_teacher, monkeypatch):
    from pipeline.encoders import encoder_key, teacher_embeddings

    prompts, ids = word_prompts()
    (tmp_path / "prompts.json").write_text(json.dumps([prompts, ids]))
    # the job: batches of 8, a shard every 24 prompts, each batch slowed so the kill lands mid-way
    script = textwrap.dedent(f"""
        import json, time
        from pipeline import encoders
        load = encoders.load_teacher
        def slow(path):
            tok, model = load(path)
            forward = model.forward
            def slowed(*a, **kw):
                time.sleep(0.1)
                return forward(*a, **kw)
            model.forward = slowed
            return tok, model
        encoders.load_teacher = slow
        prompts, ids = json.load(open({str(tmp_path / "prompts.json")!r}))
        encoders.teacher_embeddings(prompts, ids, {str(tiny_teacher)!r}, 32, 8, "cpu", shard_size=24)
    """)
    cache = tmp_path / "cache"
    env = os.environ | {"PREROUTER_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    shard_dir = cache / "teacher" / encoder_key(str(tiny_teacher), 32)
    job = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150
    while not finished_shards(shard_dir) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    _, err = job.communicate()
    assert job.returncode == -signal.SIGKILL, f"the job ended before it was killed: {err[-2000:]}"
    shards = finished_shards(shard_dir)
    done = shard_ids(shards)
    assert shards and len(done) == 24 * len(shards) < len(prompts)  # whole shards only, and work left
    (shard_dir / ".deadbeef.123.tmp.npz").write_bytes(b"PK\x03\x04 torn")  # a write cut short is ignored

    monkeypatch.setenv("PREROUTER_CACHE_DIR", str(cache))
    encoded = count_teacher_inputs(monkeypatch)
    resumed = teacher_embeddings(prompts, ids, str(tiny_teacher), 32, 8, "cpu", shard_size=24)
    assert sum(encoded) == len(prompts) - len(done)  # only the prompts of the unfinished shards
    assert len(set(shard_ids(finished_shards(shard_dir)))) == len(prompts)

    monkeypatch.setenv("PREROUTER_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = teacher_embeddings(prompts, ids, str(tiny_teacher), 32, 8, "cpu", shard_size=1000)
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)  # resumed rows land where they belong
    encoded.clear()
    again = teacher_embeddings(prompts[::-1], ids[::-1], str(tiny_teacher), 32, 8, "cpu")
    assert not encoded and np.array_equal(again, fresh[::-1])  # all cached now, in any order


def test_layer_pooling_averages_each_layers_unit_sentence_vector_under_a_cache_key_of_its_own(tmp_path,
                                                                                             monkeypatch):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from pipeline.config import load_config
    from pipeline.encoders import encoder_key, teacher_embeddings

    teacher = str(make_tiny_teacher(tmp_path / "teacher", layers=3))
    monkeypatch.setenv("PREROUTER_CACHE_DIR", str(tmp_path / "cache"))
    prompts = ["a short one", "a somewhat longer prompt about the weather in spring", "x"]
    ids = ["p0", "p1", "p2"]
    last = teacher_embeddings(prompts, ids, teacher, 32, 8, "cpu")
    layers = teacher_embeddings(prompts, ids, teacher, 32, 8, "cpu", pooling="layers")

    tok, model = AutoTokenizer.from_pretrained(teacher), AutoModel.from_pretrained(teacher).eval()
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    for i, text in enumerate(prompts):  # one prompt at a time: no padding to mask
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
        means = [h[0].mean(0).numpy() for h in hidden]  # [0] is the word embeddings, then 3 layers
        np.testing.assert_allclose(last[i], unit(means[-1]), atol=1e-5)
        np.testing.assert_allclose(layers[i], unit(np.mean([unit(m) for m in means[1:]], axis=0)), atol=1e-5)
    assert not np.allclose(last, layers, atol=1e-3)
    # caches written before the choice existed keep their key; the other pooling never reads them
    assert encoder_key(teacher, 32) == encoder_key(teacher, 32, "last") != encoder_key(teacher, 32, "layers")
    assert load_config(overrides=["teacher.pooling=last"]).teacher.pooling == "last"


def test_teacher_device_is_auto_cpu_or_cuda(tiny_teacher, tmp_path, monkeypatch):
    import torch

    from pipeline.common import ConfigError
    from pipeline.config import load_config
    from pipeline.encoders import teacher_device, teacher_embeddings

    assert load_config().teacher.device == "auto"
    assert teacher_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert teacher_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="teacher.device"):
        load_config(overrides=["teacher.device=tpu"])
    if not torch.cuda.is_available():
        monkeypatch.setenv("PREROUTER_CACHE_DIR", str(tmp_path))
        with pytest.raises(ConfigError, match="no CUDA device") as e:
            teacher_embeddings(["a prompt"], ["a"], str(tiny_teacher), 32, 8, "cuda")
        assert "\n" not in str(e.value)


def test_a_teacher_the_hub_cannot_give_is_one_configuration_error(monkeypatch):
    import huggingface_hub
    import transformers

    from pipeline.common import ConfigError
    from pipeline.encoders import load_teacher, tokenizer_file

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    for load in (load_teacher, tokenizer_file):
        with pytest.raises(ConfigError) as e:
            load("org/encoder")
        assert "teacher.path='org/encoder' cannot be loaded (We couldn't connect" in str(e.value)
        assert "pass a local checkpoint directory" in str(e.value) and "\n" not in str(e.value)
