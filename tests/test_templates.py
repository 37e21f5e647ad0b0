"""Learned prompt templates: the varying middle of templated prompts reaches the student."""
from __future__ import annotations

import numpy as np

from pipeline.tokenization import compact_templates, encode, learn_templates, load_tokenizer, make_spec, template_edges
from tests.tiny import PACKAGED

SHOTS = "The following are multiple choice questions (with answers) about anatomy.\n\n" + "\n\n".join(
    f"Which bone is number {i}?\nA. femur\nB. tibia\nC. ulna\nD. radius\nAnswer: B" for i in range(5)) + "\n\n"
CLOSE = "\nAnswer with the letter of the correct option only, and nothing else.\nAnswer:"


def _templated(n: int) -> list[str]:
    return [SHOTS + f"Where is the muscle called m{i} attached, above or below joint {i % 7}?" + CLOSE for i in range(n)]


def _free(n: int) -> list[str]:
    return [f"Write a short poem about the number {i} and the sea." for i in range(n)]


def test_learns_shared_prefix_and_suffix_but_not_short_or_rare_ones():
    t = learn_templates(_templated(40) + _free(40) + [SHOTS + "rare" + CLOSE[:10]] * 1)
    assert [p["text"] for p in t["prefixes"]] == [SHOTS + "Where is the muscle called "]
    assert [s["text"] for s in t["suffixes"]] == [CLOSE]
    assert t["prefixes"][0]["support"] == 40  # the rare prompt shares only the shots: not this prefix
    # "Write a short poem about the number " is shared by 40 prompts but shorter than min_chars
    assert all(not p["text"].startswith("Write") for p in t["prefixes"])
    assert learn_templates(_templated(10)) == {"version": 2, "prefixes": [], "suffixes": []}  # below min_support


def test_compaction_keeps_the_varying_middle_and_a_template_marker():
    prompts = _templated(30)
    spec = {"templates": learn_templates(prompts)}
    out = compact_templates(prompts[3], spec)
    assert "m3 attached" in out and len(out) < 150
    assert out.startswith("The following are ")  # the kept start tells templates apart
    assert out.endswith("\nAnswer:")
    assert compact_templates("an unrelated prompt", spec) == "an unrelated prompt"
    assert compact_templates(prompts[3], {}) == prompts[3]


def test_templated_prompts_get_distinct_token_ids_only_with_templates():
    tok = load_tokenizer(PACKAGED)
    prompts = _templated(30)
    plain = make_spec(32)
    ids, _ = encode(tok, prompts[:2], plain)
    assert np.array_equal(ids[0], ids[1])  # head + tail are all template: the question is cut away
    ids, _ = encode(tok, prompts[:2], plain | {"templates": learn_templates(prompts)})
    assert not np.array_equal(ids[0], ids[1])


def test_template_edges_unify_line_breaks_and_drop_ascii_whitespace_at_the_ends_only():
    assert template_edges(" \t\r\nA\r\n\rB  C\r\n\v\f") == "A\n\nB  C"
    assert template_edges("\u00a0A\ufeff") == "\u00a0A\ufeff"  # not ASCII: kept (JavaScript's trim() would drop it)
    assert template_edges(" \n ") == ""


def test_a_client_adding_whitespace_or_windows_line_breaks_still_has_its_template_recognised():
    prompts = _templated(30)
    spec = make_spec(32) | {"templates": learn_templates(prompts)}
    clean = compact_templates(prompts[3], spec)
    assert len(clean) < 150
    variants = [prompts[3] + "\n", "  " + prompts[3] + " \n\n", prompts[3].replace("\n", "\r\n"),
                "\r\n" + prompts[3].replace("\n", "\r") + "\t"]
    assert [compact_templates(v, spec) for v in variants] == [clean] * len(variants)
    tok = load_tokenizer(PACKAGED)
    ids, _ = encode(tok, [prompts[3]] + variants, spec)
    assert all(np.array_equal(ids[0], row) for row in ids[1:])
    # Templates without a version (bundles written before version 2) keep matching exactly, as they were trained.
    old = {"templates": {k: v for k, v in spec["templates"].items() if k != "version"}}
    assert compact_templates(prompts[3], old) == clean
    assert compact_templates(prompts[3] + "\n", old).endswith(CLOSE + "\n")  # its suffix is not recognised


def test_templates_are_learned_through_the_same_edges():
    # Training prompts that carry a trailing newline and Windows line breaks give the templates clean prompts match.
    messy = [p.replace("\n", "\r\n") + "\r\n" for p in _templated(30)]
    assert learn_templates(messy) == learn_templates(_templated(30))
