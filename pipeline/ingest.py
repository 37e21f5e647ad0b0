"""Read preference data in any of three layouts into the canonical dataset (docs/contracts.md, section 1).

Input goes through the `datasets` library (csv, json/jsonl, parquet, arrow, a folder of them, or
`hf:org/name`), so big files are memory-mapped Arrow; the merge is done on whole columns with pyarrow
compute and numpy (`pc.unique`/`pc.index_in` to number prompts and models, `np.bincount` to average
duplicates), never with per-row Python objects for the whole file.

Layouts, detected from the columns (`layout=` overrides):

- pairwise: `prompt, model_a, model_b` and either `winner` (model_a | model_b | tie | tie (bothbad), also
  spelt both_bad, tie (both bad) or tie_bothbad; any case)
  or the Chatbot-Arena-55k 0/1 columns `winner_model_a, winner_model_b, winner_tie` (there the
  prompt is a JSON list of turns, joined with blank lines), or AlpacaEval's annotations
  (`instruction, generator_1, generator_2, preference`: 1 or 2 the side, 0 or 1.5 a draw, a weighted
  judge's value between 1 and 2 its nearer side; `ingest_layouts.alpaca_eval_as_pairwise`). Without a
  `prompt` column, the user turns of `conversation_a` are the prompt (MT-Bench human judgments, Arena
  conversations), or those of `messages`, in any layout (`chat.chat_prompt`: answers and system turns
  left out). Optional per-side `cost_a`, `cost_b`.
  A model's outcome on a prompt is its mean battle score (win 1, tie 0.5, loss 0).
- long: `prompt, model, score`, optional `cost`; an input `prompt_id` is kept as `source_prompt_id`.
- wide: `prompt` plus one outcome column per model. `<model>|total_cost` columns (RouterBench) are
  that model's per-row cost and `<model>|model_response` columns are ignored; another column with a `|`
  is an error without `models=` (it would be neither a model nor clearly metadata). Without `models=`,
  the model columns are: the `|total_cost` prefixes when any exist; otherwise every boolean
  column, every integer column whose values are all 0 or 1, and every float column - except
  id-like names (`id`, `*_id`, `idx`, `index`, `qid`...). Everything else is metadata. Integer
  scores on another scale (e.g. 1-10 judges) therefore need `models=`.

In any layout the prompts may come from a file of their own (`prompts=`, `--prompts FILE`), joined by
the one column the data and that file share (MT-Bench's judgments and question.jsonl:
`ingest_join.join_prompts`).

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
instead: every row's value must be train, val or test (any case, surrounding blanks ignored; validation,
valid and dev mean val), else the file fails naming the row and value, and the rows of one prompt must
agree. `test_data=FILE` reads a second file in the main file's layout whose prompts are all test (a
prompt in both files is an error, a model the main file lacks too); the main file's prompts are left to
label's hash rule for train/val.
Either way the dataset gets a `split` column (null where the hash rule decides) and the manifest says
which rule applies (`split_rule`).

Columns are never renamed silently: a name that appears twice in the header is an error naming it. A file
whose columns have other names (`question`, `model_name`, `label`...) is read with `rename={old: new}` (CLI
`--rename question=prompt,model_name=model`), applied to every input before anything else; renaming a column
that is not there, or to a name another column already has, is an error. A
model whose outcomes are 0-1 but for a few cells (at most 5%, with at least 20 in range) is an error naming
the column, row and value, since label would otherwise rescale every target to fit that cell; real scales
(1-10 judges, any range most values use) are left to label.

Re-ingest is skipped when `manifest.json` holds the same `content_hash` (input bytes of both files + options).

Modules, in the order the data goes through them: `ingest_sources` reads a file or hub dataset into an
Arrow table, `ingest_columns` types its columns, `ingest_layouts` reads the layout into observations,
`ingest_canonical` makes them the canonical dataset, `ingest_merge` joins several inputs or the test
file, and `ingest_output` writes data/processed/NAME unless it is up to date. This module is the stage.
"""
from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Mapping, Optional, Sequence

from . import __version__ as PIPELINE_VERSION
from .common import ConfigError, DataError, check_name, console, processed_dir, sha256_json
from .ingest_canonical import build_dataset, list_column, list_matrix
from .ingest_join import join_prompts
from .ingest_layouts import LAYOUTS, detect_layout
from .ingest_merge import add_test_data, merge_inputs
from .ingest_output import load_changed_inputs, print_summary, write_processed
from .ingest_sources import data_files, default_name, parse_rename, resolve_source

__all__ = ["ingest", "detect_layout", "parse_rename", "list_column", "list_matrix", "SCHEMA_VERSION", "INGEST_VERSION"]

SCHEMA_VERSION = 1
INGEST_VERSION = 4  # bump when the output for the same input changes, so old artifacts are redone


def ingest(source: str | Sequence[str], layout: Optional[str] = None, name: Optional[str] = None,
           models: Optional[list[str]] = None, split: str = "train", force: bool = False,
           split_column: Optional[str] = None, test_data: Optional[str] = None,
           rename: Optional[Mapping[str, str]] = None, prompts: Optional[str] = None) -> Path:
    """Read `source` into data/processed/NAME/ (dataset/, battles/ for pairwise, manifest.json).

    `source` may be several files / hub ids / folders (a folder stands for the data files under it,
    `data_files`): each file is read and cleaned alone (its own layout, drops and duplicate merge, or
    `layout` for all), then `merge_inputs` joins them; the manifest's `sources` lists
    every input with its hash, layout and row counts. `split_column`: the input column whose train / val /
    test values are the split (in every file). `test_data`: a second file, in the (first) main file's
    layout, whose prompts are the test split (a hub id reads its `test` split). `rename` ({old: new}) renames
    columns of every input as it is read; the other options use the new names. `prompts`: a file of the
    prompts that the inputs name by a key (`ingest_join.join_prompts`). The manifest's `content_hash`
    covers every input in order and the options, so unchanged inputs skip the work.
    """
    given = [source] if isinstance(source, str) else list(source)
    sources = [f for s in given for f in data_files(s)]
    if not sources:
        raise ConfigError("no input file given")
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if split_column is not None and test_data is not None:
        raise ConfigError("--split-column and --test-data both choose the test prompts: use one of them")
    if len(set(sources)) != len(sources):
        raise ConfigError(f"an input is given twice: {', '.join(sources)}")
    n_main = len(sources)
    srcs = [resolve_source(s, split, rename) for s in sources]
    if test_data is not None:
        if len(test_files := data_files(test_data)) > 1:
            raise ConfigError(f"--test-data takes one file; the folder {test_data} holds {len(test_files)} data "
                              "files: name the test one")
        srcs.append(resolve_source(test_files[0], "test", rename))
    if prompts is not None:
        if len(prompt_files := data_files(prompts)) > 1:
            raise ConfigError(f"--prompts takes one file; the folder {prompts} holds {len(prompt_files)} data files")
        srcs.append(resolve_source(prompt_files[0], split, rename))
    n_data = n_main + (test_data is not None)  # the inputs with outcomes: the prompts file comes after them
    name = name or default_name(given[0])
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid dataset name {name!r}")
    check_name(name)
    out = processed_dir(name)
    # `split` is an option where it picks what a hub dataset reads. With several inputs a hub test file
    # counts too (it always reads `test`); kept as it was, so existing manifests still match.
    hub = any(s.path is None for s in (srcs if n_main > 1 else srcs[:1]))
    options = {"layout": layout, "models": models, "split": split if hub else None, "ingest_version": INGEST_VERSION}
    if split_column is not None:
        options["split_column"] = split_column
    if rename:  # only when given, so manifests from before the option still match
        options["rename"] = dict(rename)
    where = [s.path if s.path is not None else s.text for s in srcs]

    def content_hash(hashes: list[str]) -> str:
        inputs = {"inputs": hashes[:n_main]} if n_main > 1 else {"input": hashes[0]}
        test_input = {"test_input": hashes[n_main]} if test_data is not None else {}
        prompts_input = {"prompts_input": hashes[n_data]} if prompts is not None else {}
        return sha256_json({**inputs, **test_input, **prompts_input, "options": options})

    with contextlib.ExitStack() as stack:
        inputs = load_changed_inputs(stack, srcs, out, content_hash, force)
        if inputs is None:
            console.print(f"{name}: unchanged, skipping")
            return out
        tables, hashes = inputs
        if prompts is not None:
            tables = [join_prompts(tables[i], tables[n_data], where[i], where[n_data]) for i in range(n_data)]
        parts = [build_dataset(tables[i], layout, models, where[i], split_column) for i in range(n_main)]
        first_layout = parts[0][0]["layout"]
        if n_main == 1:
            fields, dataset, battles = parts[0]
            origin = {"source": srcs[0].text, "source_hash": hashes[0]}
        else:
            records = [{"source": srcs[i].text, "source_hash": hashes[i], "layout": f["layout"], "models": f["models"],
                        **{k: f[k] for k in ("n_rows_in", "n_rows_used", "dropped", "dropped_rows", "n_prompts",
                                             "n_battles")}} for i, (f, _, _) in enumerate(parts)]
            fields, dataset, battles = merge_inputs(parts, where[:n_main])
            if split_column is not None and "split" not in dataset.column_names:
                raise DataError(f"no split column {split_column!r} in the inputs", file=where[0])
            origin = {"source": " + ".join(s.text for s in srcs[:n_main]), "source_hash": sha256_json(hashes[:n_main]),
                      "sources": records}
        test = None
        if test_data is not None:
            fields, dataset, battles, test = add_test_data(fields, dataset, battles, tables[n_main], first_layout,
                                                           models, where[n_main])
            test = {"source": srcs[n_main].text, "source_hash": hashes[n_main], **test}
        manifest = {"schema_version": SCHEMA_VERSION, "name": name, "layout": fields.pop("layout"), **origin,
                    "options": options, "content_hash": content_hash(hashes), **fields,
                    "split_rule": "column" if split_column else "test_data" if test else "hash",
                    "split_column": split_column, "test_data": test,
                    **({"prompts": {"source": srcs[n_data].text, "source_hash": hashes[n_data]}} if prompts else {}),
                    "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "pipeline_version": PIPELINE_VERSION}
        write_processed(out, dataset, battles, manifest)
    print_summary(manifest, out)
    return out
