"""Typed views of raw input columns, computed on whole columns (per-row Python only for mixed-type JSON):
prompt text (lists of turns joined with blank lines), floats (missing and non-numeric cells flagged),
and small categoricals (model names, winners, splits) as integer codes over their trimmed values.

A list of turns is a chat, read by `chat.chat_prompt`: the user's turns joined with blank lines, the rule
the runtime applies to the messages a service receives.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .chat import NotText, chat_prompt

_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


def is_json_ext(typ: pa.DataType) -> bool:
    return isinstance(typ, pa.BaseExtensionType) and typ.extension_name == "arrow.json"


def _json_values(col: pa.ChunkedArray) -> list:
    """Python values of a mixed-type JSON column (`datasets` keeps them JSON-encoded)."""
    encoded = [v for chunk in col.chunks for v in chunk.storage.to_pylist()]
    return [None if v is None else json.loads(v) for v in encoded]


def as_text(col: pa.ChunkedArray, turns_json: bool = False) -> tuple[pa.ChunkedArray, np.ndarray]:
    """(text column, non-text mask). Lists of turns, and JSON-encoded lists when `turns_json`,
    are joined with blank lines, and one message object is a chat of one turn (`chat.chat_prompt`);
    anything that is not text becomes null and is flagged."""
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
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_struct(typ) or is_json_ext(typ):
        values = _json_values(col) if is_json_ext(typ) else col.to_pylist()
    elif pa.types.is_null(typ):
        return pa.chunked_array([pa.nulls(n, pa.string())]), np.zeros(n, bool)
    else:  # numbers, bools...: not text at all
        return pa.chunked_array([pa.nulls(n, pa.string())]), ~np.asarray(col.is_null())
    out, bad = [], np.zeros(n, bool)
    for i, v in enumerate(values):
        text = (v if isinstance(v, str) else _join_turns(v) if isinstance(v, list)
                else _join_turns([v]) if isinstance(v, dict) else None)
        bad[i] = v is not None and text is None
        out.append(text)
    return pa.chunked_array([pa.array(out, pa.string())]), bad


def _join_turns(turns) -> Optional[str]:
    try:
        return chat_prompt(turns)
    except NotText:
        return None


def as_float(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
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
    values = _json_values(col) if is_json_ext(typ) else col.to_pylist()
    out = np.full(n, np.nan)
    bad = np.zeros(n, bool)
    for i, v in enumerate(values):
        if isinstance(v, (bool, int, float)):
            out[i] = float(v)
        elif v is not None:
            bad[i] = True
    return out, bad


def category_codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Small categorical column (model names, winners) as int64 codes (-1 for null or blank) and sorted names.

    Values are trimmed, so " a" and "a" are one model, and a blank value is missing as in CSV."""
    if is_json_ext(col.type):  # mixed JSON types: decode, else "a" would become the name '"a"'
        col = pa.chunked_array([pa.array([v if v is None or isinstance(v, str) else json.dumps(v)
                                          for v in _json_values(col)], pa.string())])
    col = pc.utf8_trim_whitespace(pc.cast(col, pa.string()) if not pa.types.is_string(col.type) else col)
    col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
    names = sorted(v for v in pc.unique(col).to_pylist() if v is not None)
    codes = pc.index_in(col, value_set=pa.array(names, pa.string()))
    return pc.fill_null(codes, -1).to_numpy(zero_copy_only=False).astype(np.int64), names
