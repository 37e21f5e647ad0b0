"""One input table made into the canonical dataset (docs/contracts.md, section 1): one row per prompt,
in order of first appearance, with list columns `outcome`, `mask`, `count` (and `cost`) over the models.

`build_dataset` drops the rows that cannot be used (counting each reason), averages the outcomes and
costs of a prompt's duplicate rows, takes the split from the user's split column when one is named,
and keeps the other input columns as per-prompt metadata (from the prompt's first row; a name the
pipeline writes itself becomes `source_<name>`), except a column that names this table's models (an
oracle or winner column, `names_models`). `list_column` and `list_matrix` convert between the
list columns and [prompts, models] arrays.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .common import ConfigError, DataError, console, prompt_id
from .ingest_columns import as_text, category_codes
from .ingest_layouts import (CONVERSATION, MESSAGES, Drops, Observations, alpaca_eval_as_pairwise, detect_layout,
                             is_arena, prompt_stand_in, read_observations, require_columns)

SPLITS = ("train", "val", "test")
# How split columns spell them elsewhere (`datasets` writes "validation"); case and blanks are ignored too.
SPLIT_SPELLINGS = {"training": "train", "valid": "val", "validation": "val", "dev": "val"}
MODEL_NAMED_SHARE = 0.5  # a metadata column naming a model on this share of prompts is an outcome (`names_models`)
# Output columns of ingest and label that an input column may not shadow (it is kept as source_<name>).
RESERVED = ("prompt_id", "outcome", "mask", "count", "cost", "target", "split", "difficulty", "soft_label")


def prompt_key(prompts):
    """What makes two prompt texts one prompt: the text without surrounding whitespace, `\r\n` line ends
    read as `\n`. Copies that differ only there (a trailing newline in one export, a file saved on
    Windows) are one prompt, merged like any duplicate, and the first copy's text stands for them, so a
    prompt with no such copy keeps its text and id. Otherwise the copies could land on both sides of the
    split, while the router, whose tokenizer ignores that whitespace, sees one prompt."""
    return pc.utf8_trim_whitespace(pc.replace_substring(prompts, "\r\n", "\n"))


def prompt_ids(prompts: list[str]) -> list[str]:
    """Each prompt's id (`common.prompt_id`)."""
    return [prompt_id(p) for p in prompts]


def list_column(matrix: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    """An [n, m] array as a list column of the canonical dataset (one fixed-length list per row)."""
    p, m = matrix.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(p + 1, dtype=np.int32) * m), pa.array(matrix.ravel(), typ))


def list_matrix(table: pa.Table, column: str, dtype) -> np.ndarray:
    """A fixed-length list column as an [n, m] array (the inverse of `list_column`)."""
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(col), -1)


def names_models(column: pa.ChunkedArray, models: list[str]) -> float:
    """Share of the prompts whose value in `column` is one of `models`, when at least MODEL_NAMED_SHARE of
    them and two different models are named; else 0. Such a column (RouterBench's `oracle_model_to_route_to`,
    a `winner_model`) is derived from the outcomes: as a group for smoothing or a report breakdown it would
    be the answer, not a property of the prompt."""
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        return 0.0
    hits = pc.is_in(column, value_set=pa.array(models, column.type))
    share = pc.mean(hits.cast(pa.int8())).as_py() or 0.0
    named = pc.count_distinct(pc.filter(column, hits)).as_py()
    return share if share >= MODEL_NAMED_SHARE and named >= 2 else 0.0


def build_dataset(table: pa.Table, layout: Optional[str], models: Optional[list[str]], where,
                  split_column: Optional[str] = None, test_file: bool = False):
    """Parse one layout, merge duplicate prompts, and return (manifest fields, dataset, battles)."""
    layout = layout or detect_layout(table.column_names)
    if models and layout != "wide":
        raise ConfigError(f"--models chooses outcome columns of the wide layout; this file is {layout}")
    n = table.num_rows
    if n == 0:
        raise DataError("the file has no rows", file=where)
    if layout == "pairwise":
        table = alpaca_eval_as_pairwise(table, where)
    chat = prompt_stand_in(table.column_names, layout)
    if chat:  # read as the prompt column from here on, so no layout keeps it as metadata
        table = table.rename_columns(["prompt" if c == chat else c for c in table.column_names])
    chats = f"{CONVERSATION} or {MESSAGES}" if layout == "pairwise" else MESSAGES
    require_columns(table, ["prompt"], layout, where, or_else=f" (or {chats}, whose user turns stand for it)")
    drops = Drops(n)
    arena = layout == "pairwise" and is_arena(table)
    prompt_col, non_text = as_text(table.column("prompt"), turns_json=arena or chat is not None)
    drops.add(non_text, "non-text prompt")
    # Prompts are numbered once (C++ hash table) by their key, so emptiness and hashing are per unique prompt.
    keys = prompt_key(prompt_col)
    uniq = pc.unique(keys)
    uniq = uniq.filter(pc.is_valid(uniq))
    pidx = pc.fill_null(pc.index_in(keys, value_set=uniq), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    empty_uniq = np.asarray(pc.equal(pc.utf8_length(uniq), 0).fill_null(True))
    drops.add((pidx < 0) | np.append(empty_uniq, True)[pidx], "empty prompt")

    obs = read_observations(table, layout, drops, where, models)

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
    prompts = prompt_col.take(pa.array(first_row))  # the first copy's text

    key = row_to_prompt[obs.row[keep]] * M + obs.model[keep]
    value = obs.value[keep]
    count = np.bincount(key, minlength=P * M).reshape(P, M)
    total = np.bincount(key, weights=value, minlength=P * M).reshape(P, M)
    mask = count > 0
    outcome = np.where(mask, total / np.maximum(count, 1), 0.0)

    ids = prompt_ids(prompts.to_pylist())
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
        named = names_models(table.column(col).take(take), obs.models)
        if named:
            console.print(f"[yellow]note:[/] column {col!r} names a model of this table on {named:.0%} of the "
                          "prompts (an oracle or winner column: it comes from the outcomes); left out of the metadata")
            continue
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


def _split_codes(table: pa.Table, column: str, obs: Observations, where) -> np.ndarray:
    """Index into SPLITS of every row's value in the user's split column; any other value is an error."""
    if column not in table.column_names:
        raise DataError(f"no split column {column!r} (columns: {', '.join(table.column_names)})", file=where)
    if column not in obs.metadata:
        raise ConfigError(f"--split-column {column!r} is a column the layout itself reads")
    codes, values = category_codes(table.column(column))  # trimmed; blank is missing
    spelled = [SPLIT_SPELLINGS.get(v.lower(), v.lower()) for v in values]
    lookup = np.array([SPLITS.index(v) if v in SPLITS else -1 for v in spelled] + [-1])
    split = lookup[codes]
    if (split < 0).any():
        row = int(np.flatnonzero(split < 0)[0])
        value = f"value {values[codes[row]]!r}" if codes[row] >= 0 else "missing value"
        raise DataError(f"split column {column!r}: {value} (expected train, val or test; validation, valid and "
                        "dev read as val)", file=where, row=row + 1)
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
