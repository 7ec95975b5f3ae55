"""A pickle reader that builds only what an official batch file holds, and never more than the file's bytes.

The official files are pickles of ``{'data': uint8 array, 'labels': list of ints, 'mean': float64 array}``
written by Python 2's cPickle (protocol 2, bytes as latin-1 text through ``_codecs.encode``) or by Python 3 with
NumPy 1.x or 2.x (protocols 2 to 5). ``load_pickle`` runs a small pickle machine that knows exactly those opcodes
and numpy callables (each named where it is handled), builds the arrays itself from the bytes in the file, and
refuses everything else with the construct's name and its byte offset. What it may build beyond the file's own
bytes (every object an opcode makes: dicts, lists, tuples, ints, stack slots, memo entries, copies) is
charged at its size in memory and bounded by ``_BUDGET_PER_BYTE`` times the bytes read.

    with open("val_data", "rb") as f:
        batch = safe_load(f, "val_data")      # a dict of numpy arrays and lists, or FormatError
"""

from __future__ import annotations

import io
import math
import pickle
import re
import struct
import zipfile
import zlib
from typing import IO

import numpy as np

from dsimagenet.errors import FormatError

_CHUNK = 1 << 16  # stream reads; payloads larger than this go straight into their array
_BIG_READ = 1 << 24
# What a pickle may build beyond its own bytes, per byte read (+ _BUDGET_BASE). The densest legitimate content
# known, labels written as list(labels_array) (numpy int64 scalars, each memoized, with its argument tuple)
# under protocol 4 and before the images, is charged 13.5x its bytes: 16x refused it after 420 KB.
_BUDGET_PER_BYTE = 32
_BUDGET_BASE = 1 << 20
_MAX_ARRAY_BYTES = 1 << 62  # numpy refuses an array (even an empty one) whose dimensions multiply past this

# What each opcode makes beyond its own bytes, in bytes of memory (64-bit CPython: a stack slot 8, an int 28,
# a float 24, an empty dict 64, an empty list 56, a tuple 40 + 8 a slot). Charged as it runs, so that a file
# of one-byte opcodes that each make an object (EMPTY_DICT, TUPLE1 chains, MARK) is bounded like the rest:
# 20 MB of EMPTY_DICT held 1.4 GB before this. Opcodes that read a payload or build arrays charge in
# their handlers; small ints (BININT1) and shared objects (None, True, False, (), globals) cost a slot.
_COST = [0] * 256
for _op, _cost in {0x7D: 72, 0x5D: 64, 0x29: 8, 0x85: 56, 0x86: 64, 0x87: 72, 0x28: 40, 0x4B: 8, 0x4D: 36,
                   0x4A: 36, 0x8A: 36, 0x4E: 8, 0x88: 8, 0x89: 8, 0x47: 32, 0x68: 8, 0x6A: 8, 0x63: 8,
                   0x93: 8}.items():
    _COST[_op] = _cost


_PAYLOAD_OPS = frozenset((0x58, 0x8C, 0x8D, 0x43, 0x42, 0x8E, 0x96, 0x55, 0x54))
_CONTROL_OPS = frozenset((0x63, 0x93, 0x52, 0x62, 0x80, 0x95, 0x97, 0x98))


class Refused(Exception):
    """A pickle construct the reader does not accept; the message says which and why."""


# --- reading a stream: never more than it holds, zip and zlib failures as FormatError -------------------------

class Stream:
    """Reads ``f`` through a small buffer; ``size`` is how many bytes it holds from here (None: unknown).
    Payloads are checked against ``size`` before anything is allocated for them, and never is more read from
    ``f`` than ``size``."""

    def __init__(self, f: IO[bytes], where: str, size: int | None):
        self.f, self.where, self.size = f, where, size
        self.buf, self.pos, self.got = b"", 0, 0  # self.got: bytes taken from f so far

    def _raw(self, n: int) -> bytes:
        if self.size is not None:
            n = min(n, self.size - self.got)
            if n <= 0:
                return b""
        data = self._call(self.f.read, n)
        self.got += len(data)
        return data

    def _raw_into(self, view: memoryview) -> int:
        """Read straight into ``view`` (an array being filled): no bytes object of the payload's size beside it."""
        if self.size is not None:
            view = view[: max(0, self.size - self.got)]
            if not len(view):
                return 0
        readinto = getattr(self.f, "readinto", None)
        if readinto is None:
            data = self._call(self.f.read, len(view))
            view[: len(data)] = data
            n = len(data)
        else:
            n = self._call(readinto, view) or 0
        self.got += n
        return n

    def _call(self, fn, arg):
        try:
            return fn(arg)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # bad CRC, damaged deflate data, cut short
            raise FormatError(f"{self.where}: damaged zip member: {e or type(e).__name__}") from None
        except OSError as e:  # inside a zip, a seek its damaged offsets ask for
            if not isinstance(self.f, zipfile.ZipExtFile):
                raise
            raise FormatError(f"{self.where}: damaged zip member: {e}") from None

    def offset(self) -> int:
        return self.got - (len(self.buf) - self.pos)

    def remaining(self) -> int | None:
        return None if self.size is None else self.size - self.offset()

    def _fill(self, n: int) -> bool:
        """At least n bytes in the buffer from self.pos, unless the stream ends first (False)."""
        parts = [self.buf[self.pos:]]
        have = len(parts[0])
        while have < n:
            data = self._raw(max(n - have, _CHUNK))
            if not data:
                break
            parts.append(data)
            have += len(data)
        self.buf, self.pos = b"".join(parts), 0
        return have >= n

    def peek(self, n: int) -> bytes:
        if len(self.buf) - self.pos < n:
            self._fill(n)
        return self.buf[self.pos: self.pos + n]

    def read(self, n: int) -> bytes:
        p = self.pos
        if p + n <= len(self.buf):
            self.pos = p + n
            return self.buf[p: p + n]
        if not self._fill(n):
            raise Refused(f"the file ends {n - len(self.buf):,} bytes early (truncated)")
        self.pos = n
        return self.buf[:n]

    def byte(self) -> int:
        p = self.pos
        if p < len(self.buf):
            self.pos = p + 1
            return self.buf[p]
        return self.read(1)[0]

    def ints(self) -> list[int]:
        """The values of consecutive BININT1/BININT2/BININT opcodes in the buffer (a list's items between
        MARK and APPENDS, 1000 at a time): the same as running them one by one, several times faster."""
        buf, p, end, out = self.buf, self.pos, len(self.buf) - 5, []
        while p < end:
            op = buf[p]
            if op == 0x4B:
                out.append(buf[p + 1])
                p += 2
            elif op == 0x4D:
                out.append(buf[p + 1] | buf[p + 2] << 8)
                p += 3
            elif op == 0x4A:
                out.append(int.from_bytes(buf[p + 1: p + 5], "little", signed=True))
                p += 5
            else:
                break
        self.pos = p
        return out

    def line(self, limit: int = 256) -> bytes:
        """Up to a newline (GLOBAL's module and name), at most ``limit`` bytes."""
        out = bytearray()
        while (b := self.byte()) != 10:
            out.append(b)
            if len(out) > limit:
                raise Refused(f"a GLOBAL name longer than {limit} bytes")
        return bytes(out)

    def payload(self, n: int) -> bytes | np.ndarray:
        """n bytes: small ones as bytes, large ones read straight into a uint8 array (no copy, and memory is
        touched only as the bytes really arrive)."""
        left = self.remaining()
        if left is not None and n > left:
            raise Refused(f"a payload of {n:,} bytes, but only {left:,} bytes are left in the file "
                           "(truncated or damaged)")
        if n <= _CHUNK:
            return self.read(n)
        have = self.buf[self.pos: self.pos + n]
        self.pos += len(have)
        if len(have) == n:
            return np.frombuffer(have, np.uint8).copy()
        if left is None:  # size unknown: grow with what arrives
            parts, got = [np.frombuffer(have, np.uint8)], len(have)
            while got < n:
                data = self._raw(min(n - got, _BIG_READ))
                if not data:
                    raise Refused(f"a payload of {n:,} bytes, but the file ends after {got:,} (truncated)")
                parts.append(np.frombuffer(data, np.uint8))
                got += len(data)
            return np.concatenate(parts)
        out = np.empty(n, np.uint8)  # untouched until read into: costs only what arrives
        view = memoryview(out)
        view[: len(have)] = have
        got = len(have)
        while got < n:
            k = self._raw_into(view[got: min(n, got + _BIG_READ)])
            if not k:
                raise Refused(f"a payload of {n:,} bytes, but the file ends after {got:,} (truncated)")
            got += k
        return out

    def at_end(self) -> bool:
        """True when nothing follows (reading to the end also makes a zip member check its CRC)."""
        if self.pos < len(self.buf):
            return False
        return not self._raw(1)  # with a known size, reading it all made a zip member check its CRC

    def slurp(self) -> _BufferFile:
        """The rest of the stream in memory as a seekable file (an npz inside a zip): never more than the
        stream holds, memory touched only as the bytes arrive."""
        left = self.remaining()
        if left is not None:
            data = self.payload(left)
        else:
            parts = [np.frombuffer(self.buf[self.pos:], np.uint8)]
            self.pos = len(self.buf)
            while chunk := self._raw(_BIG_READ):
                parts.append(np.frombuffer(chunk, np.uint8))
            data = np.concatenate(parts)
        return _BufferFile(memoryview(data).cast("B"))


class _BufferFile(io.RawIOBase):
    """A read-only seekable file over a buffer, without the copy io.BytesIO makes."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self.buf) - self.pos))
        b[:n] = self.buf[self.pos: self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.buf)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


# --- the pickle machine ------------------------------------------------------------------------------------

class _Global:
    """A callable a pickle may name; the machine implements each one itself."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_RECONSTRUCT, _NDARRAY, _DTYPE = _Global("_reconstruct"), _Global("numpy.ndarray"), _Global("numpy.dtype")
_SCALAR, _FROMBUFFER = _Global("scalar"), _Global("_frombuffer")
_ENCODE, _BYTES = _Global("_codecs.encode"), _Global("bytes")

_GLOBALS = {
    # ndarray.__reduce__: _reconstruct(ndarray, (0,), b"b") then BUILD (1, shape, dtype, fortran, raw bytes).
    # NumPy 1.x names numpy.core (every NumPy reads it), NumPy 2.x numpy._core.
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    # dtype.__reduce__: dtype("u1", False, True) then BUILD (3, byteorder, None, None, None, -1, -1, 0)
    ("numpy", "dtype"): _DTYPE,
    # a numpy scalar (labels written as list(array) hold np.int64): scalar(dtype, raw bytes)
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    # protocol 5: _frombuffer(in-band buffer, dtype, shape, order)
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    # protocol 2 written by Python 3 stores bytes as _codecs.encode(latin-1 text, "latin1"), b"" as bytes()
    ("_codecs", "encode"): _ENCODE,
    ("__builtin__", "bytes"): _BYTES,
    ("builtins", "bytes"): _BYTES,
}
_DTYPE_CODES = re.compile(r"^(b1|[iu][1248]|f[248])$")  # bool, ints, floats: nothing that holds objects
_SCALAR_TYPES = (int, float, bool, str, bytes, type(None), np.generic)


class _PendingDtype:
    """dtype(code, ...) before its BUILD gives the byte order."""

    def __init__(self, code: str):
        self.code, self.dtype = code, None


class _PendingArray:
    """_reconstruct(ndarray, (0,), b"b") before its BUILD gives it shape, dtype and bytes. Nothing is allocated
    here: an array never given its state is refused, never handed out as uninitialised memory."""

    def __init__(self):
        self.array = None


class _Blob:
    """A large bytes payload, read straight into a uint8 array."""

    def __init__(self, a: np.ndarray):
        self.a = a


def _int(v) -> bool:
    return type(v) is int


class _Unpickler:
    def __init__(self, stream: Stream):
        self.s = stream
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.built = 0  # what was built beyond the bytes read (list slots, memo entries, copies)
        self.allowed = _BUDGET_BASE  # the budget when last computed

    def charge(self, n: int, what: str) -> None:
        self.built += n
        if self.built <= self.allowed:  # within what was allowed when last computed: the file only grows
            return
        self.allowed = allowed = _BUDGET_PER_BYTE * self.s.offset() + _BUDGET_BASE
        if self.built > allowed:
            raise Refused(f"{what} would build more than {_BUDGET_PER_BYTE}x the bytes read so far "
                           f"({self.built:,} > {allowed:,}): the file amplifies itself")

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise Refused("an opcode takes a value from an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise Refused("an opcode needs a MARK that is not there")
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    def top(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise Refused("an opcode works on an empty stack")
        return self.stack[-1]

    def load(self):
        s, st = self.s, self.stack
        if s.peek(1) != b"\x80":
            raise Refused("not a binary pickle of protocol 2 to 5 (the official files are protocol 2 or 3)")
        while True:
            op = s.byte()
            self.built += _COST[op]
            if self.built > self.allowed:
                self.charge(0, f"opcode {_opname(op)}")
            if op == 0x4B:  # BININT1
                st.append(s.byte())
            elif op == 0x4D:  # BININT2
                st.append(int.from_bytes(s.read(2), "little"))
            elif op == 0x4A:  # BININT
                st.append(int.from_bytes(s.read(4), "little", signed=True))
            elif op == 0x8A:  # LONG1 (Python 2 longs, ints beyond 32 bits)
                n = s.byte()
                self.charge(n, "a long int")
                st.append(int.from_bytes(s.read(n), "little", signed=True))
            elif op == 0x65:  # APPENDS
                items = self.pop_mark()
                self.append(items)
            elif op == 0x61:  # APPEND
                v = self.pop()
                self.append([v])
            elif op == 0x28:  # MARK
                self.marks.append(len(st))
                items = s.ints()
                self.charge(36 * len(items), "a run of ints")
                st.extend(items)
            elif op in (0x71, 0x72, 0x94):  # BINPUT, LONG_BINPUT, MEMOIZE
                idx = (s.byte() if op == 0x71 else int.from_bytes(s.read(4), "little") if op == 0x72
                       else len(self.memo))
                if idx not in self.memo:
                    self.charge(64, "the memo")
                self.memo[idx] = self.top()
            elif op in (0x68, 0x6A):  # BINGET, LONG_BINGET: a reference, never a copy
                idx = s.byte() if op == 0x68 else int.from_bytes(s.read(4), "little")
                if idx not in self.memo:
                    raise Refused(f"memo entry {idx} is read but was never stored")
                st.append(self.memo[idx])
            elif op in _PAYLOAD_OPS:  # text and bytes: a length, then that many bytes
                self.load_payload(op)
            elif op == 0x7D:  # EMPTY_DICT
                st.append({})
            elif op == 0x5D:  # EMPTY_LIST
                st.append([])
            elif op == 0x29:  # EMPTY_TUPLE
                st.append(())
            elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                k = op - 0x84
                if len(st) - (self.marks[-1] if self.marks else 0) < k:
                    raise Refused(f"TUPLE{k} on a stack of fewer than {k} values")
                t = tuple(st[-k:])
                del st[-k:]
                st.append(t)
            elif op == 0x74:  # TUPLE
                items = self.pop_mark()
                self.charge(40 + 8 * len(items), "a tuple")
                st.append(tuple(items))
            elif op in (0x73, 0x75):  # SETITEM, SETITEMS
                items = self.pop_mark() if op == 0x75 else [None, self.pop()]
                if op == 0x73:
                    items[0] = self.pop()
                self.setitems(items)
            elif op == 0x4E:  # NONE
                st.append(None)
            elif op in (0x88, 0x89):  # NEWTRUE, NEWFALSE
                st.append(op == 0x88)
            elif op == 0x47:  # BINFLOAT
                st.append(struct.unpack(">d", s.read(8))[0])
            elif op in _CONTROL_OPS:  # globals, calls, protocol and frames
                self.load_control(op)
            elif op == 0x30:  # POP
                self.pop()
            elif op == 0x31:  # POP_MARK
                self.pop_mark()
            elif op == 0x2E:  # STOP
                return self.stop()
            else:
                raise Refused(f"opcode {_opname(op)}: not written by the pickles this reads "
                               "(numpy arrays, lists of numbers, dicts)")

    def load_payload(self, op: int) -> None:
        """The opcodes of text and bytes: a length, then that many bytes (``Stream.payload`` bounds them)."""
        s, st = self.s, self.stack
        if op in (0x58, 0x8C, 0x8D):  # BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
            n = int.from_bytes(s.read({0x58: 4, 0x8C: 1, 0x8D: 8}[op]), "little")
            raw = s.payload(n)
            self.charge(n + 56, "a text string")
            try:
                st.append(str(raw, "utf-8", "surrogatepass"))
            except UnicodeDecodeError as e:
                raise Refused(f"BINUNICODE text that is not UTF-8: {e.reason}") from None
            del raw  # dropped as soon as its text exists (2.4 GB for a 64 px batch from protocol 2)
        elif op in (0x43, 0x42, 0x8E, 0x96):  # SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8 (in-band)
            n = int.from_bytes(s.read({0x43: 1, 0x42: 4, 0x8E: 8, 0x96: 8}[op]), "little")
            raw = s.payload(n)
            self.charge(40, "a bytes object")
            st.append(raw if isinstance(raw, bytes) else _Blob(raw))
            del raw
        elif op in (0x55, 0x54):  # SHORT_BINSTRING, BINSTRING: a Python 2 str, read as latin-1 text
            n = s.byte() if op == 0x55 else int.from_bytes(s.read(4), "little", signed=True)
            if n < 0:
                raise Refused(f"BINSTRING of negative length {n}")
            raw = s.payload(n)
            if isinstance(raw, bytes):
                self.charge(n + 56, "a Python 2 string")
                st.append(str(raw, "latin-1"))
            else:  # a large one is array data (numpy 1.x on Python 2): its bytes are latin-1, kept as read
                st.append(_Blob(raw))
            del raw

    def load_control(self, op: int) -> None:
        """The opcodes of globals, calls and the protocol: PROTO, FRAME, GLOBAL, STACK_GLOBAL, REDUCE, BUILD."""
        s, st = self.s, self.stack
        if op == 0x63:  # GLOBAL (protocols 2, 3)
            module, name = s.line(), s.line()
            st.append(self.find_global(module.decode("utf-8", "replace"), name.decode("utf-8", "replace")))
        elif op == 0x93:  # STACK_GLOBAL (protocols 4, 5)
            name, module = self.pop(), self.pop()
            if not (isinstance(module, str) and isinstance(name, str)):
                raise Refused("STACK_GLOBAL of something other than two strings")
            st.append(self.find_global(module, name))
        elif op == 0x52:  # REDUCE
            args, fn = self.pop(), self.pop()
            st.append(self.reduce(fn, args))
        elif op == 0x62:  # BUILD
            state = self.pop()
            self.build(self.top(), state)
        elif op == 0x80:  # PROTO
            v = s.byte()
            if s.offset() != 2 or not 2 <= v <= 5:
                raise Refused(f"PROTO {v} at byte {s.offset() - 2}: only protocols 2 to 5, stated first")
        elif op == 0x95:  # FRAME (protocol 4+): only a hint how much to buffer; its size must fit the file
            n = int.from_bytes(s.read(8), "little")
            left = s.remaining()
            if left is not None and n > left:
                raise Refused(f"a FRAME of {n:,} bytes, but only {left:,} bytes are left in the file")
        elif op in (0x97, 0x98):
            raise Refused("a protocol 5 out-of-band buffer (NEXT_BUFFER/READONLY_BUFFER): the data is not "
                           "in the file")

    def append(self, items: list) -> None:
        lst = self.top()
        if not isinstance(lst, list):
            raise Refused(f"APPEND(S) to a {type(lst).__name__}, not a list")
        for v in items:
            if not isinstance(v, _SCALAR_TYPES):  # no lists of lists: no memo-built amplification
                raise Refused(f"a {type(v).__name__} inside a list: lists hold numbers or strings only")
        self.charge(8 * len(items), "a list")
        lst.extend(items)

    def setitems(self, items: list) -> None:
        d = self.top()
        if not isinstance(d, dict) or len(items) % 2:
            raise Refused(f"SETITEM(S) on a {type(d).__name__}" if not isinstance(d, dict)
                           else "SETITEMS with a key and no value")
        self.charge(24 * len(items), "a dict")
        for k, v in zip(items[::2], items[1::2], strict=True):
            if not isinstance(k, str):
                raise Refused(f"a dict key of type {type(k).__name__}: keys are strings")
            d[k] = v

    def find_global(self, module: str, name: str) -> _Global:
        g = _GLOBALS.get((module, name))
        if g is None:
            raise Refused(f"refused to load {module}.{name}: not a numpy array or plain value")
        return g

    def reduce(self, fn, args):
        if not isinstance(args, tuple):
            raise Refused(f"REDUCE with arguments of type {type(args).__name__}")
        if fn is _RECONSTRUCT:
            if len(args) != 3 or args[0] is not _NDARRAY or args[1] != (0,) or args[2] not in (b"b", "b"):
                raise Refused(f"_reconstruct{short(args)}: only _reconstruct(ndarray, (0,), b'b') as numpy "
                               "writes it")
            self.charge(48, "an ndarray")
            return _PendingArray()
        if fn is _DTYPE:
            if (len(args) != 3 or not isinstance(args[0], str) or not _DTYPE_CODES.match(args[0])
                    or args[1] not in (False, 0) or args[2] not in (True, False, 0, 1)):
                raise Refused(f"dtype{short(args)}: only bool, integer and float dtypes")
            self.charge(48, "a dtype")
            return _PendingDtype(args[0])
        if fn is _SCALAR:
            if len(args) != 2:
                raise Refused(f"scalar{short(args)}")
            dtype, raw = self.dtype(args[0]), _as_buffer(args[1])
            if raw is None or len(raw) != dtype.itemsize:
                raise Refused(f"scalar of {dtype} with {short(args[1])}: not {dtype.itemsize} bytes")
            self.charge(32, "a numpy scalar")
            return np.frombuffer(raw, dtype)[0]
        if fn is _FROMBUFFER:
            if len(args) != 4 or args[3] not in ("C", "F"):
                raise Refused(f"_frombuffer{short(args)}")
            return self.array(args[0], self.dtype(args[1]), args[2], args[3])
        if fn is _ENCODE:
            if (len(args) != 2 or not isinstance(args[0], str)
                    or not isinstance(args[1], str) or args[1].lower() not in ("latin1", "latin-1")):
                raise Refused(f"_codecs.encode{short(args)}: only encode(text, 'latin1'), as protocol 2 "
                               "stores bytes")
            self.charge(len(args[0]) + 40, "_codecs.encode")
            return _latin1(args[0])
        if fn is _BYTES:
            if args != ():
                raise Refused(f"bytes{short(args)}: only bytes() (protocol 2's empty bytes)")
            return b""
        raise Refused(f"calling {fn!r}: {'would allocate an array of any claimed size' if fn is _NDARRAY else ''}"
                       if isinstance(fn, _Global) else f"REDUCE on a {type(fn).__name__}: not callable")

    def dtype(self, d) -> np.dtype:
        if isinstance(d, _PendingDtype) and d.dtype is not None:
            return d.dtype
        raise Refused(f"{short(d)} where a dtype (given its BUILD) belongs")

    def array(self, raw, dtype: np.dtype, shape, order: str) -> np.ndarray:
        if (not isinstance(shape, tuple) or len(shape) > 32
                or not all(_int(x) and x >= 0 for x in shape)):
            raise Refused(f"an array shape {short(shape)}: not a tuple of sizes")
        if isinstance(raw, list):
            raise Refused("an object array (its items pickled one by one): only numeric arrays")
        buf = _as_buffer(raw)
        if buf is None:
            raise Refused(f"array data of type {type(raw).__name__}")
        problem = shape_problem(shape, dtype.itemsize)
        if problem:
            raise Refused(problem)
        nbytes = math.prod(shape) * dtype.itemsize
        if len(buf) != nbytes:
            raise Refused(f"an array of shape {shape} {dtype} ({nbytes:,} bytes) with {len(buf):,} bytes of data")
        if isinstance(raw, _Blob):  # a large payload read into its own array: a view, no copy
            flat = raw.a.view(dtype)
        else:
            self.charge(nbytes, "an array copy")
            flat = np.frombuffer(buf, dtype).copy()
        return flat.reshape(shape, order=order)

    def build(self, obj, state) -> None:
        if isinstance(obj, _PendingDtype) and obj.dtype is None:
            ok = (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                  and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
                  and (len(state) == 8 or state[8] in (None, {})))
            if not ok:
                raise Refused(f"dtype state {short(state)}: only plain dtypes (no fields, no subarrays)")
            dt = np.dtype(obj.code)
            obj.dtype = dt.newbyteorder(state[1]) if state[1] in "<>" and dt.itemsize > 1 else dt
        elif isinstance(obj, _PendingArray) and obj.array is None:
            if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
                state = state[1:]  # version 1; older numpy wrote the 4-tuple
            if not isinstance(state, tuple) or len(state) != 4 or state[2] not in (True, False, 0, 1):
                raise Refused(f"ndarray state {short(state)}")
            shape, dtype, fortran, raw = state
            obj.array = self.array(raw, self.dtype(dtype), shape, "F" if fortran else "C")
        else:
            raise Refused(f"BUILD on {short(obj)}: only numpy arrays and dtypes get a state")

    def stop(self):
        if not self.stack:
            raise Refused("STOP on an empty stack")
        top = self.stack[-1]
        if not isinstance(top, dict):
            raise Refused(f"the file holds a {type(top).__name__}, not a dict")
        out = {}
        for k, v in top.items():
            if isinstance(v, _PendingArray):
                if v.array is None:
                    raise Refused(f"'{k}' is an ndarray that was never given its state (no BUILD): its memory "
                                   "would be uninitialised")
                v = v.array
            elif isinstance(v, _Blob):
                v = v.a.tobytes()  # a large bytes value
            out[k] = v
        return out


def _as_buffer(raw):
    if isinstance(raw, bytes):
        return memoryview(raw)
    if isinstance(raw, _Blob):
        return memoryview(raw.a)
    if isinstance(raw, str):  # a Python 2 str (read as latin-1), as numpy 1.x on Python 2 wrote array data
        try:
            return memoryview(raw.encode("latin-1"))
        except UnicodeEncodeError:
            raise Refused("array data as text that is not latin-1") from None
    return None


def _latin1(text: str) -> bytes | _Blob:
    """``text.encode("latin-1")``, as protocol 2 stores bytes; a large one (array data) is encoded a chunk at a
    time into one uint8 array, so that it costs its size once more, not twice (bytes, then an array copy)."""
    try:
        if len(text) <= _CHUNK:
            return text.encode("latin-1")
        out = np.empty(len(text), np.uint8)
        for i in range(0, len(text), _BIG_READ):
            out[i: i + _BIG_READ] = np.frombuffer(text[i: i + _BIG_READ].encode("latin-1"), np.uint8)
        return _Blob(out)
    except UnicodeEncodeError:
        raise Refused("_codecs.encode of text that is not latin-1") from None


def shape_problem(shape: tuple, itemsize: int) -> str | None:
    """Why numpy cannot make an array of this shape (None when it can). A zero dimension makes an array of no
    bytes, but numpy still refuses (ValueError) one whose other dimensions multiply past its index type:
    (0, 2**63) or (0, 2**62, 2**62)."""
    if any(x < 0 for x in shape):
        return f"an array shape {short(shape)} with a negative size"
    if math.prod(max(x, 1) for x in shape) * max(itemsize, 1) >= _MAX_ARRAY_BYTES:
        return f"an array shape {short(shape)} whose sizes multiply past what numpy can index"
    return None


def short(v) -> str:
    """A description of ``v`` of at most 80 characters, at a cost bounded whatever ``v`` is: tuples may hold
    tuples (from memo references, each level doubling) and a full repr would take forever or recurse too
    deep."""
    text = _brief(v, 3)
    return text if len(text) <= 80 else text[:77] + "..."


def _brief(v, depth: int) -> str:
    if isinstance(v, _PendingArray):
        return "an ndarray"
    if isinstance(v, _PendingDtype):
        return f"dtype {v.code!r}"
    if isinstance(v, _Blob):
        return f"{len(v.a):,} bytes"
    if isinstance(v, (tuple, list)):
        ends = "()" if isinstance(v, tuple) else "[]"
        if depth == 0 and v:
            return f"{ends[0]}...{ends[1]}"
        inner = ", ".join(_brief(x, depth - 1) for x in v[:6]) + (", ..." if len(v) > 6 else "")
        return ends[0] + inner + ("," if isinstance(v, tuple) and len(v) == 1 else "") + ends[1]
    if isinstance(v, dict):
        return f"a dict of {len(v)} keys"
    if isinstance(v, np.ndarray):
        return f"an array {v.dtype} {v.shape}"
    if isinstance(v, (str, bytes)):
        return repr(v[:60]) + ("..." if len(v) > 60 else "")
    if isinstance(v, (int, float, bool, type(None), np.generic, _Global)):
        text = repr(v)  # ints are at most 255 bytes long (LONG1)
        return text if len(text) <= 80 else text[:77] + "..."
    return type(v).__name__


_OPNAMES = {v[0]: k for k, v in vars(pickle).items() if k.isupper() and isinstance(v, bytes) and len(v) == 1}


def _opname(op: int) -> str:
    return f"{_OPNAMES.get(op, 'unknown')} (0x{op:02x})"


def safe_load(fileobj: IO[bytes], where: str, size: int | None = None):
    """Unpickle an official batch file with ``_Unpickler``: numpy arrays, dtypes, lists of numbers, strings and
    a dict, nothing else; ``where`` names the file in errors."""
    return load_pickle(Stream(fileobj, where, size), where)


def load_pickle(s: Stream, where: str):
    try:
        out = _Unpickler(s).load()
        if not s.at_end():
            raise Refused("bytes after the pickle's STOP")
        return out
    except Refused as e:
        raise FormatError(f"{where}: {e} (pickle opcode at byte {s.offset():,})") from None
