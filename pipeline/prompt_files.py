"""Files of prompts: reading them (JSON lines, a JSON array, CSV or parquet, compressed or not) and scoring
them with a bundle (`score_file`, what `prerouter score` runs). Torch-free like the runtime it uses;
parquet needs pyarrow, which only the training install has.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .compression import READ_ERRORS, decompress_failure, holds_json_array, open_input, without_compression
from .runtime import Router, RouterError, prompt_of, router_error


def read_prompt_records(path: str | Path) -> Iterator[dict]:
    """The records of a JSONL file of {"prompt": ..., ...} objects, one per non-blank line, in order, or
    (a `.csv` or tab-separated `.tsv` file) its rows, which need a `prompt` column (`prompt_id` is kept too;
    other columns are not); either may be compressed (.gz, .bz2, .xz). A `.json` file holding one array of such records, and a
    `.parquet` file's rows (its `prompt` or `messages` and `prompt_id` columns; needs pyarrow), are read as
    JSONL records are.

    A JSONL record may give OpenAI-style `messages` instead of `prompt` (as a request to `serve` may): its
    `prompt` is then `prompt_from_messages(messages)`. UTF-8 (a leading BOM is skipped). A line that is
    not valid UTF-8 or JSON, or not an object with exactly one of a string `prompt` or usable `messages`,
    is a RouterError naming the file and the line.
    """
    suffix = Path(without_compression(str(path))).suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            yield from _csv_prompt_records(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            yield from _parquet_prompt_records(path)
        elif suffix == ".json" and holds_json_array(path):
            yield from _json_array_prompt_records(path)
        else:
            yield from _jsonl_prompt_records(path)
    except READ_ERRORS as e:
        failure = decompress_failure(path, e)
        if failure is None:
            raise
        raise router_error(failure, file=path) from None


def _jsonl_prompt_records(path: str | Path) -> Iterator[dict]:
    with open_input(path, "rb") as src:
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
            yield _prompt_record(rec, path, lineno)


def _json_array_prompt_records(path: str | Path) -> Iterator[dict]:
    """The records of a whole-document JSON array (`.json`), each read like a JSONL line; `row` is its 1-based
    position in the array."""
    with open_input(path, "rb") as src:
        try:
            records = json.loads(src.read().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise router_error(f"not valid UTF-8 (byte 0x{e.object[e.start]:02x})", file=path) from None
        except ValueError as e:
            raise router_error(f"not valid JSON: {e}", file=path) from None
        except RecursionError:
            raise router_error("not valid JSON: nested too deeply", file=path) from None
    for row, rec in enumerate(records, 1):
        yield _prompt_record(rec, path, row)


def _prompt_record(rec, path: str | Path, row: int) -> dict:
    """A JSON or parquet record with its `prompt` as a request's would be read (`runtime.prompt_of`); its
    RouterError names the file and the row."""
    try:
        prompt = prompt_of(rec)
    except RouterError as e:
        raise router_error(e.reason, file=path, row=row) from None
    return {**rec, "prompt": prompt}


def _parquet_prompt_records(path: str | Path) -> Iterator[dict]:
    """The rows of a parquet file's `prompt` (or `messages`) and `prompt_id` columns, in order (needs pyarrow,
    which the runtime alone does not install)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise router_error("reading .parquet needs pyarrow (pip install pyarrow); or give the prompts as .jsonl or "
                           ".csv", file=path) from None
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise router_error(f"not a readable parquet file: {e}", file=path) from None
    names = parquet.schema_arrow.names
    columns = [c for c in ("prompt", "messages", "prompt_id") if c in names]
    if "prompt" not in columns and "messages" not in columns:
        raise router_error(f"no `prompt` column (columns: {', '.join(names)})", file=path)
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield _prompt_record({k: v for k, v in rec.items() if v is not None}, path, row)


def _csv_prompt_records(path: str | Path, delimiter: str) -> Iterator[dict]:
    import csv

    with open_input(path, newline="") as src:
        try:
            rows = csv.DictReader(src, delimiter=delimiter)
            if "prompt" not in (rows.fieldnames or []):
                raise router_error(f"no `prompt` column (columns: {', '.join(rows.fieldnames or [])})", file=path)
            for row in rows:
                if row["prompt"] is None:  # a short row: no cell under `prompt`
                    raise router_error("no `prompt` cell on this line", file=path, row=rows.line_num)
                yield {k: row[k] for k in ("prompt", "prompt_id") if row.get(k) is not None}
        except UnicodeDecodeError as e:
            raise router_error(f"not valid UTF-8 (byte 0x{e.object[e.start]:02x})", file=path) from None
        except csv.Error as e:
            raise router_error(f"not valid CSV: {e}", file=path) from None


def score_file(bundle: str | Path, input_jsonl: str | Path, output_jsonl: str | Path,
               strong_fraction: float | None = None, batch_size: int = 64, threshold: float | None = None,
               cost_weight: float | None = None) -> int:
    """Score a JSONL file of {"prompt": ... or "messages": [...], ["prompt_id": ...]} lines (or a CSV, JSON-array
    or parquet file: `read_prompt_records`); returns the number of lines written.

    Each output line: `prompt_id` (when given), `index` (0-based record number), `scores`
    ({model: probability}), `route` (the model `Router.decide` picks with these settings) and, for pair
    routers, `score`.

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
    router.check_settings(strong_fraction, threshold, cost_weight)
    try:
        output_jsonl.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{output_jsonl.name}.", suffix=".tmp", dir=output_jsonl.parent)
    except OSError as e:
        raise router_error(f"cannot write the output there: {e.strerror or e}", file=output_jsonl) from None
    tmp = Path(tmp_name)
    written = 0

    def flush(records: list[tuple[int, dict]], out) -> None:
        p = router.scores([r["prompt"] for _, r in records], batch_size)
        chosen = router.choose(p, strong_fraction, threshold, cost_weight)
        for (index, rec), row, c in zip(records, p, chosen):
            line = {"prompt_id": rec["prompt_id"]} if "prompt_id" in rec else {}
            line.update(index=index, **router.describe(row, c))
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
