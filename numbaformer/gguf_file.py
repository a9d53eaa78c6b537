"""Bounded, validated GGUF parsing -> metadata and memory-mapped tensor views.

The file is never trusted: every count, length and offset is checked with Python ints against the
bytes that are actually left before anything is read or allocated, so a 49-byte file that declares a
2^62-element array fails at once instead of hanging, and nested arrays cannot recurse without limit.
Errors are `GGUFError` with a one-line message naming the file, the field or tensor, what was expected
and what was found.

Layout (GGUF v2/v3, little-endian):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key | u32 value_type | value)
    n_tensors x (string name | u32 n_dims | n_dims x u64 ne | u32 ggml_type | u64 offset)
    padding to general.alignment | tensor data (offsets relative to here)
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .quants import GGML_TYPES


class GGUFError(ValueError):
    """A GGUF file (or its model content) is malformed or unsupported. The message is one line:
    control characters that came from the file (a key holding a newline) are escaped."""

    def __init__(self, msg: str):
        super().__init__(_escape(msg))


def _escape(s: str) -> str:
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def shown(s: str, limit: int = 80) -> str:
    """A string from the file (key, tensor name, value) as a message shows it: escaped, and cut
    at `limit` characters (a corrupt length can make a 'key' of the next 60 kB)."""
    s = _escape(s)
    return s if len(s) <= limit else f"{s[:limit]}...({len(s)} chars)"


GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_DEPTH = 4          # llama.cpp reads no nested arrays at all; allow a little, never recurse far
MAX_NAME_BYTES = 65535
MAX_KEY_BYTES = 65535
INT64_MAX = (1 << 63) - 1

# value type id -> (name, struct format or None for string/array, byte size)
VALUE_TYPES = {
    0: ("uint8", "<B", 1), 1: ("int8", "<b", 1), 2: ("uint16", "<H", 2), 3: ("int16", "<h", 2),
    4: ("uint32", "<I", 4), 5: ("int32", "<i", 4), 6: ("float32", "<f", 4), 7: ("bool", "<?", 1),
    8: ("string", None, 8), 9: ("array", None, 12), 10: ("uint64", "<Q", 8), 11: ("int64", "<q", 8),
    12: ("float64", "<d", 8),
}
_NP_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}
VT_STRING, VT_ARRAY = 8, 9
INT_VALUE_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
FLOAT_VALUE_TYPES = frozenset({6, 12})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header. `ne` is GGUF order (ne[0] = row length); `shape` is NumPy order."""

    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int          # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name


class _Reader:
    """A cursor over the mapped bytes that refuses to read past the end."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                            f"only {self.end - self.pos} left")

    def scalar(self, fmt: str, size: int, what: str):
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            raise self.fail(f"{what} length {n} exceeds the limit of {limit} bytes")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")


def _min_value_size(vtype: int) -> int:
    return VALUE_TYPES[vtype][2]


def _read_value(r: _Reader, vtype: int, key: str, depth: int = 0) -> Any:
    """One value of type vtype; `key` is the key as messages show it."""
    if vtype not in VALUE_TYPES:
        raise r.fail(f"key '{key}': unknown value type {vtype} (expected 0..12)")
    if vtype == VT_STRING:
        return r.string(f"key '{key}' string value")
    if vtype != VT_ARRAY:
        _, fmt, size = VALUE_TYPES[vtype]
        return r.scalar(fmt, size, f"key '{key}' value")
    if depth >= MAX_ARRAY_DEPTH:
        raise r.fail(f"key '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
    sub = r.u32(f"key '{key}' array element type")
    if sub not in VALUE_TYPES:
        raise r.fail(f"key '{key}': unknown array element type {sub} (expected 0..12)")
    count = r.u64(f"key '{key}' array length")
    left = r.end - r.pos
    if count * _min_value_size(sub) > left:
        raise r.fail(f"key '{key}': array of {count} {VALUE_TYPES[sub][0]} needs at least "
                     f"{count * _min_value_size(sub)} bytes, only {left} left")
    if sub in _NP_DTYPES:
        dt = np.dtype(_NP_DTYPES[sub])
        arr = np.frombuffer(r.buf, dtype=dt, count=count, offset=r.pos).copy()
        r.pos += count * dt.itemsize
        return arr.astype(bool) if sub == 7 else arr
    if sub == VT_STRING:
        return [r.string(f"key '{key}' string element {i}") for i in range(count)]
    return [_read_value(r, VT_ARRAY, key, depth + 1) for _ in range(count)]


def _read_tensor_info(r: _Reader, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = r.string(f"tensor {index} name", MAX_NAME_BYTES)
    label = shown(name)
    n_dims = r.u32(f"tensor '{label}' n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise r.fail(f"tensor '{label}': n_dims must be 1..{MAX_DIMS}, got {n_dims}")
    ne = tuple(r.u64(f"tensor '{label}' dim {i}") for i in range(n_dims))
    ggml_type = r.u32(f"tensor '{label}' type")
    offset = r.u64(f"tensor '{label}' offset")
    return name, ne, ggml_type, offset


def _check_tensor(r: _Reader, name: str, ne: tuple[int, ...], ggml_type: int,
                  rel_offset: int, data_start: int, alignment: int) -> TensorInfo:
    """Bounds-check one tensor's dims, type, size and placement (Python ints throughout)."""
    label = shown(name)
    if ggml_type not in GGML_TYPES:
        raise r.fail(f"tensor '{label}': unknown ggml type {ggml_type}")
    n = 1
    for i, d in enumerate(ne):
        if d <= 0:
            raise r.fail(f"tensor '{label}': dim {i} must be > 0, got {d}")
        n *= d
        if n > INT64_MAX:
            raise r.fail(f"tensor '{label}': element count {'x'.join(map(str, ne))} "
                         f"overflows int64")
    t = GGML_TYPES[ggml_type]
    if ne[0] % t.block_size:
        raise r.fail(f"tensor '{label}': row length {ne[0]} is not a multiple of the "
                     f"{t.name} block size {t.block_size}")
    n_bytes = n // t.block_size * t.type_size
    if n_bytes > INT64_MAX:
        raise r.fail(f"tensor '{label}': byte size {n_bytes} overflows int64")
    if rel_offset % alignment:
        raise r.fail(f"tensor '{label}': data offset {rel_offset} is not a multiple of the "
                     f"alignment {alignment}")
    start = data_start + rel_offset
    if start + n_bytes > r.end:
        raise r.fail(f"tensor '{label}': data [{start}, {start + n_bytes}) runs past the end of "
                     f"the file ({r.end} bytes)")
    return TensorInfo(name, ne, ggml_type, start, n_bytes)


class GGUFFile:
    """A validated GGUF file: `metadata`, `value_types` and `tensors`, data memory-mapped.

    metadata values: int / float / bool / str; string arrays -> list[str]; numeric arrays -> 1-D
    numpy arrays; nested arrays -> lists. value_types[key] = (value type id, element type id or None).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):     # a FIFO would block open()
                raise GGUFError(f"{self.path}: not a regular file")
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise GGUFError(f"{self.path}: not a GGUF file (only {size} bytes)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read: {e.strerror or e}") from None
        view = memoryview(self._mm)
        try:
            self._parse(_Reader(view, self.path))
        except BaseException:
            view.release()          # else a traceback holding the reader keeps the map open
            self.close()
            raise
        view.release()

    def _parse(self, r: _Reader) -> None:
        magic = bytes(r.buf[:4])
        if magic != GGUF_MAGIC:
            raise r.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}")
        r.pos = 4
        self.version = r.u32("version")
        if self.version not in (2, 3):
            raise r.fail(f"unsupported GGUF version {self.version} (expected 2 or 3)")
        n_tensors, n_kv = r.u64("tensor count"), r.u64("metadata count")
        if n_kv * 13 > r.end - r.pos:        # key length + type + 1-byte value at least
            raise r.fail(f"metadata count {n_kv} cannot fit in the {r.end - r.pos} bytes left")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[int, int | None]] = {}
        for i in range(n_kv):
            self._read_kv(r, i)
        if n_tensors * 32 > r.end - r.pos:   # name length + n_dims + 1 dim + type + offset
            raise r.fail(f"tensor count {n_tensors} cannot fit in the {r.end - r.pos} bytes left")
        infos = [_read_tensor_info(r, i) for i in range(n_tensors)]
        self.alignment = self._alignment(r)
        self.data_offset = -(-r.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ggml_type, rel in infos:
            if name in self.tensors:
                raise r.fail(f"duplicate tensor name '{shown(name)}'")
            self.tensors[name] = _check_tensor(r, name, ne, ggml_type, rel, self.data_offset,
                                               self.alignment)
        _check_overlaps(r, self.tensors.values())

    def _read_kv(self, r: _Reader, index: int) -> None:
        key = r.string(f"metadata key {index}", MAX_KEY_BYTES)
        label = shown(key)
        if key in self.metadata:
            raise r.fail(f"duplicate metadata key '{label}'")
        vtype = r.u32(f"key '{label}' value type")
        start = r.pos
        value = _read_value(r, vtype, label)
        sub = None
        if vtype == VT_ARRAY:
            (sub,) = struct.unpack_from("<I", r.buf, start)
        self.metadata[key], self.value_types[key] = value, (vtype, sub)

    def _alignment(self, r: _Reader) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        a, (vt, _) = self.metadata["general.alignment"], self.value_types["general.alignment"]
        if vt not in INT_VALUE_TYPES:
            raise r.fail(f"key 'general.alignment': expected an integer, found "
                         f"{VALUE_TYPES[vt][0]}")
        if a <= 0 or a & (a - 1) or a > 1 << 20:
            raise r.fail(f"key 'general.alignment': expected a power of two <= 2^20, got {a}")
        return int(a)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name` as a read-only uint8 view of the mapped file."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=t.offset)

    def tensor_rows(self, name: str) -> np.ndarray:
        """Raw bytes shaped (n_rows, row_bytes): one row per ne[0] elements."""
        t = self.tensors[name]
        row_bytes = t.ne[0] // GGML_TYPES[t.ggml_type].block_size * GGML_TYPES[t.ggml_type].type_size
        return self.tensor_bytes(name).reshape(-1, row_bytes)

    @property
    def file_size(self) -> int:
        return len(self._mm)

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:     # numpy views still alive; the map closes when they go
                pass
            self._mm = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_overlaps(r: _Reader, infos) -> None:
    prev = None
    for t in sorted(infos, key=lambda t: t.offset):
        if prev is not None and t.offset < prev.offset + prev.n_bytes and t.n_bytes:
            raise r.fail(f"tensor '{shown(t.name)}' data at {t.offset} overlaps tensor "
                         f"'{shown(prev.name)}' "
                         f"[{prev.offset}, {prev.offset + prev.n_bytes})")
        prev = t


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and structurally validate a GGUF file (header, metadata, tensor table, data extents)."""
    return GGUFFile(path)
