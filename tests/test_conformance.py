"""Every bundle ships conformance vectors (conformance.jsonl), listed and hashed in router.json; the
runtime reproduces them, and the rules of docs/contracts.md reproduce the token ids without it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.bundle_contract import bundle_digest
from pipeline.routing import sigmoid
from pipeline.runtime import Router, RouterError
from pipeline.tokenization import learn_templates, load_tokenizer, make_spec

from .fabricate import TOKENIZER, tiny_bundle
from .tiny import read_conformance

MULTI = {"kind": "multi", "cost_lambdas": {"0.25": 0.4, "0.5": 0.1, "1.0": 0.0}}


def _spec_rules(prompt: str, spec: dict, tok) -> list[int]:
    """The tokenizer contract written from docs/contracts.md alone (not the runtime's functions)."""
    if (spec.get("templates") or {}).get("version", 1) >= 2:
        prompt = prompt.replace("\r\n", "\n").replace("\r", "\n").strip(" \t\n\r\f\v")
    for t in (spec.get("templates") or {}).get("prefixes", []):
        if prompt.startswith(t["text"]):
            prompt = t["text"][:t["keep"]] + prompt[len(t["text"]):]
            break
    for t in (spec.get("templates") or {}).get("suffixes", []):
        if prompt.endswith(t["text"]):
            prompt = prompt[:len(prompt) - len(t["text"])] + t["text"][len(t["text"]) - t["keep"]:]
            break
    window, head, tail = spec["char_window"], spec["head_tokens"], spec["tail_tokens"]
    if len(prompt) > window:  # code points
        tail_chars = (window * tail) // (head + tail)
        prompt = prompt[:window] if tail_chars == 0 else prompt[:window - tail_chars] + " " + prompt[-tail_chars:]
    ids = tok.tokenizer.encode(prompt, add_special_tokens=False).ids
    if len(ids) > head + tail:
        ids = ids[:head] + (ids[len(ids) - tail:] if tail else [])
    return [tok.cls, *ids, tok.sep]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("conf")
    pair, _ = tiny_bundle(root / "pair")
    multi, _ = tiny_bundle(root / "multi", n_models=3, decision=MULTI)
    return {"pair": pair, "multi": multi}


@pytest.mark.parametrize("kind", ["pair", "multi"])
def test_vectors_are_listed_hashed_and_reproduced(bundles, kind):
    bundle = bundles[kind]
    config = json.loads((bundle / "router.json").read_text())
    assert "conformance.jsonl" in config["files"] and config["conformance"]["file"] == "conformance.jsonl"
    assert config["bundle_sha256"] == bundle_digest(config)
    head, vectors = read_conformance(bundle)
    assert head["conformance"] == 1 and head["tolerance"] == 1e-5 and 200 <= len(vectors) == head["n_prompts"]
    prompts = [v["prompt"] for v in vectors]
    assert "" in prompts and "[CLS]" in prompts and any(len(p) > 5 * 32 * 6 for p in prompts)
    assert any("\u0301" in p for p in prompts) and any("😀" in p for p in prompts) and any("\x00" in p for p in prompts)
    if kind == "pair":
        assert {"strong_fraction": 0.3} in head["settings"] and {"threshold": 0.5} in head["settings"]
        assert not any("cost_weight" in s for s in head["settings"])
    else:
        assert not any("strong_fraction" in s or "threshold" in s for s in head["settings"])
    tok = None
    for graph in ("int8", "fp32"):
        router = Router.load(bundle, quantized=graph == "int8")
        tok = router.tokenizer
        p = router.scores(prompts, batch_size=1)
        want = np.array([v["scores"][graph] for v in vectors])
        assert np.abs(p - want).max() <= 1e-6
        for s_i, s in enumerate(head["settings"]):
            got = router.decide(prompts, **s, batch_size=1)
            assert got == [v["decisions"][graph][s_i] for v in vectors], s
    # The ids follow from the written rules alone (here with the library tokenizer, not the fast path).
    for v in vectors:
        assert _spec_rules(v["prompt"], router.spec, tok) == v["input_ids"], repr(v["prompt"][:80])
    # A long prompt is cut at code points with one space between head and tail.
    long = next(v for v in vectors if len(v["prompt"]) > router.spec["char_window"] and "😀" in v["prompt"])
    assert len(long["text"]) == router.spec["char_window"] + 1


def test_vectors_cover_templates_and_follow_the_contract(tmp_path):
    system = ("You are a careful assistant. Answer the question below with one letter only, and explain "
              "nothing. Think step by step before answering. ")
    prompts = [system + f"Question {i}: what is {i} + {i}?" for i in range(40)]
    templates = learn_templates(prompts)
    assert templates["prefixes"]
    bundle, _ = tiny_bundle(tmp_path / "tpl", templates=templates)
    head, vectors = read_conformance(bundle)
    prefix = templates["prefixes"][0]["text"]
    assert sum(v["prompt"].startswith(prefix) for v in vectors) >= 2
    padded = [v["prompt"] for v in vectors if v["prompt"] != v["prompt"].strip()]
    assert sum(p.lstrip(" \t\r").startswith(prefix) for p in padded) >= 2  # whitespace around a template
    tok = load_tokenizer(TOKENIZER)
    for v in vectors:
        assert _spec_rules(v["prompt"], make_spec(32) | {"templates": templates}, tok) == v["input_ids"]


def test_settings_that_do_not_apply_are_errors(bundles):
    pair, multi = Router.load(bundles["pair"]), Router.load(bundles["multi"])
    with pytest.raises(RouterError, match="cost_weight does not apply.*'pair'"):
        pair.route("x", cost_weight=0.1)
    with pytest.raises(RouterError, match="strong_fraction does not apply.*'multi'"):
        multi.route("x", strong_fraction=0.3)
    with pytest.raises(RouterError, match="threshold does not apply"):
        multi.decide(["x"], threshold=0.5)
    with pytest.raises(RouterError, match="not both"):
        pair.route("x", strong_fraction=0.3, threshold=0.5)
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(RouterError, match="strong_fraction must be"):
            pair.route("x", strong_fraction=bad)
    with pytest.raises(RouterError, match="cost_weight must be"):
        multi.route("x", cost_weight=-1.0)
    assert multi.route("x", cost_weight=0.0) in multi.models and pair.route("x", threshold=0.2) in pair.models


def test_characters_are_code_points():
    # The char window counts code points: an astral character is one, whatever UTF-16 makes of it.
    from pipeline.tokenization import clip_chars, make_spec

    spec = make_spec(32, char_window=10)
    cut = clip_chars("😀" * 30, spec)
    assert cut == "😀" * 8 + " " + "😀" * 2  # tail: 10 * 7 // (23 + 7) = 2 code points, rounded down
    # A combining mark is a code point of its own, and nothing is normalised before the cut.
    assert clip_chars("e\u0301" * 6, spec) == "e\u0301" * 4 + " " + "e\u0301"


def test_win_probability_is_the_documented_formula(tmp_path):
    bundle, _ = tiny_bundle(tmp_path / "pw", decision={"kind": "pair", "weak": "weak", "strong": "strong",
                                                        "thresholds": {"0.5": 0.5},
                                                        "win_probability": "sigmoid(logit_a - logit_b)"})
    router = Router.load(bundle)
    logits = router.logits(["a prompt", "another"]).astype(np.float64)
    assert np.allclose(router.win_probability(["a prompt", "another"], "strong", "weak"),
                       sigmoid(logits[:, 1] - logits[:, 0]))


def test_model_card_names_the_decision_kind_and_its_settings(tmp_path):
    from pipeline.model_card import write_model_card

    from .tiny import sample_router_json

    pair = sample_router_json()
    pair["tokenizer"]["char_window"] = 768
    text = write_model_card(tmp_path, pair).read_text()
    assert "**Decision kind: `pair`**" in text and "`cost_weight` does not apply" in text
    assert "one inserted space" in text and "⌊768·31 / (95 + 31)⌋ (rounded down)" in text and "code points" in text
    multi = sample_router_json("multi")
    multi["decision"].update(weak="w", strong="s", thresholds={"0.5": 0.5})
    text = write_model_card(tmp_path, multi).read_text()
    decision = text.split("## Decision rule")[1]
    assert decision.index("**Decision kind: `multi`**") < decision.index("For evaluation and reports only")
    assert "`strong_fraction` and `threshold` do not apply" in text
    assert "logits averaged" not in text
    multi["training_config"]["student"] = {"family": "static", "dim": 256, "members": 3}
    assert "static encoder, width 256; 3 of them (seeds apart), logits averaged in the graph" in (
        write_model_card(tmp_path, multi).read_text())
