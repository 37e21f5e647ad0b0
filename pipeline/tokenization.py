"""Tokenization shared by training and serving: the spec, the exact fast WordPiece path, templates and
the head + tail cut. Training and serving both call `encode` (or `encode_one`), so they cut prompts
identically (docs/contracts.md §2).

Imports only numpy, tokenizers and the standard library: it is part of the torch-free runtime.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


def make_spec(max_tokens: int, truncation: str = "head_tail", head_fraction: float = 0.75,
              char_window: int | None = None) -> dict:
    """router.json's `tokenizer` dict: content tokens kept from the start and the end, and the char budget.

    `char_window` bounds tokenization cost (the runtime's largest per-call cost for long prompts):
    longer prompts are cut to that many characters before tokenizing, split between head and tail
    like the tokens. The default, 6 characters per token, covers English text (about 4.5 per
    BERT word piece) with room to spare.
    """
    if truncation not in ("head_tail", "head"):
        raise ValueError(f"truncation must be 'head_tail' or 'head', got {truncation!r}")
    if max_tokens < 3:
        raise ValueError(f"max_tokens must leave room for [CLS], [SEP] and one token, got {max_tokens}")
    content = max_tokens - 2
    head = content if truncation == "head" else min(content, max(1, int(content * head_fraction + 0.5)))
    return {"max_tokens": max_tokens, "truncation": truncation, "head_tokens": head,
            "tail_tokens": content - head, "char_window": char_window or 6 * max_tokens}


class _CharTable(dict):
    """Code point -> what the tokenizer's normalizer and pre-tokenizer make of that one character, for
    `str.translate`: "" (dropped), " " (a separator), " p " (punctuation, a word on its own) or the
    normalized character(s). Filled on first sight by asking the tokenizer itself, so it is exact per
    character; characters whose result depends on their neighbours map to UNSAFE (the caller then
    uses the library for the whole text).
    """

    UNSAFE = "\x00"  # never in the output otherwise: the normalizer drops NUL
    _LIMIT = 50_000  # bounded memory; beyond it new characters are UNSAFE, the library handles them

    def __init__(self, tok: Tokenizer):
        super().__init__()
        self.normalizer, self.pre_tokenizer = tok.normalizer, tok.pre_tokenizer

    def __missing__(self, code: int) -> str:
        try:
            out = self._classify(chr(code)) if len(self) < self._LIMIT else self.UNSAFE
        except Exception:  # a lone surrogate cannot reach the library as UTF-8
            out = self.UNSAFE
        self[code] = out
        return out

    def _classify(self, c: str) -> str:
        if c == "\u03a3" or _reorders(c):  # Σ lowercases by context (final sigma); see _reorders
            return self.UNSAFE
        out = []
        for d in self.normalizer.normalize_str(c):
            pieces = [w for w, _ in self.pre_tokenizer.pre_tokenize_str(f"a{d}a")]
            if pieces == [f"a{d}a"] and not d.isspace():  # part of a word (str.split must not cut it)
                out.append(d)
            elif pieces == ["a", d, "a"]:  # punctuation: a word of its own
                out.append(f" {d} ")
            elif pieces == ["a", "a"]:  # whitespace
                out.append(" ")
            else:
                return self.UNSAFE
        return "".join(out)


def _reorders(c: str) -> bool:
    """Whether `c` decomposes to a combining mark that is not Mn: canonical reordering could move it past
    marks that accent stripping removes, so per-character normalization might differ from the text's."""
    return any(unicodedata.combining(d) and unicodedata.category(d) != "Mn" for d in unicodedata.normalize("NFD", c))


class FastWordPiece:
    """BERT WordPiece in plain Python, token for token what `tokenizers` produces.

    `tokenizers` spends most of a single short call on normalisation and offset bookkeeping. For
    ASCII text that work reduces to dropping control characters, lowercasing and one regex; other
    text goes through a per-character table (`_CharTable`) and `str.split`. Words repeat, so a word
    cache makes this several times faster per prompt. Training and serving both use it (through
    `encode`), so they agree by construction; tests check it against `tokenizers`.
    """

    # Control characters BertNormalizer removes (tab, newline and carriage return become spaces).
    _DROP = {c: None for c in [*range(0, 9), 11, 12, *range(14, 32), 127]}
    _CACHE_WORDS, _CACHE_LEN = 100_000, 32  # bounded memory: at most 100k words of up to 32 characters

    def __init__(self, tok: Tokenizer, vocab: dict[str, int], unk: int, prefix: str, max_chars: int,
                 lowercase: bool, added: list[str]):
        self.vocab, self.unk, self.prefix, self.max_chars, self.lowercase = vocab, unk, prefix, max_chars, lowercase
        self.added = added  # special tokens matched verbatim in raw text: those prompts take the slow path
        # BertPreTokenizer on ASCII: runs of letters/digits, and every other printable character alone.
        self.words = re.compile(r"[a-z0-9]+|[^a-z0-9\s]" if lowercase else r"[A-Za-z0-9]+|[^A-Za-z0-9\s]")
        self.chars = _CharTable(tok)
        self.longest = max(map(len, vocab))  # no piece is longer: bounds the greedy search
        self.cache: dict[str, list[int]] = {}  # word -> ids; idempotent, so sharing it across threads is safe

    @classmethod
    def of(cls, tok: Tokenizer) -> "FastWordPiece | None":
        """The fast path for a BERT-style tokenizer, or None when its pipeline is anything else."""
        config = json.loads(tok.to_str())
        norm, pre, model = config.get("normalizer") or {}, config.get("pre_tokenizer") or {}, config["model"]
        added = config.get("added_tokens") or []
        if (norm.get("type") != "BertNormalizer" or not norm.get("clean_text") or pre.get("type") != "BertPreTokenizer"
                or model.get("type") != "WordPiece" or model.get("unk_token") not in model["vocab"]
                or any(t.get("normalized") for t in added)):  # those would match after normalisation
            return None
        return cls(tok, model["vocab"], model["vocab"][model["unk_token"]], model.get("continuing_subword_prefix", "##"),
                   model.get("max_input_chars_per_word", 100), bool(norm.get("lowercase")),
                   [t["content"] for t in added])

    def word_ids(self, word: str) -> list[int]:
        ids = self.cache.get(word)
        if ids is None:
            ids = self._pieces(word)
            if len(word) <= self._CACHE_LEN and len(self.cache) < self._CACHE_WORDS:
                self.cache[word] = ids
        return ids

    def _pieces(self, word: str) -> list[int]:
        """Greedy longest-match-first pieces; a word with an unmatched remainder is one [UNK]."""
        if len(word) > self.max_chars:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            for end in range(min(len(word), start + self.longest), start, -1):
                i = self.vocab.get(word[start:end] if start == 0 else self.prefix + word[start:end])
                if i is not None:
                    break
            else:
                return [self.unk]
            ids.append(i)
            start = end
        return ids

    def __call__(self, text: str) -> list[int] | None:
        """The ids of `text`, or None where only the library is exact (special tokens, a few characters)."""
        if any(t in text for t in self.added):  # special tokens are matched before normalising
            return None
        if text.isascii():
            text = text.translate(self._DROP)
            words = self.words.findall(text.lower() if self.lowercase else text)
        else:
            normalized = text.translate(self.chars)
            if _CharTable.UNSAFE in normalized:
                return None
            words = normalized.split()
        out: list[int] = []
        for word in words:
            out += self.word_ids(word)
        return out


class RouterTokenizer:
    """A `tokenizers.Tokenizer` (truncation and padding off) with its special ids and exact fast path.

    Every other attribute is the wrapped tokenizer's (`get_vocab_size`, `token_to_id`, `encode`, ...).
    """

    def __init__(self, tok: Tokenizer):
        tok.no_truncation()  # `encode` truncates and pads itself; a tokenizer.json may configure both
        tok.no_padding()
        self.tokenizer = tok
        self.fast = FastWordPiece.of(tok)
        self.cls, self.sep, self.pad = special_ids(tok)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def content_ids(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens; any str works (lone surrogates are replaced)."""
        ids = self.fast(text) if self.fast is not None else None
        if ids is not None:
            return ids
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates are legal in a Python str but not in UTF-8
            return self.tokenizer.encode(_valid_utf8(text), add_special_tokens=False).ids

    def batch_content_ids(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(texts)
        slow = []
        for i, t in enumerate(texts):
            out[i] = self.fast(t) if self.fast is not None else None
            if out[i] is None:
                slow.append(i)
        if slow:  # in parallel inside `tokenizers`
            try:
                encs = self.tokenizer.encode_batch([texts[i] for i in slow], add_special_tokens=False)
            except TypeError:
                encs = self.tokenizer.encode_batch([_valid_utf8(texts[i]) for i in slow], add_special_tokens=False)
            for i, e in zip(slow, encs):
                out[i] = e.ids
        return out  # type: ignore[return-value]


def load_tokenizer(path: str | Path) -> RouterTokenizer:
    """A `tokenizer.json` file (or a folder holding one), ready for `encode`."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    return RouterTokenizer(Tokenizer.from_file(str(path)))


def special_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """(cls, sep, pad) ids: BERT names first, then RoBERTa-style names, then 0."""
    def first(*names: str) -> int:
        for n in names:
            i = tok.token_to_id(n)
            if i is not None:
                return i
        return 0
    return first("[CLS]", "<s>", "<cls>"), first("[SEP]", "</s>", "<sep>"), first("[PAD]", "<pad>")


TEMPLATES_VERSION = 2  # 2: prompts are matched (and read on) after `template_edges`
_EDGE_SPACE = " \t\n\r\f\v"  # ASCII only: str.strip() and JavaScript's trim() differ beyond it
_LINE_BREAK = re.compile(r"\r\n?")


def template_edges(prompt: str) -> str:
    """The prompt with \\r\\n and \\r line breaks as \\n and no ASCII whitespace at either end: what templates
    (version 2) are learned on and matched against, so a client that adds a trailing newline or sends
    Windows line breaks still has its template recognised. Token-neutral for tokenizers that split on
    whitespace."""
    return _LINE_BREAK.sub("\n", prompt).strip(_EDGE_SPACE)


def compact_templates(prompt: str, spec: dict) -> str:
    """The prompt with a learned shared prefix and suffix shortened to their first / last few characters.

    Prompts built from one template (a long system prompt, few-shot examples, a closing instruction)
    differ only in the middle, which a head + tail cut would drop. `spec["templates"]` (learned from
    the training prompts by `learn_templates`) lists such prefixes and suffixes, longest first, each
    with how many characters to keep (enough to tell templates apart). The first listed prefix the
    prompt starts with, then the first listed suffix the rest ends with, are shortened; lengths are
    in Unicode code points. Templates of version 2 (`learn_templates` today) first put the prompt
    through `template_edges`, matched or not. Without templates the prompt is returned unchanged.
    """
    templates = spec.get("templates")
    if not templates:
        return prompt
    if templates.get("version", 1) >= 2:
        prompt = template_edges(prompt)
    (k, prefixes), (_, suffixes) = _template_index(templates)
    head, body, tail = "", prompt, ""
    for t in prefixes.get(body[:k], ()):
        if body.startswith(t["text"]):
            head, body = t["text"][:t["keep"]], body[len(t["text"]):]
            break
    for t in suffixes.get(body[len(body) - k:] if k else "", ()):
        if body.endswith(t["text"]):
            body, tail = body[:len(body) - len(t["text"])], t["text"][len(t["text"]) - t["keep"]:]
            break
    return head + body + tail


_INDEXES: dict[int, tuple] = {}


def _template_index(templates: dict) -> tuple:
    """Per side: (k, {first (last) k characters: templates in list order}), k the shortest template's
    length up to 16, so a prompt is checked against the few templates that can match, not all of them.
    Same result as trying every template in order; cached per templates object."""
    cached = _INDEXES.get(id(templates))
    if cached is not None and cached[0] is templates:
        return cached[1]
    sides = []
    for key, suffix in (("prefixes", False), ("suffixes", True)):
        k = min([16, *(len(t["text"]) for t in templates[key])])
        index: dict[str, list] = {}
        for t in templates[key]:
            index.setdefault(t["text"][len(t["text"]) - k:] if suffix else t["text"][:k], []).append(t)
        sides.append((k, index))
    if len(_INDEXES) > 64:  # bounded: a long-lived process loads few bundles
        _INDEXES.clear()
    _INDEXES[id(templates)] = (templates, tuple(sides))
    return tuple(sides)


def learn_templates(prompts: list[str], min_support: int = 20, min_chars: int = 64, keep_chars: int = 32,
                    max_templates: int = 256) -> dict:
    """Shared prefixes and suffixes of at least `min_chars` characters that `min_support` or more prompts
    start (end) with, for `compact_templates`: `{"version": 2, "prefixes": [{"text", "keep", "support"}],
    "suffixes": [...]}`, learned on the prompts after `template_edges`.

    Sorted prompts that share a prefix are neighbours, so the longest prefix that prompt i shares with
    at least `min_support - 1` others is the best window minimum of adjacent common-prefix lengths.
    A prefix is cut back to the last whitespace (a template never ends inside the varying word), and
    `keep` is its first whitespace-delimited stretch of at most `keep_chars` characters.
    """
    def side(texts: list[str], reverse: bool) -> list[dict]:
        texts = sorted({t[::-1] if reverse else t for t in texts})
        n, w = len(texts), min_support - 1
        if n < min_support or w < 1:
            return []
        lcp = np.array([len(os.path.commonprefix([a, b])) for a, b in zip(texts, texts[1:])])
        window = np.lib.stride_tricks.sliding_window_view(lcp, w).min(1)  # window j covers texts j..j+w
        best = np.zeros(n, dtype=np.int64)
        for j, v in enumerate(window):
            best[j:j + w + 1] = np.maximum(best[j:j + w + 1], v)
        found: dict[str, int] = {}
        for t, length in zip(texts, best):
            if length < min_chars:
                continue
            cut = t[:length]
            cut = cut[:max(cut.rfind(" "), cut.rfind("\n")) + 1] if not t[length:length + 1].isspace() else cut
            if len(cut) >= min_chars:
                found[cut] = found.get(cut, 0) + 1
        out = []
        for text, support in found.items():
            if support < min_support:
                continue
            part = text[:keep_chars]  # (reversed for a suffix) cut back to whitespace: no half words
            part = part[:max(part.rfind(" "), part.rfind("\n")) + 1] if len(text) > keep_chars else part
            out.append({"text": text[::-1] if reverse else text, "keep": len(part), "support": support})
        out.sort(key=lambda t: (-t["support"] * len(t["text"]), t["text"]))
        return sorted(out[:max_templates], key=lambda t: (-len(t["text"]), t["text"]))

    prompts = [template_edges(p) for p in prompts]
    return {"version": TEMPLATES_VERSION, "prefixes": side(prompts, False), "suffixes": side(prompts, True)}


def clip_chars(prompt: str, spec: dict) -> str:
    """Keep at most `char_window` characters, shared between head and tail like the tokens."""
    window = spec["char_window"]
    if len(prompt) <= window:
        return prompt
    head, tail = spec["head_tokens"], spec["tail_tokens"]
    tail_chars = window * tail // (head + tail)
    if tail_chars == 0:
        return prompt[:window]
    return prompt[:window - tail_chars] + " " + prompt[len(prompt) - tail_chars:]


def _valid_utf8(s: str) -> str:
    return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _cut(ids: list[int], spec: dict) -> list[int]:
    head, tail = spec["head_tokens"], spec["tail_tokens"]
    if len(ids) <= head + tail:
        return ids
    return ids[:head] + ids[len(ids) - tail:]  # not ids[-tail:]: tail may be 0


def encode_one(tok: RouterTokenizer, prompt: str, spec: dict) -> np.ndarray:
    """input_ids [1, L] of one prompt (its attention mask is all ones): the serving path."""
    return np.array([[tok.cls, *_cut(tok.content_ids(clip_chars(compact_templates(prompt, spec), spec)), spec), tok.sep]],
                    dtype=np.int64)


def encode(tok: RouterTokenizer, prompts: list[str], spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [n, L]: [CLS] head … tail [SEP], padded to the longest."""
    rows = [_cut(ids, spec) for ids in tok.batch_content_ids([clip_chars(compact_templates(p, spec), spec)
                                                               for p in prompts])]
    width = max((len(r) for r in rows), default=0) + 2
    input_ids = np.full((len(rows), width), tok.pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r) + 2
        input_ids[i, 0], input_ids[i, 1:n - 1], input_ids[i, n - 1] = tok.cls, r, tok.sep
        mask[i, :n] = 1
    return input_ids, mask
