"""The processed dataset of ingest, data/processed/NAME: whether it is up to date with its inputs (the
manifest's `content_hash`), writing it in one atomic swap (dataset/, battles/ for pairwise input,
manifest.json), and the summary printed after.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa

from .common import atomic_dir, console, read_json, write_json
from .ingest_sources import Source, hash_input, load_table


def load_changed_inputs(stack: contextlib.ExitStack, sources: list[Source], out: Path,
                        content_hash: Callable[[list[str]], str], force: bool,
                        ) -> Optional[tuple[list[pa.Table], list[str]]]:
    """The inputs' tables and hashes, or None when `out` holds a dataset of the same `content_hash(hashes)`
    (and not `force`). Local files are hashed before loading, so an unchanged input costs one read; a hub
    dataset is identified by the fingerprint `datasets` gives it after loading. The tables are readable
    until `stack` closes, which removes their read caches."""

    def up_to_date(hashes: list[str]) -> bool:
        try:
            return not force and read_json(out / "manifest.json").get("content_hash") == content_hash(hashes)
        except (OSError, ValueError, AttributeError):
            return False

    hashes = [hash_input(s) if s.path else None for s in sources]
    if None not in hashes and up_to_date(hashes):
        return None
    loaded = [stack.enter_context(load_table(s)) for s in sources]
    if None in hashes:
        hashes = [h or fingerprint for h, (_, fingerprint) in zip(hashes, loaded)]
        if up_to_date(hashes):
            return None
    return [table for table, _ in loaded], hashes


def write_processed(out: Path, dataset: pa.Table, battles: Optional[pa.Table], manifest: dict) -> None:
    """The dataset, its battles and manifest.json made the version `out` names, all at once (`atomic_dir`)."""
    with atomic_dir(out) as tmp:
        _save(dataset, tmp / "dataset")
        if battles is not None:
            _save(battles, tmp / "battles")
        write_json(tmp / "manifest.json", manifest)


def _save(table: pa.Table, path: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset(table).save_to_disk(str(path))


def print_summary(manifest: dict, out: Path) -> None:
    """What was ingested: rows used, prompts, models and outcomes; per input when there are several."""
    m = manifest
    sources = m.get("sources")
    inputs = f" from {len(sources)} inputs" if sources else ""
    console.print(f"[green]ingested[/] {m['name']} ({m['layout']}){inputs}: {m['n_rows_used']:,} of "
                  f"{m['n_rows_in']:,} rows, {m['n_prompts']:,} prompts, {len(m['models'])} models, outcome "
                  f"{m['outcome_kind']} in [{m['outcome_range'][0]:g}, {m['outcome_range'][1]:g}] -> {out}")
    if sources:
        for r in sources:
            console.print(f"  {r['source']} ({r['layout']}): {r['n_rows_used']:,} of {r['n_rows_in']:,} rows, "
                          f"{r['n_prompts']:,} prompts, sha256 {r['source_hash'][:12]}…")
            _print_dropped(r)
    else:
        _print_dropped(m)
    test = m.get("test_data")
    if test:
        console.print(f"test data {test['source']}: {test['n_rows_used']:,} of {test['n_rows_in']:,} rows, "
                      f"{test['n_prompts']:,} prompts, all in the test split")
        if not sources:
            _print_dropped(test)
    elif m.get("split_rule") == "column" and not sources:
        console.print(f"split: from column {m['split_column']!r}")


def _print_dropped(m: dict) -> None:
    for reason, count in m["dropped"].items():
        rows = ", ".join(map(str, m["dropped_rows"][reason]))
        console.print(f"[yellow]dropped[/] {count:,} rows: {reason} (rows {rows}{', ...' if count > 5 else ''})")
