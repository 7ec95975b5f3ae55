"""Where each image's bytes are: a file and a byte range, inside a tar or not. Archives are indexed, never
extracted: a worker reads an image with one ``os.pread`` from the archive itself.

Listing a tar reads its headers only (tarfile seeks past the data); a tar inside a tar (the train archive's
class tars) is listed through a window onto the outer file. Members that are not regular files (links,
directories, devices) are reported, never followed, and nothing is ever written under a member's name.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dsimagenet.errors import DSImageNetError

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class SourceError(DSImageNetError, ValueError):
    """A source that is not what it should be; the message names the path and what was expected."""


@dataclass(frozen=True, order=True)
class Record:
    key: str  # sort key and name in messages, e.g. "n01440764/n01440764_10026.JPEG"
    label: int  # 1-based
    path: str  # the file to read from (an archive or the image itself)
    offset: int  # where the image's bytes start in ``path``; a parquet record: its row in row group ``group``
    size: int  # bytes; a parquet record: 0 (its bytes are known only once its row group is read)
    group: int = -1  # a parquet row group (sources/hub.py), or -1: a byte range read with one pread
    where: str = field(default="", compare=False)  # where a Hub image is (shard and row/member), for messages


@dataclass
class Listing:
    """The images of one split, sorted by key, with what was set aside and why."""

    records: list[Record]
    wnids: list[str]  # class names in label order (label k is wnids[k - 1])
    imagenet: bool  # labels are ILSVRC-2012 devkit IDs
    problems: list[tuple[str, str]] = field(default_factory=list)  # bad entries: an error unless --skip-bad
    ignored: list[tuple[str, str]] = field(default_factory=list)  # not images by name: listed, not read
    layout: str | None = None  # a Hub layout: what the source is, for the manifest (sources/hub.py)
    in_file_order: bool = False  # read in (file, group, row) order: a parquet row group is read once, whole


class Window:
    """A read-only file object over ``size`` bytes of ``f`` from ``base`` (a tar inside a tar)."""

    def __init__(self, f, base: int, size: int):
        self.f, self.base, self.size, self.pos = f, base, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        self.f.seek(self.base + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True


# Magic numbers of the compressions a tar may come in: records are byte ranges of an uncompressed tar.
_COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ\x00": ("xz", "unxz"),
               b"\x28\xb5\x2f\xfd": ("zstd", "unzstd")}


def tar_members(f, where: str, base: int = 0, limit: int | None = None) -> Iterator[tuple[tarfile.TarInfo, int]]:
    """(member, absolute offset of its data) for every member of the tar in ``f`` at ``base``; raises
    SourceError if a member's data runs past the end (a tar cut in the middle of a member), or if the file is
    empty, compressed or no tar at all."""
    end = limit if limit is not None else os.fstat(f.fileno()).st_size
    fobj = Window(f, base, end - base) if base or limit is not None else f
    if end - base == 0:
        raise SourceError(f"{where}: an empty file (0 bytes), not a tar: the download or copy did not finish")
    head = os.pread(f.fileno(), 8, base)
    for magic, (kind, tool) in _COMPRESSED.items():
        if head.startswith(magic):
            raise SourceError(f"{where}: a {kind}-compressed file; images are read in place from an "
                              f"uncompressed tar: decompress it first ({tool})")
    try:
        tf = tarfile.open(fileobj=fobj, mode="r:")
        for m in tf:
            if m.isfile() and base + m.offset_data + m.size > end:
                raise SourceError(f"{where}: cut short: member {printable(m.name)} needs {m.size:,} bytes at "
                                  f"{base + m.offset_data:,}, the file ends at {end:,}")
            yield m, base + m.offset_data
    except (tarfile.TarError, EOFError, UnicodeError) as e:
        raise SourceError(f"{where}: not a readable tar file: {e}") from None


def printable(name: str) -> str:
    """A file name fit for a message, a manifest and a key: a name that is not UTF-8 comes from the OS (and from
    tarfile) with surrogate escapes, which cannot be encoded; they become backslash escapes (b'\\xff' -> \\xff)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_problem(name: str) -> str | None:
    """Why a file name cannot be used as an image's key, or None."""
    if printable(name) != name:
        return "its name is not valid UTF-8 (rename it)"
    return None


def drop_duplicate_keys(listing: Listing) -> None:
    """Two members of one archive under the same name (extracting it would keep only the last): which one is
    the image is not known, so every copy is a problem, and the records stay sorted."""
    counts = Counter(r.key for r in listing.records)
    dups = {k for k, n in counts.items() if n > 1}
    if not dups:
        return
    for r in listing.records:
        if r.key in dups:
            listing.problems.append((f"{r.path}:{r.key}", f"{counts[r.key]} members with this name in the archive"))
    listing.records = [r for r in listing.records if r.key not in dups]


def member_problem(m: tarfile.TarInfo) -> str | None:
    if m.issym() or m.islnk():  # inside an archive a link is an attack, never a subset: not followed
        return f"a link to {printable(m.linkname)!r} (links inside archives are not followed)"
    if not m.isfile():
        return "not a regular file"
    name = m.name
    if name.startswith("/") or ".." in Path(name).parts:
        return "an absolute or '..' path"
    return name_problem(name)


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


class OpenFiles:
    """The source files one worker reads images from, kept open for the records that follow (a tar's members
    share one file) but never more than ``limit`` at once, the least recently used closed first: an extracted
    ImageNet folder holds 1.28 million files, and a process may hold only ``ulimit -n`` of them (often 1024)."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.fds: OrderedDict[str, int] = OrderedDict()

    def fd(self, path: str) -> int:
        fd = self.fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            while len(self.fds) >= self.limit:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[path] = fd  # now the most recently used
        return fd

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])


def read_record(r: Record, files: OpenFiles) -> bytes:
    """The bytes of one image, read through ``files`` (one per worker)."""
    if r.group >= 0:  # compressed parquet pages: read through pyarrow, a row group at a time
        from dsimagenet.sources.hub import read_parquet_image

        return read_parquet_image(r)
    data = os.pread(files.fd(r.path), r.size, r.offset)
    if len(data) != r.size:
        raise OSError(f"read {len(data)} of {r.size} bytes: the file was cut short or changed")
    return data
