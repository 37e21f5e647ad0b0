"""Compressed text inputs (.gz, .bz2, .xz), read with the standard library alone: ingest reads its inputs
and the torch-free runtime (`prerouter score`, `calibrate`) its prompt files through `open_input`."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
from pathlib import Path

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# What a damaged or mislabelled stream raises while reading, besides an OSError without an errno (bz2's).
BAD_STREAM = (EOFError, gzip.BadGzipFile, lzma.LZMAError)


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


def is_bad_stream(e: BaseException) -> bool:
    """True for an error that says the compressed data is damaged (not that the file could not be read)."""
    return isinstance(e, BAD_STREAM) or (isinstance(e, OSError) and not e.errno)
