"""The torch-free runtime: tokenization shared with training, and the Router that serves a bundle.

Imports only numpy, onnxruntime, tokenizers and the standard library, so that serving a bundle
never pays for torch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from . import routing

# ---------------------------------------------------------------------------------------------
# Tokenization: training and serving both call `encode`, so they cut prompts identically.
# ---------------------------------------------------------------------------------------------


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


def compact_templates(prompt: str, spec: dict) -> str:
    """The prompt with a learned shared prefix and suffix shortened to their first / last few characters.

    Prompts built from one template (a long system prompt, few-shot examples, a closing instruction)
    differ only in the middle, which a head + tail cut would drop. `spec["templates"]` (learned from
    the training prompts by `learn_templates`) lists such prefixes and suffixes, longest first, each
    with how many characters to keep (enough to tell templates apart). The first listed prefix the
    prompt starts with, then the first listed suffix the rest ends with, are shortened; lengths are
    in Unicode code points. Without templates the prompt is returned unchanged.
    """
    templates = spec.get("templates")
    if not templates:
        return prompt
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
    start (end) with, for `compact_templates`: `{"prefixes": [{"text", "keep", "support"}], "suffixes": [...]}`.

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

    return {"prefixes": side(prompts, False), "suffixes": side(prompts, True)}


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


# ---------------------------------------------------------------------------------------------
# The Router: one bundle, one ONNX session, stateless per call (safe to share between threads).
# ---------------------------------------------------------------------------------------------

SCHEMA_VERSION = 2  # 2: router.json carries bundle_sha256 and is validated on load


class RouterError(ValueError):
    """A bundle, input file or routing setting the runtime cannot use: one line naming the file (and row)
    and the reason.

    With the training stack installed, what the runtime raises is also a `pipeline.common.DataError`
    (the CLI prints it as one line, exit code 2); without it (a runtime-only install, where
    pipeline.common's rich is absent) it is this class alone. Catch `RouterError` in a service.
    """

    exit_code = 2

    def __init__(self, reason: str, *, file: str | os.PathLike | None = None, row: int | None = None):
        self.reason, self.file, self.row = reason, file, row
        where = "" if file is None else f"{file}" + (f", row {row}" if row is not None else "") + ": "
        Exception.__init__(self, where + reason)


_ERROR_CLASS: list[type] = []


def router_error(reason: str, file: str | os.PathLike | None = None, row: int | None = None) -> RouterError:
    """A RouterError that is also the pipeline's DataError when pipeline.common can be imported (looked up
    on the first error only: the serving path imports nothing of the training side)."""
    if not _ERROR_CLASS:
        try:
            from .common import DataError
        except ImportError:
            _ERROR_CLASS.append(RouterError)
        else:
            _ERROR_CLASS.append(type("RouterError", (RouterError, DataError),
                                     {"__module__": __name__, "__doc__": RouterError.__doc__}))
    return _ERROR_CLASS[0](reason, file=file, row=row)


def _bundle_error(reason: str, file: Path | None = None) -> RouterError:
    return router_error(reason, file)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


MAX_ROUTER_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 32  # router.json nests about 6 deep (training_config, metrics.parity)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def canonical_router_json(config: dict) -> bytes:
    """router.json without `bundle_sha256`, as sorted-key compact ASCII JSON: the form the digest covers."""
    body = {k: v for k, v in config.items() if k != "bundle_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def bundle_digest(config: dict) -> str:
    """`bundle_sha256`: sha256 over each listed file's sha256 (sorted by name) and the canonical router.json."""
    h = hashlib.sha256(b"prerouter bundle\n")
    for name, digest in sorted(config.get("files", {}).items()):
        h.update(json.dumps([name, digest]).encode("ascii") + b"\n")
    h.update(canonical_router_json(config))
    return h.hexdigest()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fraction_key(k) -> float | None:
    try:
        f = float(k)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _too_deep(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


def _bundle_path(root: Path, rel, where: str) -> Path:
    """`root / rel` for a relative path that stays inside the bundle folder (symbolic links included)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ValueError(f"{where} must be a file name inside the bundle, got {rel!r}")
    parts = re.split(r"[/\\]", rel)
    if rel.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", rel) or ".." in parts:
        raise ValueError(f"{where} {rel!r} leaves the bundle folder")
    full = root / rel
    try:
        inside = full.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symbolic link loop
        inside = False
    if not inside:
        raise ValueError(f"{where} {rel!r} leaves the bundle folder")
    return full


def check_router_json(config, root: Path, verify: bool = True) -> None:
    """Raise ValueError naming the first thing in router.json that the runtime cannot use as it is.

    A small hand-written schema (the runtime stays free of schema libraries): required keys and
    their types, models (unique names, indices 0..n-1, costs), tokenizer spec, decision (known kind,
    pair models among the models, numeric thresholds in [0, 1] that never rise with the strong
    fraction, λ ≥ 0), every path inside the bundle folder, and with `verify` the `files` hashes and
    `bundle_sha256` present. It checks structure only; load compares the hashes.
    """
    if not isinstance(config, dict):
        raise ValueError(f"must be a JSON object, got {type(config).__name__}")
    if _too_deep(config, MAX_JSON_DEPTH):
        raise ValueError(f"nests deeper than {MAX_JSON_DEPTH} levels")
    required = ["models", "tokenizer", "onnx", "decision"] + (["files", "bundle_sha256"] if verify else [])
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"required key{'s' * (len(missing) > 1)} missing: {', '.join(missing)}")
    optional = {"name": (str, type(None)), "pipeline_version": str, "created_at": str, "outputs": dict,
                "metrics": dict, "latency": dict, "data_hash": (str, type(None)), "training_config": dict,
                "export_fingerprint": (str, type(None)), "conformance": dict}
    for key, kind in optional.items():
        if key in config and not isinstance(config[key], kind):
            raise ValueError(f"{key} has the wrong type ({type(config[key]).__name__})")

    models = config["models"]
    if not isinstance(models, list) or len(models) < 2:
        raise ValueError("models must be a list of at least 2 models")
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise ValueError(f"models[{i}] must be an object with a non-empty string name")
        if not _is_int(m.get("index")):
            raise ValueError(f"models[{i}].index must be an integer")
        cost = m.get("cost")
        if cost is not None and not (_is_number(cost) and cost >= 0):
            raise ValueError(f"models[{i}].cost must be a number >= 0 or null, got {cost!r}")
    names = [m["name"] for m in models]
    if len(set(names)) != len(names):
        raise ValueError("models has duplicate names")
    if sorted(m["index"] for m in models) != list(range(len(models))):
        raise ValueError(f"models' indices must be 0..{len(models) - 1}, each once")

    tok = config["tokenizer"]
    if not isinstance(tok, dict):
        raise ValueError("tokenizer must be an object")
    _bundle_path(root, tok.get("file", "tokenizer.json"), "tokenizer.file")
    for key in ("max_tokens", "head_tokens", "tail_tokens", "char_window"):
        if not _is_int(tok.get(key)) or tok[key] < (3 if key == "max_tokens" else 1 if key == "char_window" else 0):
            raise ValueError(f"tokenizer.{key} must be a positive integer, got {tok.get(key)!r}")
    if tok.get("truncation") not in ("head_tail", "head"):
        raise ValueError(f"tokenizer.truncation {tok.get('truncation')!r} is not head_tail or head")
    if tok["head_tokens"] + tok["tail_tokens"] > tok["max_tokens"] - 2:
        raise ValueError("tokenizer.head_tokens + tail_tokens exceed max_tokens - 2")
    templates = tok.get("templates")
    if templates:
        if not isinstance(templates, dict):
            raise ValueError("tokenizer.templates must be an object")
        for side in ("prefixes", "suffixes"):
            items = templates.get(side)
            if not isinstance(items, list) or not all(
                    isinstance(t, dict) and isinstance(t.get("text"), str) and _is_int(t.get("keep"))
                    and 0 <= t["keep"] <= len(t["text"]) for t in items):
                raise ValueError(f"tokenizer.templates.{side} must be a list of {{text, keep}}")

    onnx = config["onnx"]
    if not isinstance(onnx, dict):
        raise ValueError("onnx must be an object")
    for key in ("fp32", "int8"):
        _bundle_path(root, onnx.get(key), f"onnx.{key}")
    if "opset" in onnx and not _is_int(onnx["opset"]):
        raise ValueError("onnx.opset must be an integer")

    d = config["decision"]
    if not isinstance(d, dict):
        raise ValueError("decision must be an object")
    if d.get("kind") not in ("pair", "multi"):
        raise ValueError(f"decision is unusable: kind {d.get('kind')!r} (pair or multi)")
    if d["kind"] == "pair" or "weak" in d or "strong" in d:
        unknown = [d.get(k) for k in ("weak", "strong") if d.get(k) not in names]
        if unknown:
            raise ValueError(f"decision is unusable: unknown pair models {unknown}")
        if d["weak"] == d["strong"]:
            raise ValueError("decision: weak and strong are the same model")
    for key, lo, hi in (("default_strong_fraction", 0.0, 1.0), ("default_cost_weight", 0.0, math.inf)):
        if key in d and not (_is_number(d[key]) and lo <= d[key] <= hi):
            raise ValueError(f"decision.{key} must be a number in [{lo:g}, {hi:g}], got {d[key]!r}")
    for key, key_hi, value_hi in (("thresholds", 1.0, 1.0), ("cost_lambdas", math.inf, math.inf)):
        table = d.get(key, {})
        if not isinstance(table, dict):
            raise ValueError(f"decision.{key} must be an object")
        points = []
        for k, v in table.items():
            f = _fraction_key(k)
            if f is None or not 0.0 <= f <= key_hi:
                raise ValueError(f"decision.{key} key {k!r} is not a number in [0, {key_hi:g}]")
            if not (_is_number(v) and 0.0 <= v <= value_hi):
                raise ValueError(f"decision.{key}[{k!r}] must be a number in [0, {value_hi:g}], got {v!r}")
            points.append((f, v))
        if key == "thresholds":  # a larger share of strong calls never needs a higher threshold
            points.sort()
            if any(b[1] > a[1] for a, b in zip(points, points[1:])):
                raise ValueError("decision.thresholds must not rise as the strong fraction grows")

    if "files" in config:
        files = config["files"]
        if not isinstance(files, dict):
            raise ValueError("files must be an object of file name -> sha256")
        for name, digest in files.items():
            _bundle_path(root, name, "files key")
            if name == "router.json" or not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ValueError(f"files[{name!r}] must be the sha256 (64 hex digits) of a file other than router.json")
        if verify:
            for need in (tok.get("file", "tokenizer.json"), onnx["fp32"], onnx["int8"]):
                if need not in files:
                    raise ValueError(f"files does not list {need!r}, so its sha256 cannot be checked")
    if "bundle_sha256" in config and not (isinstance(config["bundle_sha256"], str)
                                          and _HEX64.fullmatch(config["bundle_sha256"])):
        raise ValueError("bundle_sha256 must be 64 hex digits")


def relative_costs(models: list[dict]) -> np.ndarray:
    """cost_j / max cost in index order; an unknown cost counts as index + 1, as calibration assumed."""
    return routing.relative_costs(routing.model_costs(models))


def _prompt_list(prompts) -> list[str]:
    """`prompts` as a list, or a TypeError that says what was passed instead of a list of str."""
    if isinstance(prompts, (str, bytes, bytearray, dict)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"pass a list of prompts (str), got {type(prompts).__name__}"
                        + (": wrap one prompt in a list, or call route()" if isinstance(prompts, str) else ""))
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is {type(p).__name__}, not str")
    return prompts


class Router:
    """Route prompts with an exported bundle: `Router.load(path).route(prompt) -> model name`."""

    def __init__(self, session: ort.InferenceSession, tokenizer: RouterTokenizer, config: dict, path: Path):
        self.path, self.config, self.session, self.tokenizer = path, config, session, tokenizer
        self.spec = config["tokenizer"]
        self.decision = config["decision"]
        ordered = sorted(config["models"], key=lambda m: m["index"])
        self.models: list[str] = [m["name"] for m in ordered]
        self._rel_cost = relative_costs(ordered)
        kind = self.decision.get("kind")
        missing = [self.decision.get(k) for k in ("weak", "strong") if kind == "pair"
                   and self.decision.get(k) not in self.models]
        if kind not in ("pair", "multi") or missing:
            raise _bundle_error(f"router.json decision is unusable: kind {kind!r}"
                                + (f", unknown pair models {missing}" if missing else ""), path / "router.json")
        self._inputs = {i.name for i in session.get_inputs()}  # the exporter drops unused inputs
        self._outputs = [session.get_outputs()[0].name]
        if self.decision["kind"] == "pair":
            self._weak = self.models.index(self.decision["weak"])
            self._strong = self.models.index(self.decision["strong"])
            # (strong fraction, threshold) from "never strong" to "always strong"; scores lie in [0, 1].
            self._threshold_curve = routing.threshold_curve(self.decision.get("thresholds", {}))

    @classmethod
    def load(cls, path: str | Path, threads: int = 1, quantized: bool = True, verify: bool = True) -> "Router":
        """Read and validate router.json, check the bundle digest and every file's sha256, open the (int8) graph.

        Any problem with the bundle is a RouterError (also a DataError with the training stack) naming
        the file and the reason (`verify=False` skips the hashes, not the structure checks).
        """
        path = Path(path)
        files = path.resolve()  # one version throughout, even if the bundle is rewritten meanwhile
        meta_path = path / "router.json"
        if not (files / "router.json").is_file():
            raise _bundle_error("not a bundle: router.json is missing", path)
        try:
            with open(files / "router.json", "rb") as f:
                raw = f.read(MAX_ROUTER_JSON_BYTES + 1)
            if len(raw) > MAX_ROUTER_JSON_BYTES:
                raise _bundle_error(f"router.json is larger than {MAX_ROUTER_JSON_BYTES >> 20} MiB", meta_path)
            config = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise _bundle_error(f"router.json is not valid JSON: {_one_line(e)}", meta_path) from None
        except RecursionError:
            raise _bundle_error(f"router.json is invalid: nests deeper than {MAX_JSON_DEPTH} levels", meta_path) from None
        version = config.get("schema_version") if isinstance(config, dict) else None
        if version != SCHEMA_VERSION:
            if _is_int(version) and 1 <= version < SCHEMA_VERSION:
                raise _bundle_error(f"schema_version {version}: made by an older prerouter, without the checks this "
                                    f"runtime needs; re-export it (prerouter export NAME)", meta_path)
            raise _bundle_error(f"schema_version {version!r} is not supported "
                                f"(this runtime reads {SCHEMA_VERSION})", meta_path)
        try:
            check_router_json(config, files, verify)
        except ValueError as e:
            raise _bundle_error(f"router.json is invalid: {e}", meta_path) from None
        if verify:
            if bundle_digest(config) != config["bundle_sha256"]:
                raise _bundle_error("bundle_sha256 mismatch: router.json or its list of files changed after export",
                                    meta_path)
            for name, digest in config["files"].items():
                f = files / name
                if not f.is_file():
                    raise _bundle_error("listed in router.json but missing", path / name)
                if _sha256(f) != digest:
                    raise _bundle_error("sha256 mismatch: the file changed after export", path / name)
        model_file = files / config["onnx"]["int8" if quantized else "fp32"]
        tokenizer_file = files / config["tokenizer"].get("file", "tokenizer.json")
        for f in (model_file, tokenizer_file):
            if not f.is_file():
                raise _bundle_error("missing from the bundle", path / f.name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise _bundle_error(f"not a usable ONNX graph: {_one_line(e)}", model_file) from None
        try:
            tokenizer = load_tokenizer(tokenizer_file)
        except Exception as e:
            raise _bundle_error(f"not a usable tokenizer: {_one_line(e)}", tokenizer_file) from None
        router = cls(session, tokenizer, config, path)
        router._check_graph(model_file)
        return router

    def _check_graph(self, model_file: Path) -> None:
        """The graph reads input_ids and returns one logit per model in router.json: run it on an empty prompt."""
        if "input_ids" not in self._inputs:
            raise _bundle_error(f"the graph has no input_ids input (inputs: {sorted(self._inputs)})", model_file)
        try:
            out = self._run(*encode(self.tokenizer, [""], self.spec))
        except Exception as e:
            raise _bundle_error(f"the graph does not run: {_one_line(e)}", model_file) from None
        if out.ndim != 2 or out.shape[1] != len(self.models):
            raise _bundle_error(f"router.json lists {len(self.models)} models but the graph returns "
                                f"{out.shape[1] if out.ndim == 2 else out.shape} outputs per prompt; re-export the bundle",
                                model_file)

    # -- scores ---------------------------------------------------------------------------------

    def _run(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": mask}
        return self.session.run(self._outputs, {k: v for k, v in feed.items() if k in self._inputs})[0]

    def logits(self, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """Raw logits [n, len(models)], float32; prompts are batched and padded per batch."""
        prompts = _prompt_list(prompts)
        out = [np.zeros((0, len(self.models)), dtype=np.float32)]
        for i in range(0, len(prompts), batch_size):
            out.append(self._run(*encode(self.tokenizer, prompts[i:i + batch_size], self.spec)))
        return np.concatenate(out)

    def scores(self, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """P(model j succeeds / wins) for every prompt: [n, len(models)] float64."""
        return routing.sigmoid(self.logits(prompts, batch_size))

    def score_one(self, prompt: str) -> np.ndarray:
        """P(model j succeeds / wins) for one prompt: [len(models)] float64 (batch 1, the serving path)."""
        ids = encode_one(self.tokenizer, prompt, self.spec)
        return routing.sigmoid(self._run(ids, np.ones_like(ids))[0])

    # -- decisions ------------------------------------------------------------------------------

    def threshold_for(self, strong_fraction: float) -> float:
        """Pair routing: the score threshold that sent `strong_fraction` of validation prompts to strong."""
        return routing.threshold_for(self._threshold_curve, strong_fraction)

    def routing_score(self, p: np.ndarray) -> np.ndarray:
        """Pair routing score (1 + p_strong - p_weak) / 2 in [0, 1]; higher means the strong model is needed."""
        return routing.pair_score(p, self._weak, self._strong)

    def check_settings(self, strong_fraction=None, threshold=None, cost_weight=None) -> None:
        """Raise RouterError for a setting this bundle's decision does not use or a value out of range.

        A `pair` decision takes `strong_fraction` (in [0, 1]) or `threshold` (a number), not both, and no
        `cost_weight`; a `multi` decision takes `cost_weight` (λ ≥ 0) and neither of the others. A
        setting that would be ignored is an error, so a caller never routes by a rule it did not ask for.
        """
        kind = self.decision["kind"]
        given = [k for k, v in (("strong_fraction", strong_fraction), ("threshold", threshold),
                                ("cost_weight", cost_weight)) if v is not None]
        allowed = ("strong_fraction", "threshold") if kind == "pair" else ("cost_weight",)
        wrong = [k for k in given if k not in allowed]
        if wrong:
            raise router_error(f"{' and '.join(wrong)} does not apply to this bundle: its decision is {kind!r}, which "
                         f"takes {' or '.join(allowed)}")
        if strong_fraction is not None and threshold is not None:
            raise router_error("give strong_fraction or threshold, not both")
        for name, value, lo, hi in (("strong_fraction", strong_fraction, 0.0, 1.0),
                                    ("threshold", threshold, -math.inf, math.inf),
                                    ("cost_weight", cost_weight, 0.0, math.inf)):
            if value is not None and not (_is_number(value) and lo <= value <= hi):
                raise router_error(f"{name} must be a finite number" + (f" in [{lo:g}, {hi:g}]" if lo > -math.inf else "")
                             + f", got {value!r}")

    def choose(self, p: np.ndarray, strong_fraction=None, threshold=None, cost_weight=None) -> np.ndarray:
        """Model index per row of probabilities p [n, len(models)] (or one index for one row), under
        the bundle's decision and these settings (checked by `check_settings`)."""
        self.check_settings(strong_fraction, threshold, cost_weight)
        if self.decision["kind"] == "pair":
            if threshold is None:
                fraction = self.decision.get("default_strong_fraction", 0.5) if strong_fraction is None else strong_fraction
                threshold = self.threshold_for(fraction)
            return np.where(self.routing_score(p) >= threshold, self._strong, self._weak)
        lam = self.default_cost_weight() if cost_weight is None else cost_weight
        return routing.choose(p, self._rel_cost, lam)

    def default_cost_weight(self) -> float:
        """N models: λ from router.json (`default_cost_weight`, else the calibrated λ nearest budget 0.5)."""
        return routing.default_cost_weight(self.decision)

    def win_probability(self, prompts: list[str], model_a: str, model_b: str) -> np.ndarray:
        """Pairwise bundles: P(model_a beats model_b) on each prompt, sigmoid(logit_a - logit_b)."""
        if "win_probability" not in self.decision:
            raise ValueError("this bundle was not trained on pairwise battles: it has no win probabilities")
        unknown = [m for m in (model_a, model_b) if m not in self.models]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; the bundle routes between {self.models}")
        logits = self.logits(prompts).astype(np.float64)
        return routing.sigmoid(logits[:, self.models.index(model_a)] - logits[:, self.models.index(model_b)])

    def route(self, prompt: str, strong_fraction: float | None = None, threshold: float | None = None,
              cost_weight: float | None = None) -> str:
        """The model name one prompt is routed to (batch 1: the latency-critical path)."""
        if not isinstance(prompt, str):
            raise TypeError(f"route takes one prompt as a str, got {type(prompt).__name__}")
        p = self.score_one(prompt)
        return self.models[int(self.choose(p, strong_fraction, threshold, cost_weight))]

    def decide(self, prompts: list[str], strong_fraction: float | None = None, threshold: float | None = None,
               cost_weight: float | None = None, batch_size: int = 64) -> list[str]:
        """`route` for many prompts at once."""
        idx = self.choose(self.scores(prompts, batch_size), strong_fraction, threshold, cost_weight)
        return [self.models[int(i)] for i in idx]


def prompt_from_messages(messages) -> str:
    """The prompt of an OpenAI-style chat: the text of its `user` messages in order, joined with blank
    lines, the rule ingest applies to multi-turn data (a list of turns). A message's `content` is a
    string or a list of parts, whose `{"type": "text", "text": ...}` parts count, each as a turn;
    system, assistant and tool messages are not part of the prompt. Raises RouterError on anything
    else, or when no user text is left."""
    if not isinstance(messages, list) or not messages:
        raise router_error("messages must be a non-empty list of {role, content} objects")
    turns: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise router_error(f"messages[{i}] must be an object with a string role")
        if m["role"] != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            turns.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise router_error(f"messages[{i}].content[{j}] must be an object")
                if part.get("type") == "text":
                    if not isinstance(part.get("text"), str):
                        raise router_error(f"messages[{i}].content[{j}].text must be a string")
                    turns.append(part["text"])
        elif content is not None:
            raise router_error(f"messages[{i}].content must be a string or a list of parts")
    if not turns:
        raise router_error("messages hold no user text to route on")
    return "\n\n".join(turns)


def read_prompt_records(path: str | Path) -> Iterator[dict]:
    """The records of a JSONL file of {"prompt": ..., ...} objects, one per non-blank line, in order.

    UTF-8 (a leading BOM is skipped). A line that is not valid UTF-8 or JSON, or not an object with a
    string `prompt`, is a RouterError naming the file and the line.
    """
    with open(path, "rb") as src:
        for lineno, raw in enumerate(src, 1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise router_error(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)",
                             file=path, row=lineno) from None
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except ValueError as e:
                raise router_error(f"not valid JSON: {e}", file=path, row=lineno) from None
            except RecursionError:
                raise router_error("not valid JSON: nested too deeply", file=path, row=lineno) from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise router_error("each line must be an object with a string `prompt`", file=path, row=lineno)
            yield rec


def score_file(bundle: str | Path, input_jsonl: str | Path, output_jsonl: str | Path,
               strong_fraction: float | None = None, batch_size: int = 64) -> int:
    """Score a JSONL file of {"prompt": ..., ["prompt_id": ...]} lines; returns the number of lines written.

    Each output line: `prompt_id` (when given), `index` (0-based record number), `scores`
    ({model: probability}), `route` (the chosen model) and, for pair routers, `score`.

    The input must be UTF-8 (a leading BOM is skipped): a line that is not is an error naming it.
    The output is UTF-8; a string with no UTF-8 form (a lone surrogate written as a JSON escape)
    keeps its JSON escape. It is written to a temporary file of this call beside it, then renamed
    over `output_jsonl`: concurrent runs on one output never mix lines (the last to finish wins), and
    the output may not be the input file.
    """
    input_jsonl, output_jsonl = Path(input_jsonl), Path(output_jsonl)
    if not input_jsonl.is_file():
        raise router_error("input file not found", file=input_jsonl)
    if output_jsonl.exists() and os.path.samefile(input_jsonl, output_jsonl):
        raise router_error("the output is the same file as the input; choose another --output", file=output_jsonl)
    router = Router.load(bundle)
    router.check_settings(strong_fraction=strong_fraction)
    try:
        output_jsonl.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{output_jsonl.name}.", suffix=".tmp", dir=output_jsonl.parent)
    except OSError as e:
        raise router_error(f"cannot write the output there: {e.strerror or e}", file=output_jsonl) from None
    tmp = Path(tmp_name)
    written = 0

    def flush(records: list[tuple[int, dict]], out) -> None:
        p = router.scores([r["prompt"] for _, r in records], batch_size)
        chosen = router.choose(p, strong_fraction, None, None)
        pair = router.decision["kind"] == "pair"
        for (index, rec), row, c in zip(records, p, chosen):
            line = {"prompt_id": rec["prompt_id"]} if "prompt_id" in rec else {}
            line.update(index=index, scores=dict(zip(router.models, map(float, row))),
                        route=router.models[int(c)])
            if pair:
                line["score"] = float(router.routing_score(row))
            try:
                data = json.dumps(line, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: its \uXXXX escape is valid JSON and UTF-8
                data = json.dumps(line).encode("ascii")
            out.write(data + b"\n")

    try:
        os.fchmod(fd, _new_file_mode(output_jsonl))  # mkstemp's 0600 would make the output private
        with os.fdopen(fd, "wb") as out:
            batch: list[tuple[int, dict]] = []
            for rec in read_prompt_records(input_jsonl):
                batch.append((written, rec))
                written += 1
                if len(batch) == batch_size * 16:
                    flush(batch, out)
                    batch = []
            if batch:
                flush(batch, out)
            out.flush()
            os.fsync(out.fileno())
        if written == 0:
            raise router_error("no prompts in the input", file=input_jsonl)
        os.replace(tmp, output_jsonl)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _new_file_mode(path: Path) -> int:
    """The mode `open(path, "w")` would give: the existing file's, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask
