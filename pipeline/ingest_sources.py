"""Reading one ingest input into an Arrow table: a local .csv, .tsv, .jsonl, .ndjson, .json, .parquet or .arrow
file (the text formats also compressed as .gz, .bz2 or .xz), or a hub dataset given as `hf:org/name`.

`data_files` turns a folder (a downloaded hub dataset, a `save_to_disk` folder) into the data files under
it, `resolve_source` checks a name, `hash_input` hashes a local file's bytes (checking text formats are
UTF-8 on the same pass) and `load_table` reads it through the `datasets` library, memory-mapped, with
every read failure turned into one `DataError` naming the file (and line where there is one). CSV
columns are read as text and typed here over whole columns; a header naming a column twice is an
error. The read cache lives under the data root and is removed after, or by the next ingest when the
process that made it was killed.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional

import pyarrow as pa
import pyarrow.compute as pc

from .common import ConfigError, DataError, arrow_table, data_root, processed_dir
from .compression import (READ_ERRORS, compression_of, decompress_failure, holds_json_array, open_input,
                          without_compression)
from .ingest_columns import is_json_ext
from .ingest_layouts import CONVERSATION, MESSAGES

_TEXT_COLUMNS = ("prompt", "model", "model_a", "model_b", "winner", CONVERSATION, MESSAGES)  # never typed as numbers
# `datasets` reads compressed files itself (by the suffix); every raw read here goes through `open_input`.
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json",
             ".parquet": "parquet", ".arrow": "arrow"}
_BINARY = ("parquet", "arrow")  # not text: never compressed, not checked as UTF-8
# Types met in the wild that ingest does not read, with the way to a type it does.
_CONVERT = {
    ".pkl": "loading a pickle runs any code it holds; if you trust the file, convert it once: "
            "python -c \"import pandas as pd; pd.read_pickle('FILE').to_parquet('OUT')\"",
    ".xlsx": "save the sheet as CSV, or convert it: python -c \"import pandas as pd; "
             "pd.read_excel('FILE').to_parquet('OUT')\" (needs openpyxl)",
}
_CONVERT[".pickle"] = _CONVERT[".pkl"]
_CONVERT[".xls"] = _CONVERT[".xlsx"]
# JSON files `datasets` and the hub keep beside the data of a folder; they describe it and hold no rows.
_FOLDER_METADATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}


@dataclass
class Source:
    """Where the data comes from and how `datasets` reads it."""

    text: str  # as given by the user
    path: Optional[Path]  # local file, None for a hub dataset
    builder: str  # csv | json | parquet | hub id
    split: str
    rename: dict[str, str] = field(default_factory=dict)  # the user's column names -> the layout's names


def parse_rename(text: Optional[str]) -> dict[str, str]:
    """`--rename "question=prompt,model_name=model"` as {old: new}; a malformed pair is a ConfigError."""
    rename: dict[str, str] = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        old, eq, new = (part.strip() for part in pair.partition("="))
        if not eq or not old or not new:
            raise ConfigError(f"--rename takes OLD=NEW pairs separated by commas, not {pair.strip()!r}")
        if old in rename:
            raise ConfigError(f"--rename names column {old!r} twice")
        rename[old] = new
    return check_rename(rename)


def check_rename(rename: Optional[Mapping[str, str]]) -> dict[str, str]:
    """`rename` ({old: new}, or None for none) with every name a non-empty string and no new name twice."""
    rename = dict(rename or {})
    if not all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in rename.items()):
        raise ConfigError(f"rename maps column names to column names, got {rename!r}")
    news = list(rename.values())
    if twice := sorted({n for n in news if news.count(n) > 1}):
        raise ConfigError(f"--rename gives two columns the name {twice[0]!r}")
    return rename


def data_files(source: str) -> list[str]:
    """`source` itself, or for a folder every data file under it in name order: the files of a type ingest
    reads, except hidden ones (a name starting with a dot, or in such a folder) and `datasets`' own metadata.
    A folder is read as its files given together, so its train and test files (a hub dataset's splits)
    become one pool that the pipeline splits. A folder without data files is a DataError."""
    folder = Path(source)
    if source.startswith("hf:") or not folder.is_dir():
        return [source]
    found = [f for f in folder.rglob("*") if f.is_file() and f.name not in _FOLDER_METADATA
             and not any(part.startswith(".") for part in f.relative_to(folder).parts) and _builder_of(f)]
    if not found:
        raise DataError("a folder with no data files in it: ingest reads the .csv, .tsv, .jsonl, .json, .parquet "
                        "and .arrow files under a folder", file=folder)
    return [str(f) for f in sorted(found, key=lambda f: f.relative_to(folder).parts)]


def _is_data_input(data: str) -> bool:
    """`data` names something ingest reads (a file, a hub id, or a folder that is not also the name of a
    dataset already ingested), not an ingested dataset."""
    if Path(data).is_dir():
        return not (processed_dir(data) / "manifest.json").is_file()
    return Path(data).is_file() or data.startswith("hf:")


def read_options(data: str, read: Optional[Mapping] = None) -> Optional[dict]:
    """ingest's options for reading `data` (layout, models, rename, prompts) when `data` is a file, folder or hub id;
    None when it names a dataset already ingested, which is not read again, so options given for it are an
    error."""
    read = {k: v for k, v in (read or {}).items() if v}
    if _is_data_input(data):
        return read
    if read:
        flags = ", ".join(f"--{k}" for k in read)
        raise ConfigError(f"{flags} read a data file; {data!r} is not a file (a dataset already ingested is used as it is)")
    return None


def default_name(source: str) -> str:
    """The dataset name an input gets when none is given: the file name without its type and compression
    suffixes (data.jsonl.gz → data), or a hub dataset's last path part."""
    name = without_compression(source.removeprefix("hf:").rstrip("/").split("/")[-1])
    stem, dot, suffix = name.rpartition(".")
    return (stem if dot and stem and f".{suffix.lower()}" in _BUILDERS else name) or "data"


def _separator(path: Path) -> str:
    """The field separator of a CSV-read file: a tab for .tsv, a comma otherwise."""
    return "\t" if Path(without_compression(path.name)).suffix.lower() == ".tsv" else ","


def _builder_of(path: Path) -> Optional[str]:
    """The `datasets` builder that reads `path` by its name, or None for a type ingest does not read (a
    compressed binary file among them)."""
    builder = _BUILDERS.get(Path(without_compression(path.name)).suffix.lower())
    return None if builder in _BINARY and compression_of(path) is not None else builder


def resolve_source(source: str, split: str, rename: Optional[Mapping[str, str]] = None) -> Source:
    """`source` (a file path or hf:org/name) checked to be a file of a known type that exists and is not empty;
    `rename` ({old: new}) is applied to its columns as it is read."""
    rename = check_rename(rename)
    if source.startswith("hf:"):
        return Source(source, None, source[3:], split, rename)
    path = Path(source)
    compressed = compression_of(path) is not None
    builder = _builder_of(path)
    if builder is None:
        what = "".join(path.suffixes[-2:]) if compressed else path.suffix
        if convert := _CONVERT.get(path.suffix.lower()):
            convert = convert.replace("FILE", str(path)).replace("OUT", str(path.with_suffix(".parquet")))
            raise DataError(f"{path.suffix} files are not read: {convert}", file=path)
        raise DataError(f"unsupported file type {what or '(none)'!r}: use .csv, .tsv, .jsonl, .json (each may be "
                        ".gz, .bz2 or .xz compressed), .parquet, .arrow, a folder of them or hf:org/name", file=path)
    if not path.is_file():
        raise DataError("file not found", file=path)
    if path.stat().st_size == 0:
        raise DataError("the file is empty", file=path)
    return Source(source, path, builder, split, rename)


def hash_input(src: Source) -> str:
    """sha256 of the input bytes (as stored); text formats are checked to be UTF-8 on the same pass, or on
    a second, decompressing pass when the file is compressed."""
    h = hashlib.sha256()
    compressed = compression_of(src.path) is not None
    decoder = codecs.getincrementaldecoder("utf-8")() if src.builder not in _BINARY else None
    try:
        with open(src.path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                if decoder is not None and not compressed:
                    decoder.decode(block)
        if decoder is not None and compressed:
            with open_input(src.path, "rb") as f:
                while block := f.read(1 << 20):
                    decoder.decode(block)
        if decoder is not None:
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"not valid UTF-8 text (line {_first_bad_line(src.path)}); re-save the file as UTF-8",
                        file=src.path) from None
    except READ_ERRORS as e:
        failure = decompress_failure(src.path, e) or f"cannot read file: {getattr(e, 'strerror', None) or e}"
        raise DataError(failure, file=src.path) from None
    return h.hexdigest()


def _first_bad_line(path: Path) -> int:
    with open_input(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _duplicated_columns(src: Source) -> list[str]:
    """Column names the file holds more than once. pandas would read them as m, m.1 and the JSON readers
    keep one of them, so they are looked up in the raw header (CSV), schema (parquet) or first record (JSON)."""
    names: list[str] = []
    try:
        if src.builder == "csv":
            import csv

            with open_input(src.path, newline="") as f:
                names = next(csv.reader(f, delimiter=_separator(src.path)), [])
        elif src.builder == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(src.path).names
        elif src.builder == "json":
            with open_input(src.path) as f:
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
def load_table(src: Source) -> Iterator[tuple[pa.Table, str]]:
    """Yield the input as a memory-mapped Arrow table (and a fingerprint); temporary caches are removed after."""
    import datasets

    datasets.disable_progress_bars()
    # Read failures become one DataError line; `datasets` would log its own line about them first.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if src.path is None:
        try:
            ds = datasets.load_dataset(src.builder, split=src.split)
        except Exception as e:  # network, unknown id, unknown split: all are "cannot read"
            retries = "" if datasets.config.HF_HUB_OFFLINE else " (HF_HUB_OFFLINE=1 skips the retries)"
            offline = (f"; without the network only a dataset already in the local `datasets` cache loads{retries}, "
                       "or pass a downloaded file instead" if isinstance(e, ConnectionError) else "")
            raise DataError(f"cannot load hub dataset split {src.split!r}: {e}{offline}", file=src.text) from None
        yield _renamed(arrow_table(ds), src), ds._fingerprint
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
    text_columns = _source_names(_TEXT_COLUMNS, src.rename)  # as the file names them
    try:
        kwargs = {}
        if src.builder == "csv":
            # Every column as text, then typed over the whole column below: pandas infers types per
            # 10k-row chunk, which fails when a later chunk differs (ints, then a 0.5), and its
            # default NA strings would turn a prompt like "None" into a missing value.
            import pandas as pd

            sep = _separator(src.path)
            try:
                head = pd.read_csv(src.path, nrows=1, encoding="utf-8", dtype=str, sep=sep)
            except Exception as e:
                raise DataError(f"cannot read the CSV header: {e}", file=src.path) from None
            if head.empty:
                raise DataError("the file has a header but no rows", file=src.path)
            header = list(head.columns)
            other = next((o for o in (",", ";", "\t") if o != sep and len(header) == 1 and o in header[0]), None)
            if other:
                # A ';' file is refused rather than guessed: such exports often write decimal commas (0,5).
                how = {"\t": "name it .tsv", ",": "name it .csv"}.get(other, "re-save it with commas")
                raise DataError(f"the header is one column, {header[0]!r}: the file looks {other!r}-separated; "
                                f"prerouter reads comma-separated .csv and tab-separated .tsv ({how}, or save it "
                                "as .jsonl/.parquet)", file=src.path)
            kwargs = dict(features=datasets.Features({c: datasets.Value("string") for c in header}),
                          keep_default_na=False, na_values=[""], sep=sep)
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
        table = arrow_table(ds)
        if src.builder == "json":
            table = _exact_json_text(table, Path(data_file), text_columns)
        if src.builder == "csv":
            table = pa.table({c: table.column(c) if c in text_columns else _infer_type(table.column(c))
                              for c in table.column_names})
        yield _renamed(table, src), ""
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _source_names(names, rename: dict[str, str]) -> tuple[str, ...]:
    """The file's names of the layout's columns `names`, given the user's `rename` ({old: new})."""
    return tuple(old for old, new in rename.items() if new in names) + tuple(n for n in names if n not in rename)


def _renamed(table: pa.Table, src: Source) -> pa.Table:
    """`table` with the user's `--rename` applied; a column it names that is not there, or a new name that is
    already taken, is a DataError listing the columns."""
    if not src.rename:
        return table
    columns = table.column_names
    listed = f"(columns: {', '.join(columns)})"
    for old, new in src.rename.items():
        if old not in columns:
            raise DataError(f"--rename {old}={new}: there is no column {old!r} {listed}", file=src.path or src.text)
        if new in columns and new not in src.rename:
            raise DataError(f"--rename {old}={new}: the file already has a column {new!r}; rename that one too "
                            f"{listed}", file=src.path or src.text)
    return table.rename_columns([src.rename.get(c, c) for c in columns])


def _exact_json_text(table: pa.Table, data_file: Path, text_columns: tuple[str, ...]) -> pa.Table:
    """`datasets` keeps a JSON column of mixed types JSON-encoded (`arrow.json`), but stores a string that
    parses as JSON unchanged: the prompt "0" comes back as the number 0, "[1, 2]" as a list. Text columns
    of that kind (`text_columns`, as the file names them) are read again from the file, every value encoded,
    so strings stay strings."""
    mixed = [c for c in text_columns if c in table.column_names and is_json_ext(table.column(c).type)]
    if not mixed:
        return table
    values: dict[str, list] = {c: [] for c in mixed}
    try:
        with open_input(data_file) as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                for c in mixed:
                    v = record.get(c) if isinstance(record, dict) else None
                    values[c].append(None if v is None else json.dumps(v))
    except (OSError, UnicodeDecodeError, ValueError):
        return table  # not one record per line: keep what `datasets` read
    if any(len(v) != table.num_rows for v in values.values()):
        return table
    for c in mixed:
        table = table.set_column(table.column_names.index(c), c, pa.array(values[c], table.column(c).type))
    return table


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
    if not holds_json_array(path):
        return None
    try:
        with open_input(path) as f:
            records = json.loads(f.read())
    except ValueError:
        return None  # `datasets` fails on it too and the error names the line
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return None
    out = folder / f"{default_name(str(path))}.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return out


def _no_records(src: Source) -> bool:
    """A parquet file of zero rows or JSON without records (`datasets` fails on them with obscure errors)."""
    try:
        if src.builder == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(src.path).metadata.num_rows == 0
        if src.builder == "json":
            with open_input(src.path) as f:
                text = f.read().strip()
            return not text or (text.startswith("[") and json.loads(text) == [])
    except Exception:  # unreadable for another reason: the caller reports the original error
        pass
    return False


def _first_bad_json_line(path: Path) -> Optional[int]:
    """Line of the first JSON syntax error (whole-document JSON or JSON lines), for the message."""
    with open_input(path) as f:
        text = f.read()
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
