"""The baseline APGRs of ../shared/data/README.md, reproduced on its fixed test split."""
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.baselines import best_single_scores, length_scores, oracle_scores, strong_needed, tfidf_lr, tfidf_ridge
from pipeline.metrics import apgr

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"

# file: (n test prompts, length, TF-IDF + LR, oracle) as the README reports them
README = {
    "routellm_mmlu.csv": (2785, 0.575, 0.654, 1.339),
    "routellm_gsm8k.csv": (276, 0.603, 0.638, 1.065),
}


def is_test(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF < 0.2


def load_split(path: Path):
    """One row per unique prompt, duplicate rows averaged (how the README counts MMLU's 105 repeats)."""
    rows = pd.read_csv(path)
    prompts = rows.groupby("prompt", sort=False)[[WEAK, STRONG]].mean().reset_index()
    test = prompts["prompt"].map(is_test).to_numpy()
    return prompts[~test], prompts[test]


@pytest.mark.parametrize("name", sorted(README))
def test_readme_baselines(name):
    if not (DATA / name).is_file():
        pytest.skip(f"{DATA / name} not available")
    n_test, length_apgr, tfidf_apgr, oracle_apgr = README[name]
    train, test = load_split(DATA / name)
    weak, strong = test[WEAK].to_numpy(), test[STRONG].to_numpy()
    assert len(test) == n_test

    assert round(apgr(oracle_scores(weak, strong), weak, strong), 3) == oracle_apgr
    # prompt length in characters with stable tie order: MMLU 0.5747, GSM8K 0.6037 (README 0.603)
    assert apgr(length_scores(test["prompt"].tolist()), weak, strong) == pytest.approx(length_apgr, abs=0.001)
    y = strong_needed(train[WEAK], train[STRONG])
    scores = tfidf_lr(train["prompt"].tolist(), y, test["prompt"].tolist())
    assert apgr(scores, weak, strong) == pytest.approx(tfidf_apgr, abs=0.001)


def test_readme_routerdc_n_model_baselines():
    """Mean outcome of the model each test prompt is sent to: best single 0.504, TF-IDF + ridge 0.522,
    oracle 0.714 (README)."""
    path = DATA / "routerdc_7models.csv"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    rows = pd.read_csv(path)
    models = [c for c in rows.columns if c not in ("prompt", "task")]
    test = rows["prompt"].map(is_test).to_numpy()
    y_train, y_test = rows[models].to_numpy(float)[~test], rows[models].to_numpy(float)[test]
    mask = np.ones(y_train.shape, bool)

    def routed(scores):
        return y_test[np.arange(len(y_test)), scores.argmax(1)].mean()

    best = best_single_scores(y_train, mask, len(y_test))
    assert models[best[0].argmax()] == "cognitivecomputations/dolphin-2.9-llama3-8b"
    assert round(routed(best), 3) == 0.504
    assert round(y_test.max(1).mean(), 3) == 0.714
    ridge = tfidf_ridge(rows["prompt"][~test].tolist(), y_train, mask, rows["prompt"][test].tolist())
    assert routed(ridge) == pytest.approx(0.522, abs=0.001)
