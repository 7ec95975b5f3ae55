"""Checksums of files and of byte ranges in them, read in bounded chunks: the one loop every reader and writer
that records or checks a checksum uses (native arrays, the build's manifest, the archives' published MD5).

    digest(path)                                  # sha256 hex of the whole file
    digest(f, offset=128, nbytes=n)               # of n bytes from offset 128 of an open file
    for chunk in read_chunks(f, n, offset): ...   # the same chunks, for a pass that also does other work
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

CHUNK_BYTES = 16 << 20  # large enough that the per-call cost vanishes, small enough to stay in cache-sized RAM


def read_chunks(f: IO[bytes], nbytes: int | None = None, offset: int | None = None,
                chunk_bytes: int = CHUNK_BYTES, short: Callable[[str], Exception] | None = None) -> Iterator[bytes]:
    """The bytes of ``f`` from ``offset`` (default: where it is), ``nbytes`` of them (default: to the end), in
    chunks of at most ``chunk_bytes``. A file that ends before ``nbytes`` raises ``short(message)`` (default
    OSError): the caller chooses its format's error."""
    if offset is not None:
        f.seek(offset)
    left = nbytes
    while left is None or left > 0:
        chunk = f.read(chunk_bytes if left is None else min(chunk_bytes, left))
        if not chunk:
            if left is None:
                return
            raise (short or OSError)(f"{getattr(f, 'name', 'file')}: shorter than its header says")
        if left is not None:
            left -= len(chunk)
        yield chunk


def digest(file: str | Path | IO[bytes], algorithm: str = "sha256", offset: int | None = None,
           nbytes: int | None = None, short: Callable[[str], Exception] | None = None) -> str:
    """The hex digest of a file (a path, or an open binary file), or of ``nbytes`` from ``offset``."""
    h = hashlib.new(algorithm)
    if isinstance(file, str | Path):
        with open(file, "rb") as f:
            for chunk in read_chunks(f, nbytes, offset, short=short):
                h.update(chunk)
    else:
        for chunk in read_chunks(file, nbytes, offset, short=short):
            h.update(chunk)
    return h.hexdigest()


class HashingWriter:
    """A binary file wrapper that hashes what is written through it (a writer's checksum without reading the
    file back). Only ``write`` is offered: a writer that seeks (zipfile) cannot be hashed this way."""

    def __init__(self, f: IO[bytes], algorithm: str = "sha256"):
        self.f, self.h = f, hashlib.new(algorithm)

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()
