"""Prompts kept in a file of their own (`ingest --prompts FILE`): outcomes keyed by an id, the text elsewhere.

MT-Bench's judgments are published that way (FastChat: `model_judgment/gpt-4_single.jsonl` holds
`question_id, model, score, turn`; `question.jsonl` holds `question_id, category, turns`). `join_prompts`
gives each data row the prompt of its key: the prompts file's `prompt` column, or its `turns` (a list of
user turns), of which a row with a `turn` column gets the first `turn` — a turn-2 judgment scores an answer
given after both questions. The turns are then read by the chat rule like any list prompt (`pipeline/chat.py`).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .common import DataError
from .ingest_columns import as_float
from .ingest_layouts import CONVERSATION, MESSAGES

TEXT_COLUMNS = ("prompt", "turns")  # what the prompts file's text may be called
TURN = "turn"


def join_prompts(table: pa.Table, prompts: pa.Table, where, prompts_where) -> pa.Table:
    """`table` with a `prompt` column taken from `prompts` by the one column the two share (the key), and
    the prompts file's other columns (e.g. `category`) beside it as metadata, where `table` has no column
    of that name. Every key must be in the prompts file once; a row whose key is missing is an error."""
    text = next((c for c in TEXT_COLUMNS if c in prompts.column_names), None)
    if text is None:
        raise DataError(f"the prompts file needs a `prompt` column or a `turns` list (columns: "
                        f"{', '.join(prompts.column_names)}); --rename OLD=prompt gives a column that name",
                        file=prompts_where)
    if own := [c for c in ("prompt", CONVERSATION, MESSAGES) if c in table.column_names]:
        raise DataError(f"the data has its own {own[0]!r} column; --prompts is for data that names its prompts "
                        "by a key", file=where)
    shared = [c for c in prompts.column_names if c in table.column_names and c not in TEXT_COLUMNS]
    if len(shared) != 1:
        found = f"shares {', '.join(shared)}" if shared else "shares none"
        raise DataError(f"the data and the prompts file must share exactly one column, the key that joins them; "
                        f"the data ({', '.join(table.column_names)}) {found}", file=prompts_where)
    key = shared[0]
    keys = _as_keys(prompts.column(key))
    if pc.count_distinct(keys).as_py() != len(keys) or keys.null_count:
        values, counts = np.unique(np.array(keys.to_pylist(), object).astype(str), return_counts=True)
        twice = values[counts > 1]
        raise DataError(f"{key} {twice[0] if twice.size else 'null'!s} is in the prompts file "
                        f"{'more than once' if twice.size else 'without a value'}: each key names one prompt",
                        file=prompts_where)
    index = pc.index_in(_as_keys(table.column(key)), value_set=keys)
    if index.null_count:
        row = int(np.flatnonzero(np.asarray(index.is_null()))[0])
        raise DataError(f"{index.null_count} row(s) have a {key} with no prompt in the prompts file (first: "
                        f"{table.column(key)[row].as_py()!r})", file=where, row=row + 1)
    prompt = prompts.column(text).combine_chunks().take(index)
    if text == "turns" and TURN in table.column_names:
        prompt = _first_turns(prompt, table.column(TURN), where)
    out = table.append_column("prompt", prompt)
    for c in prompts.column_names:
        if c not in (key, text) and c not in out.column_names:
            out = out.append_column(c, prompts.column(c).combine_chunks().take(index))
    return out


def _as_keys(column: pa.ChunkedArray) -> pa.Array:
    """Keys compared as text, so an id read as a number in one file and as a string in the other still
    matches (41 and "41"; a float 41.0 as 41)."""
    column = column.combine_chunks()
    if pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False)
        if np.all(np.isnan(values) | (values == np.round(values))):
            column = pa.array([None if np.isnan(v) else int(v) for v in values], pa.int64())
    return pc.cast(column, pa.string())


def _first_turns(turns: pa.Array, turn: pa.ChunkedArray, where) -> pa.Array:
    """Each row's first `turn` turns (1-based; past the last, all of them)."""
    count, non_numeric = as_float(turn)
    bad = np.flatnonzero(non_numeric | np.isnan(count) | (count < 1) | (count != np.round(count)))
    if bad.size:
        raise DataError(f"turn {turn[int(bad[0])].as_py()!r} is not a turn number (1, 2, ...)", file=where,
                        row=int(bad[0]) + 1)
    lists = turns.to_pylist()
    return pa.array([None if t is None else t[: int(n)] for t, n in zip(lists, count)], turns.type)
