"""Compressed text inputs (.gz, .bz2, .xz), read with the standard library alone: ingest reads its inputs
and the torch-free runtime (`prerouter score`, `calibrate`) its prompt files through `open_input`, and
both tell one JSON array from JSON lines by `holds_json_array`."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
from pathlib import Path

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# What reading a file through `open_input` raises: OSError, or, for a damaged or mislabelled stream, one
# of the decompressors' own errors (bz2's is an OSError without an errno).
READ_ERRORS = (OSError, EOFError, lzma.LZMAError)


def compression_of(path: str | os.PathLike) -> str | None:
    """".gz", ".bz2" or ".xz" when the file name ends in one, else None."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in OPENERS else None


def without_compression(name: str) -> str:
    """The name with a compression suffix dropped: data.jsonl.gz → data.jsonl."""
    return name[:-len(compression_of(name))] if compression_of(name) else name


def open_input(path: str | os.PathLike, mode: str = "rt", **kwargs):
    """A file opened for reading, through its decompressor when its name says it is compressed; text
    modes read UTF-8 and skip a leading BOM."""
    opener = OPENERS.get(compression_of(path) or "", open)
    return opener(path, mode, **kwargs, **({} if "b" in mode else {"encoding": "utf-8-sig"}))


def decompress_failure(path: str | os.PathLike, e: BaseException) -> str | None:
    """"cannot decompress as .gz: ..." when `e`, raised reading `path`, says its compressed data is
    damaged; None for a plain file or an error of the file itself (that has an errno)."""
    suffix = compression_of(path)
    if suffix and not (isinstance(e, OSError) and e.errno):
        return f"cannot decompress as {suffix}: {e}"
    return None


def holds_json_array(path: str | os.PathLike) -> bool:
    """Whether the (possibly compressed) file starts with "[" after a BOM and blanks: one JSON array of
    records rather than JSON lines."""
    with open_input(path, "rb") as f:
        return f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
