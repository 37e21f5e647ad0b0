"""Read preference data in any of three layouts into the canonical dataset (docs/contracts.md, section 1).

Input goes through the `datasets` library (csv, json/jsonl, parquet, or `hf:org/name`), so big files
are memory-mapped Arrow; the merge is done on whole columns with pyarrow compute and numpy
(`pc.unique`/`pc.index_in` to number prompts and models, `np.bincount` to average duplicates),
never with per-row Python objects for the whole file.

Layouts, detected from the columns (`layout=` overrides):

- pairwise: `prompt, model_a, model_b` and either `winner` (model_a | model_b | tie | tie (bothbad))
  or the Chatbot-Arena-55k 0/1 columns `winner_model_a, winner_model_b, winner_tie` (there the
  prompt is a JSON list of turns, joined with blank lines). Optional per-side `cost_a`, `cost_b`.
  A model's outcome on a prompt is its mean battle score (win 1, tie 0.5, loss 0).
- long: `prompt, model, score`, optional `cost`; an input `prompt_id` is kept as `source_prompt_id`.
- wide: `prompt` plus one outcome column per model. `<model>|total_cost` columns (RouterBench) are
  that model's per-row cost and `<model>|model_response` columns are ignored; another column with a `|`
  is an error without `models=` (it would be neither a model nor clearly metadata). Without `models=`,
  the model columns are: the `|total_cost` prefixes when any exist; otherwise every boolean
  column, every integer column whose values are all 0 or 1, and every float column - except
  id-like names (`id`, `*_id`, `idx`, `index`, `qid`...). Everything else is metadata. Integer
  scores on another scale (e.g. 1-10 judges) therefore need `models=`.

Bad input. The whole file fails with a `DataError` naming the file (and the row or line where
there is one) when: it is missing, unreadable or not UTF-8 (text formats); a required column is
missing; a winner value is not one of the four known ones (or Arena flags are not exactly one
set), because an unknown encoding cannot be guessed and dropping it would bias the data; no row
is usable; fewer than two models remain. A single row is dropped, counted by reason in the
manifest (`dropped`, first rows in `dropped_rows`) and printed, when its prompt is empty or not
text, its model or winner is missing or blank, both sides are the same model, its score is missing,
not numeric or infinite (long), a wide model cell is not numeric or infinite, or it has no outcome
at all (wide). Outcomes are stored as float32, so a magnitude beyond its range counts as infinite.
A missing cell in the wide layout only means "not observed" (mask false). Row numbers are 1-based
data rows (the header does not count). An input column named like an output column of ingest or
label (`prompt_id`, `cost`, `split`, `target`...) is kept as `source_<name>`, with a printed note.

Split. By default `label` splits prompts by their hash. `split_column=COL` takes it from the input
instead: every row's value must be train, val or test (any case, surrounding blanks ignored), else the
file fails naming the row and value, and the rows of one prompt must agree. `test_data=FILE` reads a
second file in the main file's layout whose prompts are all test (a prompt in both files is an error,
a model the main file lacks too); the main file's prompts are left to label's hash rule for train/val.
Either way the dataset gets a `split` column (null where the hash rule decides) and the manifest says
which rule applies (`split_rule`).

Columns are never renamed silently: a name that appears twice in the header is an error naming it. A
model whose outcomes are 0-1 but for a few cells (at most 5%, with at least 20 in range) is an error naming
the column, row and value, since label would otherwise rescale every target to fit that cell; real scales
(1-10 judges, any range most values use) are left to label.

Re-ingest is skipped when `manifest.json` holds the same `content_hash` (input bytes of both files + options).
"""
from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__ as PIPELINE_VERSION
from .common import (ConfigError, DataError, atomic_dir, check_name, console, data_root, processed_dir,
                     read_json, sha256_json, write_json)

SCHEMA_VERSION = 1
INGEST_VERSION = 2  # bump when the output for the same input changes, so old artifacts are redone
LAYOUTS = ("pairwise", "wide", "long")
SPLITS = ("train", "val", "test")
WINNERS = {"model_a": (1.0, False), "model_b": (0.0, False), "tie": (0.5, False), "tie (bothbad)": (0.5, True)}
ARENA_FLAGS = ("winner_model_a", "winner_model_b", "winner_tie")
# Output columns of ingest and label that an input column may not shadow (it is kept as source_<name>).
RESERVED = ("prompt_id", "outcome", "mask", "count", "cost", "target", "split", "difficulty", "soft_label")
IGNORED_PAIRWISE = ("response_a", "response_b")  # per-side answers are not prompt metadata
WIDE_SUFFIXES = ("|total_cost", "|model_response")  # the only '|' columns of the wide layout (RouterBench)
# A model with at least OUTLIER_MIN_REST outcomes in [0, 1] and at most OUTLIER_SHARE of them outside is a 0-1
# model with bad cells (an error); otherwise the values are a scale of their own, which label normalises.
OUTLIER_SHARE, OUTLIER_MIN_REST = 0.05, 20
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_TEXT_COLUMNS = ("prompt", "model", "model_a", "model_b", "winner")  # never typed as numbers
_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class _Source:
    """Where the data comes from and how `datasets` reads it."""

    text: str  # as given by the user
    path: Optional[Path]  # local file, None for a hub dataset
    builder: str  # csv | json | parquet | hub id
    split: str

    @property
    def stem(self) -> str:
        if self.path is not None:
            return self.path.stem
        return self.builder.rstrip("/").split("/")[-1]


@dataclass
class _Observations:
    """The layout-independent middle: one entry per usable (row, model) outcome."""

    models: list[str]
    row: np.ndarray  # input row of each observation (int64)
    model: np.ndarray  # model index (int64)
    value: np.ndarray  # raw outcome (float64)
    cost: Optional[np.ndarray] = None  # per-observation cost, NaN unknown
    battles: Optional[dict] = None  # pairwise: rows, a, b, score_a, bothbad
    metadata: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading


def _resolve(source: str, split: str) -> _Source:
    if source.startswith("hf:"):
        return _Source(source, None, source[3:], split)
    path = Path(source)
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported file type {path.suffix or '(none)'!r}: use .csv, .jsonl, .json, "
                        ".parquet or hf:org/name", file=path)
    if not path.is_file():
        raise DataError("file not found", file=path)
    if path.stat().st_size == 0:
        raise DataError("the file is empty", file=path)
    return _Source(source, path, builder, split)


def _hash_input(src: _Source) -> str:
    """sha256 of the input bytes; text formats are checked to be UTF-8 on the same pass."""
    h = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")() if src.builder != "parquet" else None
    try:
        with open(src.path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                if decoder is not None:
                    decoder.decode(block)
            if decoder is not None:
                decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"not valid UTF-8 text (line {_first_bad_line(src.path)}); re-save the file as UTF-8",
                        file=src.path) from None
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", file=src.path) from None
    return h.hexdigest()


def _first_bad_line(path: Path) -> int:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _duplicated_columns(src: _Source) -> list[str]:
    """Column names the file holds more than once. pandas would read them as m, m.1 and the JSON readers
    keep one of them, so they are looked up in the raw header (CSV), schema (parquet) or first record (JSON)."""
    names: list[str] = []
    try:
        if src.builder == "csv":
            import csv

            with open(src.path, encoding="utf-8-sig", newline="") as f:
                names = next(csv.reader(f), [])
        elif src.builder == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(src.path).names
        elif src.builder == "json":
            with open(src.path, encoding="utf-8-sig") as f:
                head = f.read(1 << 16).lstrip()
            if head.startswith("["):
                head = head[1:].lstrip()
            pairs: list = []
            decoder = json.JSONDecoder(object_pairs_hook=lambda kv: pairs.append([k for k, _ in kv]) or dict(kv))
            with contextlib.suppress(ValueError):
                decoder.raw_decode(head)
            names = pairs[-1] if pairs else []  # the record itself is decoded last (nested objects first)
    except (OSError, UnicodeDecodeError, StopIteration, ValueError, pa.ArrowException):
        return []  # unreadable: reading it reports that
    seen: set[str] = set()
    return [n for n in names if n in seen or seen.add(n)]


@contextlib.contextmanager
def _load(src: _Source) -> Iterator[tuple[pa.Table, str]]:
    """Yield the input as a memory-mapped Arrow table (and a fingerprint); temporary caches are removed after."""
    import datasets

    datasets.disable_progress_bars()
    # Read failures become one DataError line; `datasets` would log its own line about them first.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if src.path is None:
        try:
            ds = datasets.load_dataset(src.builder, split=src.split)
        except Exception as e:  # network, unknown id, unknown split: all are "cannot read"
            raise DataError(f"cannot load hub dataset split {src.split!r}: {e}", file=src.text) from None
        yield ds.data.table, ds._fingerprint
        return
    duplicated = _duplicated_columns(src)
    if duplicated:
        raise DataError(f"column name(s) {', '.join(map(repr, dict.fromkeys(duplicated)))} appear more than once "
                        "in the header; rename them (read as they are, one would become a separate model or be lost)",
                        file=src.path)
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_caches(root)
    cache = Path(tempfile.mkdtemp(prefix=f".ingest-cache-{os.getpid()}-", dir=root))
    try:
        kwargs = {}
        if src.builder == "csv":
            # Every column as text, then typed over the whole column below: pandas infers types per
            # 10k-row chunk, which fails when a later chunk differs (ints, then a 0.5), and its
            # default NA strings would turn a prompt like "None" into a missing value.
            import pandas as pd

            try:
                head = pd.read_csv(src.path, nrows=1, encoding="utf-8", dtype=str)
            except Exception as e:
                raise DataError(f"cannot read the CSV header: {e}", file=src.path) from None
            if head.empty:
                raise DataError("the file has a header but no rows", file=src.path)
            header = list(head.columns)
            kwargs = dict(features=datasets.Features({c: datasets.Value("string") for c in header}),
                          keep_default_na=False, na_values=[""])
        data_file = (_json_array_as_lines(src.path, cache) if src.builder == "json" else None) or src.path
        try:
            ds = datasets.load_dataset(src.builder, data_files=str(data_file), split="train",
                                       cache_dir=str(cache), **kwargs)
        except Exception as e:
            if _no_records(src):
                raise DataError("the file has no rows", file=src.path) from None
            cause = e.__cause__ or e
            line = _first_bad_json_line(src.path) if src.builder == "json" else None
            raise DataError(f"cannot read as {src.builder}" + (f" (line {line})" if line else "")
                            + f": {type(cause).__name__}: {cause}", file=src.path) from None
        table = ds.data.table
        if src.builder == "csv":
            table = pa.table({c: table.column(c) if c in _TEXT_COLUMNS else _infer_type(table.column(c))
                              for c in table.column_names})
        yield table, ""
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _remove_dead_caches(root: Path) -> None:
    """Read caches left by an ingest that was killed (its process is gone); they can be as big as the input."""
    for cache in root.glob(".ingest-cache-*"):
        pid = cache.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(cache, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _json_array_as_lines(path: Path, folder: Path) -> Optional[Path]:
    """A whole-document JSON array of records rewritten as JSON lines in `folder`, else None.

    `datasets` re-encodes a JSON array through ujson, which turns NaN and Infinity into null, so an
    infinite score would silently become "not observed" instead of a dropped row as in JSON lines.
    """
    with open(path, "rb") as f:
        if not f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            return None
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError:
        return None  # `datasets` fails on it too and the error names the line
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return None
    out = folder / f"{path.stem}.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return out


def _no_records(src: _Source) -> bool:
    """A parquet file of zero rows or JSON without records (`datasets` fails on them with obscure errors)."""
    try:
        if src.builder == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(src.path).metadata.num_rows == 0
        if src.builder == "json":
            text = src.path.read_text(encoding="utf-8").strip()
            return not text or (text.startswith("[") and json.loads(text) == [])
    except Exception:  # unreadable for another reason: the caller reports the original error
        pass
    return False


def _first_bad_json_line(path: Path) -> Optional[int]:
    """Line of the first JSON syntax error (whole-document JSON or JSON lines), for the message."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except ValueError as e:
            return getattr(e, "lineno", None)
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError:
                return number
    return None


def _infer_type(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A text column as int64, float64 or bool when every non-empty value parses, else unchanged."""
    if col.null_count == len(col):
        return col
    for typ in (pa.int64(), pa.float64(), pa.bool_()):
        try:
            return pc.cast(col, typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return col


# ---------------------------------------------------------------------------------------------
# Column helpers (whole columns, never per-row Python except for mixed-type JSON columns)


def _is_json_ext(typ: pa.DataType) -> bool:
    return isinstance(typ, pa.BaseExtensionType) and typ.extension_name == "arrow.json"


def _json_values(col: pa.ChunkedArray) -> list:
    """Python values of a mixed-type JSON column (`datasets` keeps them JSON-encoded)."""
    encoded = [v for chunk in col.chunks for v in chunk.storage.to_pylist()]
    return [None if v is None else json.loads(v) for v in encoded]


def _as_text(col: pa.ChunkedArray, turns_json: bool = False) -> tuple[pa.ChunkedArray, np.ndarray]:
    """(text column, non-text mask). Lists of turns, and JSON-encoded lists when `turns_json`,
    are joined with blank lines; anything that is not text becomes null and is flagged."""
    n = len(col)
    typ = col.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        if not turns_json:
            return col, np.zeros(n, bool)
        values = col.to_pylist()
        out, bad = [], np.zeros(n, bool)
        for i, v in enumerate(values):
            text = v
            if v is not None and v.lstrip().startswith("["):
                try:
                    text = _join_turns(json.loads(v))
                except ValueError:
                    text = v
            if text is None and v is not None:
                bad[i] = True
            out.append(text)
        return pa.chunked_array([pa.array(out, pa.string())]), bad
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or _is_json_ext(typ):
        values = _json_values(col) if _is_json_ext(typ) else col.to_pylist()
    elif pa.types.is_null(typ):
        return pa.chunked_array([pa.nulls(n, pa.string())]), np.zeros(n, bool)
    else:  # numbers, bools...: not text at all
        return pa.chunked_array([pa.nulls(n, pa.string())]), ~np.asarray(col.is_null())
    out, bad = [], np.zeros(n, bool)
    for i, v in enumerate(values):
        text = v if isinstance(v, str) else _join_turns(v) if isinstance(v, list) else None
        bad[i] = v is not None and text is None
        out.append(text)
    return pa.chunked_array([pa.array(out, pa.string())]), bad


def _join_turns(turns) -> Optional[str]:
    if not isinstance(turns, list) or not all(t is None or isinstance(t, str) for t in turns):
        return None
    return "\n\n".join(t for t in turns if t is not None)


def _as_float(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with NaN for missing, non-numeric mask) of a score/cost column.

    Outcomes and costs are stored as float32, so a magnitude beyond its range counts as infinite
    here (and is dropped like inf) rather than turning into inf in the dataset."""
    values, bad = _parse_float(col)
    big = np.abs(values) > np.finfo(np.float32).max
    return np.where(big, np.copysign(np.inf, values), values), bad


def _parse_float(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    typ = col.type
    n = len(col)
    if pa.types.is_null(typ):
        return np.full(n, np.nan), np.zeros(n, bool)
    if pa.types.is_boolean(typ) or pa.types.is_integer(typ) or pa.types.is_floating(typ) \
            or pa.types.is_decimal(typ):
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        return values, np.zeros(n, bool)
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        lowered = pc.utf8_lower(pc.utf8_trim_whitespace(col))
        is_bool = pc.is_in(lowered, value_set=pa.array(["true", "false"]))
        is_num = pc.match_substring_regex(col, _NUMBER)
        ok = pc.fill_null(pc.or_(is_bool, is_num), False)
        numbers = pc.cast(pc.if_else(is_num, col, pa.scalar(None, pa.string())), pa.float64())
        bools = pc.cast(pc.if_else(is_bool, lowered, pa.scalar(None, pa.string())), pa.bool_())
        values = pc.coalesce(numbers, pc.cast(bools, pa.float64())).to_numpy(zero_copy_only=False)
        bad = ~np.asarray(ok) & ~np.asarray(col.is_null())
        return values.astype(np.float64), bad
    values = _json_values(col) if _is_json_ext(typ) else col.to_pylist()
    out = np.full(n, np.nan)
    bad = np.zeros(n, bool)
    for i, v in enumerate(values):
        if isinstance(v, (bool, int, float)):
            out[i] = float(v)
        elif v is not None:
            bad[i] = True
    return out, bad


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Small categorical column (model names, winners) as int64 codes (-1 for null or blank) and sorted names.

    Values are trimmed, so " a" and "a" are one model, and a blank value is missing as in CSV."""
    if _is_json_ext(col.type):  # mixed JSON types: decode, else "a" would become the name '"a"'
        col = pa.chunked_array([pa.array([v if v is None or isinstance(v, str) else json.dumps(v)
                                          for v in _json_values(col)], pa.string())])
    col = pc.utf8_trim_whitespace(pc.cast(col, pa.string()) if not pa.types.is_string(col.type) else col)
    col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
    names = sorted(v for v in pc.unique(col).to_pylist() if v is not None)
    codes = pc.index_in(col, value_set=pa.array(names, pa.string()))
    return pc.fill_null(codes, -1).to_numpy(zero_copy_only=False).astype(np.int64), names


class _Drops:
    """Per-row drop reasons; the first reason that applies to a row is the one counted."""

    def __init__(self, n: int):
        self.code = np.full(n, -1, np.int64)
        self.reasons: list[str] = []

    def add(self, mask: np.ndarray, reason: str) -> None:
        mask = np.asarray(mask, bool) & (self.code < 0)
        if mask.any():
            if reason not in self.reasons:
                self.reasons.append(reason)
            self.code[mask] = self.reasons.index(reason)

    @property
    def kept(self) -> np.ndarray:
        return self.code < 0


def _require(table: pa.Table, columns, layout: str, path) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"missing required column {missing[0]!r} for the {layout} layout "
                        f"(columns: {', '.join(table.column_names)})", file=path)


def detect_layout(columns: list[str]) -> str:
    """pairwise when model_a/model_b are there, long when model/score are, otherwise wide."""
    cols = set(columns)
    if {"model_a", "model_b"} <= cols:
        return "pairwise"
    if {"model", "score"} <= cols:
        return "long"
    return "wide"


# ---------------------------------------------------------------------------------------------
# The three layouts -> _Observations


def _pairwise(table: pa.Table, drops: _Drops, where) -> _Observations:
    arena = all(c in table.column_names for c in ARENA_FLAGS)
    _require(table, ["prompt", "model_a", "model_b"] + ([] if arena else ["winner"]), "pairwise", where)
    a, names_a = _codes(table.column("model_a"))
    b, names_b = _codes(table.column("model_b"))
    models = sorted(set(names_a) | set(names_b))
    remap_a = np.array([models.index(m) for m in names_a] + [-1], np.int64)
    remap_b = np.array([models.index(m) for m in names_b] + [-1], np.int64)
    a, b = remap_a[a], remap_b[b]  # -1 stays -1 through the appended sentinel
    drops.add((a < 0) | (b < 0), "missing model")
    drops.add(a == b, "same model on both sides")
    n = table.num_rows
    if arena:
        flags = np.stack([_as_float(table.column(c))[0] for c in ARENA_FLAGS], axis=1)
        missing = np.isnan(flags).any(axis=1)
        drops.add(missing, "missing winner")
        valid = np.isin(np.nan_to_num(flags), (0.0, 1.0)).all(axis=1) & (np.nan_to_num(flags).sum(axis=1) == 1)
        bad = np.flatnonzero(~missing & ~valid & drops.kept)
        if bad.size:
            raise DataError(f"winner flags {', '.join(ARENA_FLAGS)} must have exactly one 1, got "
                            f"{flags[bad[0]].tolist()}", file=where, row=int(bad[0]) + 1)
        score_a = np.where(flags[:, 0] == 1, 1.0, np.where(flags[:, 1] == 1, 0.0, 0.5))
        bothbad = np.zeros(n, bool)
    else:
        codes, values = _codes(table.column("winner"))
        unknown = [v for v in values if v.lower() not in WINNERS]
        if unknown:  # report the earliest row with an unknown value, and that value first
            first = np.flatnonzero(np.isin(codes, [values.index(v) for v in unknown]))[0]
            value = values[codes[first]]
            rest = [v for v in unknown if v != value]
            others = f"; other unknown values: {', '.join(map(repr, rest[:5]))}" if rest else ""
            raise DataError(f"unknown winner value {value!r} (expected one of {', '.join(WINNERS)}{others})",
                            file=where, row=int(first) + 1)
        drops.add(codes < 0, "missing winner")
        known = [WINNERS[v.lower()] for v in values] + [(np.nan, False)]
        score_a = np.array([k[0] for k in known])[codes]
        bothbad = np.array([k[1] for k in known])[codes]
    cost_a = _as_float(table.column("cost_a"))[0] if "cost_a" in table.column_names else None
    cost_b = _as_float(table.column("cost_b"))[0] if "cost_b" in table.column_names else None
    rows = np.arange(n, dtype=np.int64)
    obs = _Observations(models=models, row=np.concatenate([rows, rows]), model=np.concatenate([a, b]),
                        value=np.concatenate([score_a, 1.0 - score_a]))
    if cost_a is not None or cost_b is not None:
        nan = np.full(n, np.nan)
        obs.cost = np.concatenate([cost_a if cost_a is not None else nan, cost_b if cost_b is not None else nan])
    obs.battles = {"row": rows, "a": a, "b": b, "score_a": score_a, "bothbad": bothbad}
    skip = {"prompt", "model_a", "model_b", "winner", "cost_a", "cost_b", *ARENA_FLAGS, *IGNORED_PAIRWISE}
    obs.metadata = [c for c in table.column_names if c not in skip]
    return obs


def _long(table: pa.Table, drops: _Drops, where) -> _Observations:
    _require(table, ["prompt", "model", "score"], "long", where)
    model, models = _codes(table.column("model"))
    drops.add(model < 0, "missing model")
    score, non_numeric = _as_float(table.column("score"))
    drops.add(non_numeric, "non-numeric score")
    drops.add(np.isnan(score), "missing score")
    drops.add(~np.isfinite(score), "infinite score")
    obs = _Observations(models=models, row=np.arange(table.num_rows, dtype=np.int64), model=model, value=score)
    if "cost" in table.column_names:
        obs.cost = _as_float(table.column("cost"))[0]
    obs.metadata = [c for c in table.column_names if c not in ("prompt", "model", "score", "cost")]
    return obs


def _id_like(name: str) -> bool:
    """`id`, `sample_id`, `question-idx`, `qid`, `sampleId`...: identifiers, not outcomes."""
    return bool(re.fullmatch(r"(.*[_\-\s.])?(id|ids|idx|index|uid|qid|pid|row)", name.lower())
                or re.search(r"[a-z]Id$", name))


def _wide_models(table: pa.Table) -> list[str]:
    """The documented detection rule for model columns (module docstring)."""
    names = table.column_names
    cost_prefixes = [c[: -len("|total_cost")] for c in names if c.endswith("|total_cost")]
    if any(p in names for p in cost_prefixes):
        return [p for p in cost_prefixes if p in names]
    models = []
    for c in names:
        if c == "prompt" or "|" in c or _id_like(c):
            continue
        typ = table.column(c).type
        if pa.types.is_boolean(typ) or pa.types.is_floating(typ):
            models.append(c)
        elif pa.types.is_integer(typ):
            lo_hi = pc.min_max(table.column(c))
            lo, hi = lo_hi["min"].as_py(), lo_hi["max"].as_py()
            if lo is not None and lo >= 0 and hi <= 1:
                models.append(c)
            elif lo is not None:  # 0/1 but for a few cells: a model with bad cells, which _check_outliers reports
                values = table.column(c).drop_null().to_numpy()
                outside = int(((values < 0) | (values > 1)).sum())
                if outside <= max(1, OUTLIER_SHARE * values.size) and values.size - outside >= OUTLIER_MIN_REST \
                        and (values == 0).any():
                    models.append(c)
    return models


def _wide(table: pa.Table, drops: _Drops, where, models: Optional[list[str]]) -> _Observations:
    _require(table, ["prompt"], "wide", where)
    if models:
        _require(table, models, "wide", where)
        if len(set(models)) != len(models):
            raise ConfigError(f"models listed twice: {', '.join(models)}")
    else:
        odd = [c for c in table.column_names if "|" in c and not c.endswith(WIDE_SUFFIXES)]
        if odd:
            raise DataError(f"column {odd[0]!r} has a '|' but is not MODEL|total_cost or MODEL|model_response; in the "
                            "wide layout '|' marks those per-model columns, so rename it, or name the model columns "
                            "with --models (the others are then metadata)", file=where)
        models = _wide_models(table)
    if len(models) < 2:
        found = f"only {models[0]!r}" if models else "none"
        raise DataError(f"need at least two model outcome columns, found {found}; numeric or boolean columns "
                        f"are models unless id-like (columns: {', '.join(table.column_names)}); "
                        "name them with --models a,b", file=where)
    n = table.num_rows
    values = np.empty((n, len(models)))
    costs = np.full((n, len(models)), np.nan)
    non_numeric = np.zeros(n, bool)
    for j, m in enumerate(models):
        values[:, j], bad = _as_float(table.column(m))
        non_numeric |= bad
        if f"{m}|total_cost" in table.column_names:
            costs[:, j] = _as_float(table.column(f"{m}|total_cost"))[0]
    non_numeric |= np.isinf(values).any(axis=1)
    drops.add(non_numeric, "non-numeric score")
    drops.add(np.isnan(values).all(axis=1), "no outcome")
    rows, model = np.nonzero(~np.isnan(values))
    obs = _Observations(models=list(models), row=rows.astype(np.int64), model=model.astype(np.int64),
                        value=values[rows, model])
    if any(f"{m}|total_cost" in table.column_names for m in models):
        obs.cost = costs[rows, model]
    used = set(models) | {f"{m}|total_cost" for m in models}
    obs.metadata = [c for c in table.column_names
                    if c != "prompt" and c not in used and not c.endswith("|model_response")
                    and not c.endswith("|total_cost")]
    return obs


# ---------------------------------------------------------------------------------------------
# Merge and write


def _prompt_ids(prompts: list[str]) -> list[str]:
    return [hashlib.sha256(p.encode("utf-8")).hexdigest()[:16] for p in prompts]


def list_column(matrix: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    """An [n, m] array as a list column of the canonical dataset (one fixed-length list per row)."""
    p, m = matrix.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(p + 1, dtype=np.int32) * m), pa.array(matrix.ravel(), typ))


def list_matrix(table: pa.Table, column: str, dtype) -> np.ndarray:
    """A fixed-length list column as an [n, m] array (the inverse of `list_column`)."""
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(col), -1)


def _save(table: pa.Table, path: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset(table).save_to_disk(str(path))


def ingest(source: str | Sequence[str], layout: Optional[str] = None, name: Optional[str] = None,
           models: Optional[list[str]] = None, split: str = "train", force: bool = False,
           split_column: Optional[str] = None, test_data: Optional[str] = None) -> Path:
    """Read `source` into data/processed/NAME/ (dataset/, battles/ for pairwise, manifest.json).

    `source` may be several files / hub ids: they are merged into one dataset (`_merge`), each read in
    its own layout (or `layout` for all). `split_column`: the input column whose train / val / test
    values are the split (in every file). `test_data`: a second file, in the (first) main file's
    layout, whose prompts are the test split (a hub id reads its `test` split).
    """
    if not isinstance(source, str):
        source = list(source)
        if not source:
            raise ConfigError("no input file given")
        if len(source) > 1:
            return _ingest_many(source, layout=layout, name=name, models=models, split=split, force=force,
                                split_column=split_column, test_data=test_data)
        source = source[0]
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if split_column is not None and test_data is not None:
        raise ConfigError("--split-column and --test-data both choose the test prompts: use one of them")
    src = _resolve(source, split)
    sources = [src] + ([_resolve(test_data, "test")] if test_data is not None else [])
    name = name or src.stem
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid dataset name {name!r}")
    check_name(name)
    out = processed_dir(name)
    options = {"layout": layout, "models": models, "split": split if src.path is None else None,
               "ingest_version": INGEST_VERSION}
    if split_column is not None:
        options["split_column"] = split_column
    where = [s.path if s.path is not None else s.text for s in sources]

    def content_hash(hashes: list[str]) -> str:
        inputs = {"input": hashes[0]} | ({"test_input": hashes[1]} if len(hashes) > 1 else {})
        return sha256_json({**inputs, "options": options})

    def unchanged(hashes: list[str]) -> bool:
        try:
            return not force and read_json(out / "manifest.json").get("content_hash") == content_hash(hashes)
        except (OSError, ValueError, AttributeError):
            return False

    # Local files are hashed before loading so an unchanged input costs one read; a hub dataset
    # is identified by the fingerprint `datasets` gives it after loading.
    hashes = [_hash_input(s) if s.path else None for s in sources]
    if None not in hashes and unchanged(hashes):
        console.print(f"{name}: unchanged, skipping")
        return out
    with contextlib.ExitStack() as stack:
        loaded = [stack.enter_context(_load(s)) for s in sources]
        if None in hashes:
            hashes = [h or fingerprint for h, (_, fingerprint) in zip(hashes, loaded)]
            if unchanged(hashes):
                console.print(f"{name}: unchanged, skipping")
                return out
        fields, dataset, battles = _build(loaded[0][0], layout, models, where[0], split_column)
        test = None
        if len(sources) > 1:
            fields, dataset, battles, test = _add_test_data(fields, dataset, battles, loaded[1][0], models, where[1])
            test = {"source": sources[1].text, "source_hash": hashes[1], **test}
        manifest = {"schema_version": SCHEMA_VERSION, "name": name, "layout": fields.pop("layout"),
                    "source": src.text, "source_hash": hashes[0], "options": options,
                    "content_hash": content_hash(hashes), **fields,
                    "split_rule": "column" if split_column else "test_data" if test else "hash",
                    "split_column": split_column, "test_data": test,
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "pipeline_version": PIPELINE_VERSION}
        with atomic_dir(out) as tmp:
            _save(dataset, tmp / "dataset")
            if battles is not None:
                _save(battles, tmp / "battles")
            write_json(tmp / "manifest.json", manifest)
    _print_summary(manifest, out)
    return out


_LISTS = {"outcome": (pa.float32(), 0.0), "mask": (pa.bool_(), False), "count": (pa.int32(), 0),
          "cost": (pa.float32(), np.nan)}


def _add_test_data(fields: dict, dataset: pa.Table, battles: Optional[pa.Table], table: pa.Table,
                   models: Optional[list[str]], where):
    """The test file read in the main file's layout and appended to its dataset: its prompts get split
    `test`, the main file's a null split (label's hash rule picks train or val). Returns the merged
    (fields, dataset, battles) and the test file's own row counts for the manifest."""
    t_fields, t_dataset, t_battles = _build(table, fields["layout"], models, where, test_file=True)
    names, t_names = fields["models"], t_fields["models"]
    extra = [m for m in t_names if m not in names]
    if extra:
        raise DataError(f"model(s) {', '.join(extra)} are not in the main file (its models: {', '.join(names)})",
                        file=where)
    missing = [m for m in names if m not in t_names]
    if missing:
        console.print(f"[yellow]note:[/] the test file has no outcome for {', '.join(missing)}")
    in_both = pc.is_in(t_dataset.column("prompt"), value_set=dataset.column("prompt").combine_chunks())
    if pc.any(in_both).as_py():
        first = t_dataset.column("prompt").filter(in_both)[0].as_py()
        raise DataError(f"{pc.sum(in_both).as_py()} prompt(s) are in both the main file and the test file "
                        f"(first: {first[:60]!r}); a test prompt must not be trained on: remove them from one file",
                        file=where)

    lists = [c for c in _LISTS if c in dataset.column_names or c in t_dataset.column_names]
    index = {m: j for j, m in enumerate(names)}

    def aligned(part: pa.Table, part_models: list[str], split: Optional[str]) -> pa.Table:
        n = part.num_rows
        columns = {"prompt_id": part.column("prompt_id"), "prompt": part.column("prompt")}
        for col in lists:
            typ, fill = _LISTS[col]
            matrix = np.full((n, len(names)), fill, typ.to_pandas_dtype())
            if col in part.column_names:
                matrix[:, [index[m] for m in part_models]] = list_matrix(part, col, matrix.dtype)
            columns[col] = list_column(matrix, typ)
        columns["split"] = pa.array([split] * n, pa.string())
        metadata = [c for c in part.column_names if c not in columns]
        return pa.table(columns | {c: part.column(c) for c in metadata})

    try:
        merged = pa.concat_tables([aligned(dataset, names, None), aligned(t_dataset, t_names, "test")],
                                  promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"its columns do not match the main file's: {e}", file=where) from None
    if battles is not None:
        remap = np.array([index[m] for m in t_names], np.int32)
        for side in ("model_a", "model_b"):
            at = t_battles.column_names.index(side)
            t_battles = t_battles.set_column(at, side, pa.array(remap[t_battles.column(side).to_numpy()]))
        battles = pa.concat_tables([battles, t_battles])

    # Per-model cost: the mean over both files, each file's mean weighted by its observations.
    weight = {m: 0.0 for m in names}
    total = {m: 0.0 for m in names}
    for part, part_fields in ((dataset, fields), (t_dataset, t_fields)):
        n_obs = list_matrix(part, "count", np.int64).sum(axis=0)
        for j, m in enumerate(part_fields["models"]):
            if part_fields["costs"][m] is not None:
                weight[m] += n_obs[j]
                total[m] += n_obs[j] * part_fields["costs"][m]
    lo, hi = fields["outcome_range"]
    t_lo, t_hi = t_fields["outcome_range"]
    fields = fields | {
        "costs": {m: (float(total[m] / weight[m]) if weight[m] else None) for m in names},
        "outcome_kind": fields["outcome_kind"] if fields["outcome_kind"] == t_fields["outcome_kind"] else "score",
        "outcome_range": [min(lo, t_lo), max(hi, t_hi)], "n_prompts": merged.num_rows,
        "n_battles": battles.num_rows if battles is not None else None,
        "metadata_columns": fields["metadata_columns"] + [c for c in t_fields["metadata_columns"]
                                                          if c not in fields["metadata_columns"]],
    }
    test = {k: t_fields[k] for k in ("n_rows_in", "n_rows_used", "dropped", "dropped_rows", "n_prompts", "n_battles")}
    return fields, merged, battles, test


def _build(table: pa.Table, layout: Optional[str], models: Optional[list[str]], where,
           split_column: Optional[str] = None, test_file: bool = False):
    """Parse one layout, merge duplicate prompts, and return (manifest fields, dataset, battles)."""
    layout = layout or detect_layout(table.column_names)
    if models and layout != "wide":
        raise ConfigError(f"--models chooses outcome columns of the wide layout; this file is {layout}")
    n = table.num_rows
    if n == 0:
        raise DataError("the file has no rows", file=where)
    _require(table, ["prompt"], layout, where)
    drops = _Drops(n)
    arena = layout == "pairwise" and all(c in table.column_names for c in ARENA_FLAGS)
    prompt_col, non_text = _as_text(table.column("prompt"), turns_json=arena)
    drops.add(non_text, "non-text prompt")
    # Prompts are numbered once (C++ hash table), so emptiness and hashing are per unique prompt.
    uniq = pc.unique(prompt_col)
    uniq = uniq.filter(pc.is_valid(uniq))
    pidx = pc.fill_null(pc.index_in(prompt_col, value_set=uniq), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    empty_uniq = np.asarray(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(uniq)), 0).fill_null(True))
    drops.add((pidx < 0) | np.append(empty_uniq, True)[pidx], "empty prompt")

    if layout == "pairwise":
        obs = _pairwise(table, drops, where)
    elif layout == "long":
        obs = _long(table, drops, where)
    else:
        obs = _wide(table, drops, where, models)

    if layout != "pairwise":
        _check_outliers(obs, drops.kept[obs.row], layout, where)

    split_code = None
    if split_column is not None:
        split_code = _split_codes(table, split_column, obs, where)
        obs.metadata.remove(split_column)

    kept_rows = drops.kept
    dropped = {r: int((drops.code == i).sum()) for i, r in enumerate(drops.reasons)}
    dropped_rows = {r: (np.flatnonzero(drops.code == i)[:5] + 1).tolist() for i, r in enumerate(drops.reasons)}
    keep = kept_rows[obs.row]
    if not keep.any():
        summary = "; ".join(f"{r}: {c} (first row {dropped_rows[r][0]})" for r, c in dropped.items())
        raise DataError(f"no usable rows: all {n} dropped ({summary})", file=where)
    used_models = np.unique(obs.model[keep])
    if used_models.size < 2 and not test_file:  # a test file's models are checked against the main file's
        only = obs.models[used_models[0]] if used_models.size else "none"
        raise DataError(f"only one model ({only}) has usable outcomes; routing needs at least two", file=where)
    if used_models.size < len(obs.models):
        # A model seen only in dropped rows would be an all-masked column: leave it out, say so.
        unused = [m for j, m in enumerate(obs.models) if j not in set(used_models.tolist())]
        console.print(f"[yellow]note:[/] no usable outcome for {', '.join(unused)}: left out of the models")
        remap = np.full(len(obs.models) + 1, -1, np.int64)
        remap[used_models] = np.arange(used_models.size)
        obs.model = remap[obs.model]
        if obs.battles is not None:
            obs.battles["a"], obs.battles["b"] = remap[obs.battles["a"]], remap[obs.battles["b"]]
        obs.models = [obs.models[j] for j in used_models]

    # Compact prompts to those with a usable row, in order of first appearance.
    kept_prompts, first_row, inverse = np.unique(pidx[kept_rows], return_index=True, return_inverse=True)
    row_to_prompt = np.full(n, -1, np.int64)
    row_to_prompt[np.flatnonzero(kept_rows)] = inverse.ravel()
    first_row = np.flatnonzero(kept_rows)[first_row]
    P, M = kept_prompts.size, len(obs.models)
    prompts = uniq.take(pa.array(kept_prompts))

    key = row_to_prompt[obs.row[keep]] * M + obs.model[keep]
    value = obs.value[keep]
    count = np.bincount(key, minlength=P * M).reshape(P, M)
    total = np.bincount(key, weights=value, minlength=P * M).reshape(P, M)
    mask = count > 0
    outcome = np.where(mask, total / np.maximum(count, 1), 0.0)

    ids = _prompt_ids(prompts.to_pylist())
    columns = {"prompt_id": pa.array(ids, pa.string()), "prompt": prompts.cast(pa.string()),
               "outcome": list_column(outcome, pa.float32()), "mask": list_column(mask, pa.bool_()),
               "count": list_column(count, pa.int32())}
    costs = {m: None for m in obs.models}
    if obs.cost is not None:
        c = obs.cost[keep]
        known = np.isfinite(c)
        cn = np.bincount(key[known], minlength=P * M).reshape(P, M)
        cs = np.bincount(key[known], weights=c[known], minlength=P * M).reshape(P, M)
        columns["cost"] = list_column(np.where(cn > 0, cs / np.maximum(cn, 1), np.nan), pa.float32())
        per_model_n = np.bincount(obs.model[keep][known], minlength=M)
        per_model_sum = np.bincount(obs.model[keep][known], weights=c[known], minlength=M)
        costs = {m: (float(per_model_sum[j] / per_model_n[j]) if per_model_n[j] else None)
                 for j, m in enumerate(obs.models)}
    if split_code is not None:
        columns["split"] = pa.array(np.array(SPLITS)[_prompt_splits(split_code, row_to_prompt, first_row, where)])
    take = pa.array(first_row)
    meta_names = []
    for col in obs.metadata:
        out_name = f"source_{col}" if col in RESERVED or col in ("prompt",) else col
        if out_name != col:
            hint = "; pass --split-column split to split by it" if col == "split" else ""
            console.print(f"[yellow]note:[/] input column {col!r} kept as {out_name!r}: "
                          f"the pipeline writes its own {col!r}{hint}")
        columns[out_name] = table.column(col).take(take)
        meta_names.append(out_name)
    dataset = pa.table(columns)

    battles = None
    if obs.battles is not None:
        bt = obs.battles
        ok = kept_rows[bt["row"]]
        battles = pa.table({
            "prompt_id": pa.array(ids, pa.string()).take(pa.array(row_to_prompt[bt["row"][ok]])),
            "model_a": pa.array(bt["a"][ok].astype(np.int32)), "model_b": pa.array(bt["b"][ok].astype(np.int32)),
            "score_a": pa.array(bt["score_a"][ok].astype(np.float32)), "bothbad": pa.array(bt["bothbad"][ok]),
        })

    binary = bool(np.isin(value, (0.0, 1.0)).all())
    manifest = {
        "layout": layout, "models": obs.models, "costs": costs,
        "outcome_kind": "winrate" if layout == "pairwise" else "binary" if binary else "score",
        "outcome_range": [float(value.min()), float(value.max())],
        "n_rows_in": n, "n_rows_used": int(kept_rows.sum()), "dropped": dropped, "dropped_rows": dropped_rows,
        "n_prompts": P, "n_battles": int(battles.num_rows) if battles is not None else None,
        "metadata_columns": meta_names,
    }
    return manifest, dataset, battles


def _check_outliers(obs: _Observations, keep: np.ndarray, layout: str, where) -> None:
    """A few outcomes outside [0, 1] in a model whose others are 0-1 (at most OUTLIER_SHARE of them, at
    least OUTLIER_MIN_REST others, one of them below 1 so a 1-10 judge column is never one): an error naming
    the column, row and value. Left in, one such cell would make label rescale every target of the dataset."""
    for j, model in enumerate(obs.models):
        mine = keep & (obs.model == j)
        values = obs.value[mine]
        outside = (values < 0.0) | (values > 1.0)
        n_out = int(outside.sum())
        if n_out == 0 or n_out > max(1, OUTLIER_SHARE * values.size) or values.size - n_out < OUTLIER_MIN_REST \
                or not (values[~outside] < 1.0).any():
            continue
        rows = obs.row[mine][outside]
        first = int(np.argmin(rows))
        column = repr(model) if layout == "wide" else f"'score' of model {model!r}"
        more = f" ({n_out} such values)" if n_out > 1 else ""
        raise DataError(f"column {column}: value {values[outside][first]:g} is outside the 0-1 range of its other "
                        f"{values.size - n_out:,} values{more}; fix the cell (or drop the row)",
                        file=where, row=int(rows[first]) + 1)


def _split_codes(table: pa.Table, column: str, obs: _Observations, where) -> np.ndarray:
    """Index into SPLITS of every row's value in the user's split column; any other value is an error."""
    if column not in table.column_names:
        raise DataError(f"no split column {column!r} (columns: {', '.join(table.column_names)})", file=where)
    if column not in obs.metadata:
        raise ConfigError(f"--split-column {column!r} is a column the layout itself reads")
    codes, values = _codes(table.column(column))  # trimmed; blank is missing
    lookup = np.array([SPLITS.index(v.lower()) if v.lower() in SPLITS else -1 for v in values] + [-1])
    split = lookup[codes]
    if (split < 0).any():
        row = int(np.flatnonzero(split < 0)[0])
        value = f"value {values[codes[row]]!r}" if codes[row] >= 0 else "missing value"
        raise DataError(f"split column {column!r}: {value} (expected train, val or test)", file=where, row=row + 1)
    return split


def _prompt_splits(split: np.ndarray, row_to_prompt: np.ndarray, first_row: np.ndarray, where) -> np.ndarray:
    """One split per prompt (that of its first usable row); rows of one prompt that disagree are an error."""
    per_prompt = split[first_row]
    rows = np.flatnonzero(row_to_prompt >= 0)
    differ = rows[split[rows] != per_prompt[row_to_prompt[rows]]]
    if differ.size:
        same = np.flatnonzero(row_to_prompt == row_to_prompt[differ[0]])
        listing = ", ".join(f"{r + 1} ({SPLITS[split[r]]})" for r in same[:10]) + (", ..." if same.size > 10 else "")
        raise DataError(f"a duplicated prompt has different splits, rows {listing}: one prompt must stay on one side",
                        file=where)
    return per_prompt


def _print_summary(manifest: dict, out: Path) -> None:
    m = manifest
    console.print(f"[green]ingested[/] {m['name']} ({m['layout']}): {m['n_rows_used']:,} of {m['n_rows_in']:,} rows, "
                  f"{m['n_prompts']:,} prompts, {len(m['models'])} models, outcome {m['outcome_kind']} "
                  f"in [{m['outcome_range'][0]:g}, {m['outcome_range'][1]:g}] -> {out}")
    _print_dropped(m)
    test = m.get("test_data")
    if test:
        console.print(f"test data {test['source']}: {test['n_rows_used']:,} of {test['n_rows_in']:,} rows, "
                      f"{test['n_prompts']:,} prompts, all in the test split")
        _print_dropped(test)
    elif m.get("split_rule") == "column":
        console.print(f"split: from column {m['split_column']!r}")


def _print_dropped(m: dict) -> None:
    for reason, count in m["dropped"].items():
        rows = ", ".join(map(str, m["dropped_rows"][reason]))
        console.print(f"[yellow]dropped[/] {count:,} rows: {reason} (rows {rows}{', ...' if count > 5 else ''})")


# ---------------------------------------------------------------------------------------------
# Several inputs merged into one dataset


def _merge(parts: list[tuple[dict, pa.Table, Optional[pa.Table]]], where) -> tuple[dict, pa.Table, Optional[pa.Table]]:
    """One dataset from several `_build` results, with the duplicate rule of a single file: a prompt in
    several inputs (or twice in one) gets each model's outcome averaged over all its observations
    (`count`-weighted), costs likewise over the observations with a known cost. Models are the union in
    order of first appearance (a model an input lacks is unobserved on its prompts); metadata and a
    user split come from the first input holding the prompt (inputs that disagree on a prompt's split
    are an error); battles are concatenated."""
    names: list[str] = []
    for fields, _, _ in parts:
        names += [m for m in fields["models"] if m not in names]
    index = {m: j for j, m in enumerate(names)}
    prompts = pa.chunked_array([c for _, d, _ in parts for c in d.column("prompt").cast(pa.string()).chunks],
                               pa.string())
    uniq = pc.unique(prompts)  # first appearance order
    P, M = len(uniq), len(names)
    count = np.zeros((P, M), np.int64)
    total = np.zeros((P, M))
    cost_n = np.zeros((P, M), np.int64)
    cost_sum = np.zeros((P, M))
    has_cost = any("cost" in d.column_names for _, d, _ in parts)
    first_part = np.full(P, -1, np.int64)
    first_row = np.zeros(P, np.int64)
    split = np.full(P, None, object)
    for k, (fields, d, _) in enumerate(parts):
        at = pc.index_in(d.column("prompt"), value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)
        cols = [index[m] for m in fields["models"]]
        c = list_matrix(d, "count", np.int64)
        count[np.ix_(at, cols)] += c
        total[np.ix_(at, cols)] += c * list_matrix(d, "outcome", np.float64)
        if "cost" in d.column_names:
            known = ~np.isnan(list_matrix(d, "cost", np.float64))
            cost_n[np.ix_(at, cols)] += np.where(known, c, 0)
            cost_sum[np.ix_(at, cols)] += np.where(known, c * np.nan_to_num(list_matrix(d, "cost", np.float64)), 0)
        new = first_part[at] < 0
        first_part[at[new]] = k
        first_row[at[new]] = np.flatnonzero(new)
        if "split" in d.column_names:
            values = np.array(d.column("split").to_pylist(), object)
            unset = np.array([v is None for v in split[at]])
            clash = ~unset & (split[at] != values) & np.array([v is not None for v in values])
            if clash.any():
                r = int(np.flatnonzero(clash)[0])
                raise DataError(f"prompt {d.column('prompt')[r].as_py()[:60]!r} is {values[r]} in {where[k]} "
                                f"but {split[at[r]]} in an earlier input: one prompt must stay on one side")
            split[at[unset]] = values[unset]
    mask = count > 0
    columns = {"prompt_id": pa.array(_prompt_ids(uniq.to_pylist()), pa.string()), "prompt": uniq.cast(pa.string()),
               "outcome": list_column(np.where(mask, total / np.maximum(count, 1), 0.0), pa.float32()),
               "mask": list_column(mask, pa.bool_()), "count": list_column(count.astype(np.int32), pa.int32())}
    if has_cost:
        columns["cost"] = list_column(np.where(cost_n > 0, cost_sum / np.maximum(cost_n, 1), np.nan), pa.float32())
    if any(v is not None for v in split):
        columns["split"] = pa.array(split.tolist(), pa.string())
    meta_names: list[str] = []
    for fields, _, _ in parts:
        meta_names += [c for c in fields["metadata_columns"] if c not in meta_names]
    if meta_names:  # each prompt's metadata from the first input that holds it
        pieces, order = [], []
        for k, (_, d, _) in enumerate(parts):
            mine = np.flatnonzero(first_part == k)
            piece = d.select([c for c in meta_names if c in d.column_names]).take(pa.array(first_row[mine]))
            pieces.append(piece)
            order.append(mine)
        try:
            meta = pa.concat_tables(pieces, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(f"metadata columns of the inputs do not match: {e}", file=where[0]) from None
        meta = meta.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
        columns |= {c: meta.column(c) for c in meta_names}
    dataset = pa.table(columns)

    battles = None
    if any(b is not None for _, _, b in parts):
        pieces = []
        for fields, _, b in parts:
            if b is None:
                continue
            remap = np.array([index[m] for m in fields["models"]], np.int32)
            for side in ("model_a", "model_b"):
                b = b.set_column(b.column_names.index(side), side, pa.array(remap[b.column(side).to_numpy()]))
            pieces.append(b)
        battles = pa.concat_tables(pieces)

    n_obs = {m: 0.0 for m in names}
    cost_total = {m: 0.0 for m in names}
    for fields, d, _ in parts:
        per_model = list_matrix(d, "count", np.int64).sum(axis=0)
        for j, m in enumerate(fields["models"]):
            if fields["costs"][m] is not None:
                n_obs[m] += per_model[j]
                cost_total[m] += per_model[j] * fields["costs"][m]
    kinds = {f["outcome_kind"] for f, _, _ in parts}
    layouts = [f["layout"] for f, _, _ in parts]
    dropped: dict[str, int] = {}
    for f, _, _ in parts:
        for reason, c in f["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + c
    values = np.concatenate([list_matrix(d, "outcome", np.float64)[list_matrix(d, "mask", bool)] for _, d, _ in parts])
    fields = {
        "layout": layouts[0] if len(set(layouts)) == 1 else "mixed", "models": names,
        "costs": {m: (float(cost_total[m] / n_obs[m]) if n_obs[m] else None) for m in names},
        "outcome_kind": kinds.pop() if len(kinds) == 1 else "score",
        "outcome_range": [float(values.min()), float(values.max())],
        "n_rows_in": sum(f["n_rows_in"] for f, _, _ in parts), "n_rows_used": sum(f["n_rows_used"] for f, _, _ in parts),
        "dropped": dropped, "dropped_rows": {r: [] for r in dropped}, "n_prompts": P,
        "n_battles": battles.num_rows if battles is not None else None, "metadata_columns": meta_names,
    }
    return fields, dataset, battles


def _ingest_many(sources: list[str], layout: Optional[str], name: Optional[str], models: Optional[list[str]],
                 split: str, force: bool, split_column: Optional[str], test_data: Optional[str]) -> Path:
    """`ingest` of several inputs: each is read and cleaned alone (its own layout, drops and duplicate
    merge), then `_merge` joins them. The manifest's `sources` lists every input with its hash, layout
    and row counts; `content_hash` covers all of them in order, so unchanged inputs skip the work."""
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if split_column is not None and test_data is not None:
        raise ConfigError("--split-column and --test-data both choose the test prompts: use one of them")
    if len(set(sources)) != len(sources):
        raise ConfigError(f"an input is given twice: {', '.join(sources)}")
    srcs = [_resolve(s, split) for s in sources]
    if test_data is not None:
        srcs.append(_resolve(test_data, "test"))
    name = name or srcs[0].stem
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid dataset name {name!r}")
    check_name(name)
    out = processed_dir(name)
    options = {"layout": layout, "models": models, "split": split if any(s.path is None for s in srcs) else None,
               "ingest_version": INGEST_VERSION}
    if split_column is not None:
        options["split_column"] = split_column
    where = [s.path if s.path is not None else s.text for s in srcs]
    n_main = len(sources)

    def content_hash(hashes: list[str]) -> str:
        inputs = {"inputs": hashes[:n_main]} | ({"test_input": hashes[n_main]} if test_data is not None else {})
        return sha256_json({**inputs, "options": options})

    def unchanged(hashes: list[str]) -> bool:
        try:
            return not force and read_json(out / "manifest.json").get("content_hash") == content_hash(hashes)
        except (OSError, ValueError, AttributeError):
            return False

    hashes = [_hash_input(s) if s.path else None for s in srcs]
    if None not in hashes and unchanged(hashes):
        console.print(f"{name}: unchanged, skipping")
        return out
    with contextlib.ExitStack() as stack:
        loaded = [stack.enter_context(_load(s)) for s in srcs]
        if None in hashes:
            hashes = [h or fingerprint for h, (_, fingerprint) in zip(hashes, loaded)]
            if unchanged(hashes):
                console.print(f"{name}: unchanged, skipping")
                return out
        parts = [_build(loaded[i][0], layout, models, where[i], split_column) for i in range(n_main)]
        records = [{"source": srcs[i].text, "source_hash": hashes[i], "layout": f["layout"], "models": f["models"],
                    **{k: f[k] for k in ("n_rows_in", "n_rows_used", "dropped", "dropped_rows", "n_prompts",
                                         "n_battles")}} for i, (f, _, _) in enumerate(parts)]
        fields, dataset, battles = _merge(parts, where[:n_main])
        if split_column is not None and "split" not in dataset.column_names:
            raise DataError(f"no split column {split_column!r} in the inputs", file=where[0])
        test = None
        if test_data is not None:
            if "split" in dataset.column_names:
                dataset = dataset.drop_columns(["split"])
            fields["layout"] = parts[0][0]["layout"] if fields["layout"] == "mixed" else fields["layout"]
            fields, dataset, battles, test = _add_test_data(fields, dataset, battles, loaded[n_main][0], models,
                                                            where[n_main])
            test = {"source": srcs[n_main].text, "source_hash": hashes[n_main], **test}
            fields["layout"] = "mixed" if len({r["layout"] for r in records}) > 1 else fields["layout"]
        manifest = {"schema_version": SCHEMA_VERSION, "name": name, "layout": fields.pop("layout"),
                    "source": " + ".join(s.text for s in srcs[:n_main]),
                    "source_hash": sha256_json(hashes[:n_main]), "sources": records, "options": options,
                    "content_hash": content_hash(hashes), **fields,
                    "split_rule": "column" if split_column else "test_data" if test else "hash",
                    "split_column": split_column, "test_data": test,
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "pipeline_version": PIPELINE_VERSION}
        with atomic_dir(out) as tmp:
            _save(dataset, tmp / "dataset")
            if battles is not None:
                _save(battles, tmp / "battles")
            write_json(tmp / "manifest.json", manifest)
    m = manifest
    console.print(f"[green]ingested[/] {m['name']} ({m['layout']}) from {len(records)} inputs: {m['n_rows_used']:,} of "
                  f"{m['n_rows_in']:,} rows, {m['n_prompts']:,} prompts, {len(m['models'])} models, outcome "
                  f"{m['outcome_kind']} in [{m['outcome_range'][0]:g}, {m['outcome_range'][1]:g}] -> {out}")
    for r in records:
        console.print(f"  {r['source']} ({r['layout']}): {r['n_rows_used']:,} of {r['n_rows_in']:,} rows, "
                      f"{r['n_prompts']:,} prompts, sha256 {r['source_hash'][:12]}…")
        _print_dropped(r)
    if test:
        console.print(f"test data {test['source']}: {test['n_rows_used']:,} of {test['n_rows_in']:,} rows, "
                      f"{test['n_prompts']:,} prompts, all in the test split")
    return out
