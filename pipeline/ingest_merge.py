"""Canonical datasets joined into one: the inputs of a multi-file ingest (`merge_inputs`, with the
duplicate rule of a single file across files) and a test file appended to the main data (`add_test_data`,
its prompts all in the test split). Models are aligned by name; a model a part lacks is unobserved there.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .common import DataError, console
from .ingest_canonical import build_dataset, list_column, list_matrix, prompt_ids, prompt_key

_LISTS = {"outcome": (pa.float32(), 0.0), "mask": (pa.bool_(), False), "count": (pa.int32(), 0),
          "cost": (pa.float32(), np.nan)}


def merge_inputs(parts: list[tuple[dict, pa.Table, Optional[pa.Table]]],
                 where) -> tuple[dict, pa.Table, Optional[pa.Table]]:
    """One dataset from several `build_dataset` results, with the duplicate rule of a single file: a prompt in
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
    keys = prompt_key(prompts)
    uniq = pc.unique(keys)  # first appearance order
    _, first = np.unique(pc.index_in(keys, value_set=uniq).to_numpy(zero_copy_only=False), return_index=True)
    texts = prompts.take(pa.array(first))  # the first copy's text stands for a prompt
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
        at = pc.index_in(prompt_key(d.column("prompt")), value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)
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
    columns = {"prompt_id": pa.array(prompt_ids(texts.to_pylist()), pa.string()), "prompt": texts.cast(pa.string()),
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
            pieces.append(_renumbered(b, fields["models"], index))
        battles = pa.concat_tables(pieces)

    kinds = {f["outcome_kind"] for f, _, _ in parts}
    layouts = [f["layout"] for f, _, _ in parts]
    dropped: dict[str, int] = {}
    for f, _, _ in parts:
        for reason, c in f["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + c
    values = np.concatenate([list_matrix(d, "outcome", np.float64)[list_matrix(d, "mask", bool)] for _, d, _ in parts])
    fields = {
        "layout": layouts[0] if len(set(layouts)) == 1 else "mixed", "models": names,
        "costs": _mean_costs([(f, d) for f, d, _ in parts], names),
        "outcome_kind": kinds.pop() if len(kinds) == 1 else "score",
        "outcome_range": [float(values.min()), float(values.max())],
        "n_rows_in": sum(f["n_rows_in"] for f, _, _ in parts),
        "n_rows_used": sum(f["n_rows_used"] for f, _, _ in parts),
        "dropped": dropped, "dropped_rows": {r: [] for r in dropped}, "n_prompts": P,
        "n_battles": battles.num_rows if battles is not None else None, "metadata_columns": meta_names,
    }
    return fields, dataset, battles


def add_test_data(fields: dict, dataset: pa.Table, battles: Optional[pa.Table], table: pa.Table, layout: str,
                  models: Optional[list[str]], where):
    """The test file read in `layout` (the main file's) and appended to its dataset: its prompts get split
    `test`, the main file's a null split (label's hash rule picks train or val). Returns the merged
    (fields, dataset, battles) and the test file's own row counts for the manifest."""
    t_fields, t_dataset, t_battles = build_dataset(table, layout, models, where, test_file=True)
    names, t_names = fields["models"], t_fields["models"]
    extra = [m for m in t_names if m not in names]
    if extra:
        raise DataError(f"model(s) {', '.join(extra)} are not in the main file (its models: {', '.join(names)})",
                        file=where)
    missing = [m for m in names if m not in t_names]
    if missing:
        console.print(f"[yellow]note:[/] the test file has no outcome for {', '.join(missing)}")
    in_both = pc.is_in(prompt_key(t_dataset.column("prompt")), value_set=prompt_key(dataset.column("prompt").combine_chunks()))
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
        battles = pa.concat_tables([battles, _renumbered(t_battles, t_names, index)])
    lo, hi = fields["outcome_range"]
    t_lo, t_hi = t_fields["outcome_range"]
    fields = fields | {
        "costs": _mean_costs([(fields, dataset), (t_fields, t_dataset)], names),
        "outcome_kind": fields["outcome_kind"] if fields["outcome_kind"] == t_fields["outcome_kind"] else "score",
        "outcome_range": [min(lo, t_lo), max(hi, t_hi)], "n_prompts": merged.num_rows,
        "n_battles": battles.num_rows if battles is not None else None,
        "metadata_columns": fields["metadata_columns"] + [c for c in t_fields["metadata_columns"]
                                                          if c not in fields["metadata_columns"]],
    }
    test = {k: t_fields[k] for k in ("n_rows_in", "n_rows_used", "dropped", "dropped_rows", "n_prompts", "n_battles")}
    return fields, merged, battles, test


def _renumbered(battles: pa.Table, models: list[str], index: dict[str, int]) -> pa.Table:
    """`battles` whose model_a / model_b index `models` made to index the merged models (`index`: name -> index)."""
    remap = np.array([index[m] for m in models], np.int32)
    for side in ("model_a", "model_b"):
        battles = battles.set_column(battles.column_names.index(side), side,
                                     pa.array(remap[battles.column(side).to_numpy()]))
    return battles


def _mean_costs(parts: list[tuple[dict, pa.Table]], names: list[str]) -> dict[str, Optional[float]]:
    """Each model's cost over the (manifest fields, dataset) parts: each part's mean weighted by its observations."""
    n_obs = {m: 0.0 for m in names}
    total = {m: 0.0 for m in names}
    for fields, dataset in parts:
        per_model = list_matrix(dataset, "count", np.int64).sum(axis=0)
        for j, m in enumerate(fields["models"]):
            if fields["costs"][m] is not None:
                n_obs[m] += per_model[j]
                total[m] += per_model[j] * fields["costs"][m]
    return {m: (float(total[m] / n_obs[m]) if n_obs[m] else None) for m in names}
