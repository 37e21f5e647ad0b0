"""Ingest + label the public development data in ../shared/data and check its README's numbers."""
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.common import read_json
from pipeline.ingest import ingest
from pipeline.label import label

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


def need(file: str) -> Path:
    path = DATA / file
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def readme_test_count(prompts) -> int:
    """The README's fixed split, computed independently of the pipeline."""
    return sum(int(hashlib.sha256(p.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF < 0.2 for p in set(prompts))


def test_mmlu(data_dir):
    path = need("routellm_mmlu.csv")
    manifest = read_json(ingest(str(path)) / "manifest.json")
    stats = label(path.stem)
    assert manifest["models"] == [WEAK, STRONG] and manifest["metadata_columns"] == ["subject"]
    assert manifest["n_rows_in"] == 14_042 and stats["n_prompts"] == 13_937
    assert stats["pair"] == {"weak": WEAK, "strong": STRONG}
    assert stats["per_model"][WEAK]["rate"] == pytest.approx(0.68, abs=0.005)
    assert stats["per_model"][STRONG]["rate"] == pytest.approx(0.81, abs=0.005)
    assert stats["balance"]["strong_only"] == pytest.approx(0.18, abs=0.005)
    assert stats["splits"]["test"] == readme_test_count(pd.read_csv(path).prompt)


def test_gsm8k(data_dir):
    path = need("routellm_gsm8k.csv")
    ingest(str(path))
    stats = label(path.stem)
    assert stats["n_prompts"] == 1_319
    assert stats["per_model"][WEAK]["rate"] == pytest.approx(0.64, abs=0.005)
    assert stats["per_model"][STRONG]["rate"] == pytest.approx(0.86, abs=0.005)
    assert stats["splits"]["test"] == readme_test_count(pd.read_csv(path).prompt)


def test_mtbench(data_dir):
    path = need("routellm_mtbench.jsonl")
    manifest = read_json(ingest(str(path)) / "manifest.json")
    stats = label(path.stem)
    assert manifest["layout"] == "long" and manifest["n_rows_in"] == 320
    assert stats["n_prompts"] == 160 and stats["scale"]["range"] == [1.0, 10.0]
    assert stats["pair"] == {"weak": WEAK, "strong": STRONG}
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    assert stats["splits"]["test"] == readme_test_count(prompts)


def test_alpacaeval(data_dir):
    path = need("alpacaeval_pairwise.parquet")
    manifest = read_json(ingest(str(path)) / "manifest.json")
    stats = label(path.stem)
    assert manifest["layout"] == "pairwise" and manifest["n_battles"] == 40_244
    assert len(stats["models"]) == 49 and stats["n_prompts"] == 805
    assert stats["per_model"]["gpt4_1106_preview"]["rate"] == pytest.approx(0.89, abs=0.005)
    assert stats["tiers"]["gpt4_1106_preview"] == "strong"
    assert stats["splits"]["test"] == readme_test_count(pd.read_parquet(path).prompt)
