"""The torch-free runtime: tokenization shared with training, and the Router that serves a bundle.

Imports only numpy, onnxruntime, tokenizers and the standard library, so that serving a bundle
never pays for torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# ---------------------------------------------------------------------------------------------
# Tokenization: training and serving both call `encode`, so they cut prompts identically.
# ---------------------------------------------------------------------------------------------


def make_spec(max_tokens: int, truncation: str = "head_tail", head_fraction: float = 0.75,
              char_window: int | None = None) -> dict:
    """router.json's `tokenizer` dict: how many content tokens are kept from the start and the end."""
    if truncation not in ("head_tail", "head"):
        raise ValueError(f"truncation must be 'head_tail' or 'head', got {truncation!r}")
    if max_tokens < 3:
        raise ValueError(f"max_tokens must leave room for [CLS], [SEP] and one token, got {max_tokens}")
    content = max_tokens - 2
    head = content if truncation == "head" else min(content, max(1, int(content * head_fraction + 0.5)))
    return {"max_tokens": max_tokens, "truncation": truncation, "head_tokens": head,
            "tail_tokens": content - head, "char_window": char_window or 8 * max_tokens}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` file (or a folder holding one) with its own truncation and padding off."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    # `encode` truncates and pads itself; a tokenizer.json may ship with both configured.
    tok.no_truncation()
    tok.no_padding()
    return tok


def special_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """(cls, sep, pad) ids: BERT names first, then RoBERTa-style names, then 0."""
    def first(*names: str) -> int:
        for n in names:
            i = tok.token_to_id(n)
            if i is not None:
                return i
        return 0
    return first("[CLS]", "<s>", "<cls>"), first("[SEP]", "</s>", "<sep>"), first("[PAD]", "<pad>")


def clip_chars(prompt: str, spec: dict) -> str:
    """Bound tokenization cost: keep `char_window` characters from each end of a huge prompt."""
    w = spec["char_window"]
    if len(prompt) > 2 * w:
        prompt = prompt[:w] + " " + prompt[-w:] if spec["truncation"] == "head_tail" else prompt[:2 * w]
    return prompt


def _valid_utf8(s: str) -> str:
    # Lone surrogates are legal in a Python str but not in UTF-8, which the tokenizer requires.
    return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _cut(ids: list[int], spec: dict) -> list[int]:
    head, tail = spec["head_tokens"], spec["tail_tokens"]
    if len(ids) <= head + tail:
        return ids
    return ids[:head] + ids[len(ids) - tail:]  # not ids[-tail:]: tail may be 0


def _content_ids(tok: Tokenizer, prompts: list[str], spec: dict) -> list[list[int]]:
    texts = [clip_chars(p, spec) for p in prompts]
    try:
        encs = tok.encode_batch(texts, add_special_tokens=False)
    except TypeError:  # a lone surrogate somewhere in the batch
        encs = tok.encode_batch([_valid_utf8(t) for t in texts], add_special_tokens=False)
    return [_cut(e.ids, spec) for e in encs]


def encode_one(tok: Tokenizer, prompt: str, spec: dict, ids: tuple[int, int, int] | None = None) -> np.ndarray:
    """input_ids [1, L] of one prompt (its attention mask is all ones): the fast serving path."""
    cls, sep, _ = ids or special_ids(tok)
    text = clip_chars(prompt, spec)
    try:
        content = tok.encode(text, add_special_tokens=False).ids
    except TypeError:
        content = tok.encode(_valid_utf8(text), add_special_tokens=False).ids
    return np.array([[cls, *_cut(content, spec), sep]], dtype=np.int64)


def encode(tok: Tokenizer, prompts: list[str], spec: dict,
           ids: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [n, L]: [CLS] head … tail [SEP], padded to the longest."""
    cls, sep, pad = ids or special_ids(tok)
    rows = _content_ids(tok, list(prompts), spec)
    width = max((len(r) for r in rows), default=0) + 2
    input_ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r) + 2
        input_ids[i, 0], input_ids[i, 1:n - 1], input_ids[i, n - 1] = cls, r, sep
        mask[i, :n] = 1
    return input_ids, mask
