"""The torch-free runtime: shared tokenization, bundle loading and verification, routing, the CLI's route."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.bundle_contract import bundle_digest
from pipeline.common import DataError
from pipeline.runtime import Router
from pipeline.tokenization import encode, encode_one, load_tokenizer, make_spec

from .fabricate import PROMPTS, TOKENIZER, reference_logits, tiny_bundle


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)



# -- tokenization --------------------------------------------------------------------------------

def test_make_spec_splits_content_tokens():
    s = make_spec(128, "head_tail", 0.75)
    assert s["head_tokens"] + s["tail_tokens"] == 126 and s["head_tokens"] == 95
    h = make_spec(64, "head")
    assert (h["head_tokens"], h["tail_tokens"]) == (62, 0)
    assert make_spec(16, char_window=50)["char_window"] == 50
    with pytest.raises(ValueError):
        make_spec(16, "middle")


def test_load_tokenizer_ignores_packaged_truncation_and_padding(tok):
    # The packaged tokenizer.json truncates and pads to 128; `encode` must control both itself.
    spec = make_spec(512, char_window=10**6)
    ids, mask = encode(tok, ["word " * 300, "hi"], spec)
    assert ids.shape == (2, 302) and mask[1].sum() == 3


def test_encode_wraps_truncates_head_and_tail(tok):
    words = [w for w in sorted(tok.get_vocab()) if w.isalpha() and w.isascii() and len(w) > 3][:200]
    word_ids = [tok.token_to_id(w) for w in words]
    spec = make_spec(34, "head_tail", 0.75, char_window=10**6)  # 24 head + 8 tail content tokens
    ids, mask = encode(tok, [" ".join(words)], spec)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert ids[0].tolist() == [cls, *word_ids[:24], *word_ids[-8:], sep] and mask.all()
    head_only = make_spec(34, "head", char_window=10**6)
    assert encode(tok, [" ".join(words)], head_only)[0][0].tolist() == [cls, *word_ids[:32], sep]


def test_encode_pads_batch_and_matches_single(tok):
    spec = make_spec(32)
    ids, mask = encode(tok, PROMPTS, spec)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == (len(PROMPTS), 32)
    assert ids[1, :2].tolist() == [101, 102] and mask[1].sum() == 2  # empty prompt: [CLS][SEP]
    for i, p in enumerate(PROMPTS):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any() and not ids[i, n:].any()
        assert encode_one(tok, p, spec)[0].tolist() == ids[i, :n].tolist()


def test_huge_prompt_is_clipped_by_characters(tok):
    spec = make_spec(32, char_window=200)
    huge = "alpha " * 200_000 + "omega"
    ids = encode_one(tok, huge, spec)[0].tolist()
    assert len(ids) == 32 and ids[-2] == tok.token_to_id("omega")  # the tail survives the clip
    assert ids == encode_one(tok, huge[:150] + " " + huge[-50:], spec)[0].tolist()


def test_lone_surrogates_and_control_chars_encode(tok):
    ids, mask = encode(tok, ["ok \ud800 fine", "\udfff", "\x00\x01\x1f\x7f", "ab\u200bcd"], make_spec(16))
    assert ids.shape[0] == 4 and mask[:, 0].all()


# -- loading and verification ----------------------------------------------------------------------

def test_bundle_files_and_hashes(pair_bundle):
    path, _ = pair_bundle
    config = json.loads((path / "router.json").read_text())
    assert set(config["files"]) == {"model.onnx", "model.int8.onnx", "tokenizer.json", "MODEL_CARD.md",
                                   "conformance.jsonl"}
    assert config["tokenizer"]["file"] == "tokenizer.json" and "source" not in config["tokenizer"]
    assert config["schema_version"] == 2 and [m["name"] for m in config["models"]] == ["weak", "strong"]
    assert config["bundle_sha256"] == bundle_digest(config) and len(config["bundle_sha256"]) == 64


def test_altered_file_fails_load(tmp_path):
    path, _ = tiny_bundle(tmp_path / "b")
    with open(path / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(DataError, match=r"tokenizer\.json.*sha256 mismatch"):
        Router.load(path)
    (path / "model.int8.onnx").unlink()
    with pytest.raises(DataError, match="missing"):
        Router.load(path, verify=False)
    (path / "router.json").unlink()
    with pytest.raises(DataError, match="router.json is missing"):
        Router.load(path)


def test_unusable_decision_fails(tmp_path):
    path, _ = tiny_bundle(tmp_path / "b", decision={"kind": "pair", "weak": "weak", "strong": "gpt-9"})
    with pytest.raises(DataError, match=r"unknown pair models \['gpt-9'\]"):
        Router.load(path)


def test_unknown_schema_version_fails(tmp_path):
    path, _ = tiny_bundle(tmp_path / "b")
    config = json.loads((path / "router.json").read_text())
    config["schema_version"] = 99
    (path / "router.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="schema_version 99"):
        Router.load(path)


@pytest.mark.parametrize("version, loads", [(1, True), (2, True), (3, False), ("2", False), (True, False)])
def test_templates_version_is_one_this_runtime_knows(tmp_path, version, loads):
    path, _ = tiny_bundle(tmp_path / "b")
    config = json.loads((path / "router.json").read_text())
    config["tokenizer"]["templates"] = {"version": version, "prefixes": [{"text": "Q: ", "keep": 1}], "suffixes": []}
    (path / "router.json").write_text(json.dumps(config))
    if loads:
        assert Router.load(path, verify=False).scores(["Q: hi"]).shape == (1, 2)
    else:
        with pytest.raises(DataError, match=f"tokenizer.templates.version {version!r} is not known"):
            Router.load(path, verify=False)


# -- scores --------------------------------------------------------------------------------------

def test_scores_are_the_graph_probabilities(pair_router, pair_bundle, tok):
    _, w = pair_bundle
    p = pair_router.scores(PROMPTS)
    ids, mask = encode(tok, PROMPTS, pair_router.spec)
    expected = 1 / (1 + np.exp(-reference_logits(w, ids, mask).astype(np.float64)))
    assert p.shape == (len(PROMPTS), 2) and np.allclose(p, expected, atol=1e-5)
    assert len({round(float(x), 6) for x in p[:, 0]}) > 3  # prompts get different scores


def test_single_and_batched_scores_agree(pair_router):
    batched = pair_router.scores(PROMPTS, batch_size=4)
    single = np.array([pair_router.scores([q])[0] for q in PROMPTS])
    assert np.allclose(batched, single, atol=1e-6)


def test_int8_scores_stay_close_to_fp32(pair_bundle, pair_router):
    int8 = Router.load(pair_bundle[0])
    assert np.abs(int8.scores(PROMPTS) - pair_router.scores(PROMPTS)).max() < 0.05


# -- decisions -----------------------------------------------------------------------------------

def test_threshold_for_interpolates_calibration(pair_router):
    assert pair_router.threshold_for(0.5) == pytest.approx(0.5)
    assert pair_router.threshold_for(0.3) == pytest.approx(0.6)
    assert pair_router.threshold_for(0.05) == pytest.approx(0.85)  # toward 1.0 at "never strong"
    assert pair_router.threshold_for(0.95) == pytest.approx(0.15)  # toward 0.0 at "always strong"
    assert pair_router.threshold_for(0.0) == np.inf and pair_router.threshold_for(1.0) == -np.inf


def test_pair_route_follows_score_and_threshold(pair_router):
    s = pair_router.routing_score(pair_router.scores(PROMPTS))
    for t in (0.2, float(np.median(s)), 0.8):
        assert pair_router.decide(PROMPTS, threshold=t) == ["strong" if x >= t else "weak" for x in s]
        assert [pair_router.route(q, threshold=t) for q in PROMPTS] == pair_router.decide(PROMPTS, threshold=t)
    assert set(pair_router.decide(PROMPTS, strong_fraction=0.0)) == {"weak"}
    assert set(pair_router.decide(PROMPTS, strong_fraction=1.0)) == {"strong"}


def test_calibrated_fraction_is_honoured(tmp_path):
    # Calibrate thresholds on the bundle's own scores; routing those prompts must hit the fractions.
    prompts = [f"question {i}: " + "word " * (i % 37) + "topic" * (i % 5) for i in range(400)]
    base, _ = tiny_bundle(tmp_path / "a")
    s = Router.load(base, quantized=False).routing_score(Router.load(base, quantized=False).scores(prompts))
    cal = {f"{f:.1f}": float(np.quantile(s, 1 - f)) for f in np.arange(0.1, 1.0, 0.1)}
    path, _ = tiny_bundle(tmp_path / "b", decision={"kind": "pair", "weak": "weak", "strong": "strong",
                                                    "thresholds": cal, "default_strong_fraction": 0.3})
    r = Router.load(path, quantized=False)
    for f in (0.2, 0.5, 0.8):
        assert abs(r.decide(prompts, strong_fraction=f).count("strong") / len(prompts) - f) < 0.03
    assert abs(r.decide(prompts).count("strong") / len(prompts) - 0.3) < 0.03  # default_strong_fraction


def test_multi_route_trades_quality_for_cost(tmp_path):
    decision = {"kind": "multi", "cost_lambdas": {"0.25": 5.0, "0.5": 0.0}}
    path, _ = tiny_bundle(tmp_path / "m", n_models=3, decision=decision)
    r = Router.load(path, quantized=False)
    p = r.scores(PROMPTS)
    assert r.decide(PROMPTS, cost_weight=0.0) == [r.models[i] for i in p.argmax(1)]
    assert set(r.decide(PROMPTS, cost_weight=100.0)) == {"m0"}  # the cheapest
    assert r.decide(PROMPTS) == r.decide(PROMPTS, cost_weight=0.0)  # default: λ of budget 0.5
    assert [r.route(q, cost_weight=0.3) for q in PROMPTS] == r.decide(PROMPTS, cost_weight=0.3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.one_of(st.text(), st.text(alphabet=st.characters(codec=None, categories=["Cc", "Cs", "Zs", "So"])),
                        st.text(min_size=1, max_size=3).map(lambda s: s * 20_000)))
def test_route_never_raises(pair_router, prompt):
    assert pair_router.route(prompt) in ("weak", "strong")
    assert pair_router.scores([prompt]).shape == (1, 2)


@pytest.mark.parametrize("call", ["scores", "logits", "decide"])
def test_batch_calls_want_a_list_of_str(pair_router, call):
    fn = getattr(pair_router, call)
    for not_a_list in ("hello", b"hello", None, 3, {"prompt": "x"}):
        with pytest.raises(TypeError, match="pass a list of prompts") as e:
            fn(not_a_list)
        assert type(not_a_list).__name__ in str(e.value)
    for bad, name in ((None, "NoneType"), (b"x", "bytes"), (7, "int"), (["x"], "list"), (np.float64(1), "float64")):
        with pytest.raises(TypeError, match=rf"prompts\[2\] is {name}, not str"):
            fn(["a", "b", bad, "d"])
    assert fn(("a", "b")).shape[0] == 2 if call != "decide" else len(fn(("a", "b"))) == 2  # any sequence of str
    assert len(fn(iter(["a", "b", "c"]))) == 3 and len(fn(np.array(["a", "b"]))) == 2
    assert len(fn([])) == 0


def test_route_wants_one_str(pair_router):
    for bad in (None, b"hello", 7, ["hello"], ("a",)):
        with pytest.raises(TypeError, match=rf"route takes one prompt as a str, got {type(bad).__name__}"):
            pair_router.route(bad)
    assert pair_router.route(np.str_("hello")) in ("weak", "strong")


def test_threads_share_one_router(pair_bundle):
    r = Router.load(pair_bundle[0])
    prompts = [f"prompt {i} " + "token " * (i % 50) for i in range(64)]
    expected = [r.route(q, strong_fraction=0.4) for q in prompts]
    results: dict[int, list[str]] = {}

    def work(k: int) -> None:
        results[k] = [r.route(q, strong_fraction=0.4) for q in prompts]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[k] == expected for k in range(8))


# -- command line --------------------------------------------------------------------------------

def test_cli_route_and_score(pair_bundle, cli, tmp_path):
    path, _ = pair_bundle
    r = Router.load(path)
    code, out = cli("route", path, "Prove Fermat's little theorem.", "--threshold", "0")
    assert code == 0 and out.strip() == "strong"
    code, out = cli("route", path, "hello", "--strong-fraction", "0.0")
    assert code == 0 and out.strip() == "weak" == r.route("hello", strong_fraction=0.0)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert cli("score", path, "--input", src, "--output", dst)[0] == 0
    assert len(dst.read_text().splitlines()) == 2
    src.write_text('{"prompt": "a"}\nnot json\n')
    code, out = cli("score", path, "--input", src, "--output", dst)
    assert code == 2 and "row 2" in out and "not valid JSON" in out
    src.write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert cli("score", path, "--input", src, "--output", dst, "--threshold", "0")[0] == 0
    assert [json.loads(x)["route"] for x in dst.read_text().splitlines()] == ["strong", "strong"]
    code, out = cli("score", path, "--input", src, "--output", dst, "--cost-weight", "1")
    assert code == 2 and "cost_weight does not apply" in out
    prompt = "Prove Fermat's little theorem."
    src.write_text(json.dumps({"prompt": prompt}) + "\n")
    for setting in (["--threshold", "0"], ["--strong-fraction", "0"]):
        code, out = cli("route", path, prompt, "--scores", *setting)
        assert code == 0, out
        shown = json.loads(out)
        assert cli("score", path, "--input", src, "--output", dst, *setting)[0] == 0
        scored = json.loads(dst.read_text())
        # what `score` writes: one prompt, no padding, so the same graph input and the same numbers
        assert shown == {k: scored[k] for k in ("scores", "route", "score")}
        assert shown["route"] == r.route(prompt, **{setting[0][2:].replace("-", "_"): float(setting[1])})
        assert shown["scores"] == pytest.approx(dict(zip(r.models, r.score_one(prompt))))


def test_cli_refuses_altered_bundle(tmp_path, cli):
    path, _ = tiny_bundle(tmp_path / "b")
    (path / "model.int8.onnx").write_bytes(b"not a model")
    code, out = cli("route", path, "hello")
    assert code == 2 and "model.int8.onnx" in out and "sha256 mismatch" in out


# -- the fast path ----------------------------------------------------------------------------------

# Every ASCII character, plus pieces that exercise special tokens, subwords and the 100-character word limit.
ASCII_HEAVY = st.lists(st.sampled_from([chr(c) for c in range(128)] + ["[SEP]", "[MASK]", "##", "ing ", "Hello",
                                                                      "don't", "x" * 101, "unaffable "]),
                       max_size=200).map("".join)
# Accents (precomposed and combining), CJK, Greek with Σ, Cyrillic, emoji, symbols, Unicode spaces and
# controls, ligatures, Hangul, Arabic, lone surrogates: each class the normalizer treats differently.
UNICODE_HEAVY = st.lists(st.one_of(st.sampled_from(["café", "naïve", "e\u0301", "ΣΑΣ σας", "日本語", "한국어",
                                                    "Привет", "😀", "€5", "—", "“q”", "\u00a0", "\u2028", "\u200b",
                                                    "\ufeff", "\ufffd", "ﬁ", "İstanbul", "ẞ", "\ud800", "\u0f71\u0f72",
                                                    "مرحبا", "x" * 101, " ", "[SEP]", "A."]),
                                   st.characters(codec=None)), max_size=60).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(ASCII_HEAVY, UNICODE_HEAVY, st.text(max_size=80),
                      st.from_regex(r"[A-Za-z0-9 .,;:'\"()\[\]{}#@_\-+*/\\\n\t]{0,200}", fullmatch=True)))
def test_fast_path_matches_the_tokenizers_library(text):
    utf8 = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")  # what the library can read
    for tok in (_TOK, _CASED):
        assert tok.fast is not None
        assert tok.content_ids(text) == tok.tokenizer.encode(utf8, add_special_tokens=False).ids


def test_fast_path_is_used_only_where_it_is_exact(tok):
    assert tok.fast("plain ascii, with punctuation!") is not None and tok.fast("café, 日本語 😀") is not None
    assert tok.fast("contains [SEP] verbatim") is None  # special tokens are matched before normalising
    assert tok.fast("ΣΑΣ") is None  # final sigma: lowercasing depends on the next character
    assert tok.content_ids("a [SEP] b") == [1037, tok.sep, 1038]
    assert tok.content_ids("ΣΑΣ") == tok.tokenizer.encode("ΣΑΣ", add_special_tokens=False).ids


def test_fast_path_on_real_prompts():
    data = Path(__file__).parent.parent.parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip("../shared/data is absent")
    import pandas as pd

    prompts = pd.read_csv(data / "routellm_mmlu.csv")["prompt"].astype(str).tolist()
    prompts += pd.read_parquet(data / "alpacaeval_pairwise.parquet")["prompt"].astype(str).unique().tolist()
    prompts = [p[:2000] for p in dict.fromkeys(prompts)]
    fast = [(p, ids) for p in prompts if (ids := _TOK.fast(p)) is not None]
    assert len(fast) > 0.99 * len(prompts) and sum(not p.isascii() for p, _ in fast) > 500
    for p, ids in fast:
        assert ids == _TOK.tokenizer.encode(p, add_special_tokens=False).ids


def _cased_tokenizer():
    """The packaged tokenizer with lowercasing off: the fast path's cased branch."""
    from tokenizers import Tokenizer

    from pipeline.tokenization import RouterTokenizer

    config = json.loads(TOKENIZER.read_text())
    config["normalizer"]["lowercase"] = False
    return RouterTokenizer(Tokenizer.from_str(json.dumps(config)))


_TOK, _CASED = load_tokenizer(TOKENIZER), _cased_tokenizer()
