"""Read GGUF files (llama.cpp's model format) with numpy alone, as untrusted input.

The format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all
little-endian: magic ``GGUF``, uint32 version (2 or 3), uint64 tensor count,
uint64 key/value count, the key/value pairs (a string key, a uint32 value type,
the value: a number, a bool, a string = uint64 length + UTF-8 bytes, or an
array = uint32 element type + uint64 count + elements), the tensor infos
(name, uint32 n_dims, n_dims uint64 dims, uint32 GGML type, uint64 offset),
padding to ``general.alignment`` (default 32), then the data section that
offsets are relative to.  Dims are ggml's ``ne``: ``ne[0]`` is the contiguous
axis, so the numpy shape is the dims reversed.

We own the reader for the same reasons as the safetensors one: the format is
small, the model layer depends on numpy only, and a downloaded file is
hostile until checked.  Every count, length and size is checked against the
bytes that remain *before* anything is allocated (so a header claiming 2**60
tensors fails at once), sizes are exact Python integers (no overflow), every
tensor must lie inside the data section, aligned, and no two may overlap
(llama.cpp's own reader requires the same); every failure is one
``WeightsError`` line naming the file.  Tensor data is memory-mapped: arrays
are read-only views of the file, never copies.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opswitch.core.errors import WeightsError
from opswitch.core.files import MappedFile, open_regular

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Everything before the data: GPT-2's header (50257 tokens, 50000 merges) is ~2 MB; the
# largest vocabularies (256k tokens) stay under 20 MB.  Arrays are bounded on their own,
# since each string costs Python ~50 bytes however short it is in the file.
MAX_HEADER_BYTES = 64 << 20
MAX_ARRAY = 1 << 22
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME, terminator included: names are at most 63 bytes

# GGML tensor types: id -> (name, elements per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22), 7: ("q5_1", 32, 24), 8: ("q8_0", 32, 34), 9: ("q8_1", 32, 40),
    10: ("q2_K", 256, 84), 11: ("q3_K", 256, 110), 12: ("q4_K", 256, 144), 13: ("q5_K", 256, 176),
    14: ("q6_K", 256, 210), 15: ("q8_K", 256, 292), 16: ("iq2_xxs", 256, 66), 17: ("iq2_xs", 256, 74),
    18: ("iq3_xxs", 256, 98), 19: ("iq1_s", 256, 50), 20: ("iq4_nl", 32, 18), 21: ("iq3_s", 256, 110),
    22: ("iq2_s", 256, 82), 23: ("iq4_xs", 256, 136), 24: ("i8", 1, 1), 25: ("i16", 1, 2),
    26: ("i32", 1, 4), 27: ("i64", 1, 8), 28: ("f64", 1, 8), 29: ("iq1_m", 256, 56),
    30: ("bf16", 1, 2), 34: ("tq1_0", 256, 54), 35: ("tq2_0", 256, 66), 39: ("mxfp4", 32, 17),
}  # fmt: skip
TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}

# Key/value types: id -> (struct format, bytes); 8 is a string, 9 an array.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
STRING, ARRAY = 8, 9
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
                 10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: ``dims`` in ggml order (``dims[0]`` contiguous), data bytes."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def ggml_type(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape of the elements: the dims reversed (rows first)."""
        return tuple(reversed(self.dims))


class GGUFFile(MappedFile):
    """A validated, memory-mapped GGUF file: ``metadata`` (key -> value) and ``tensors``.

    Numeric arrays in the metadata are read-only numpy views, strings are
    ``str``, string arrays lists of ``str``.  Arrays returned by ``raw`` stay
    valid after ``close()`` (they keep the mapping alive).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        try:
            with open_regular(self.path, WeightsError, missing="check the path") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise self._corrupt(f"it is only {size} bytes, too short for a GGUF header")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise WeightsError(f"cannot read {self.path}: {e.strerror or e}") from None
        try:
            self._parse(size)
        except BaseException:
            self.close()
            raise

    # -- parsing ----------------------------------------------------------------------
    def _parse(self, size: int) -> None:
        mm = self._mm
        assert mm is not None
        if mm[:4] != MAGIC:
            raise self._corrupt(f"it starts with {bytes(mm[:4])!r}, not the GGUF magic {MAGIC!r}")
        (version,) = struct.unpack_from("<I", mm, 4)
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            why = ("it is a big-endian GGUF file, which opswitch does not read" if swapped in VERSIONS
                   else f"its version is {version}; opswitch reads GGUF versions 2 and 3")
            raise WeightsError(f"{self.path}: {why}; convert it again with a current llama.cpp")
        self.version = version
        cur = _Cursor(mm, 8, min(size, MAX_HEADER_BYTES), self)
        n_tensors, n_kv = cur.u64(), cur.u64()
        # Each key/value takes 13 bytes at least, each tensor info 29: check before looping.
        cur.need(13 * n_kv, f"{n_kv:,} key/value pairs")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("a key")
            if key in self.metadata:
                raise self._corrupt(f"it holds the key {key!r} twice")
            self.metadata[key] = cur.value(cur.u32(), key)
        cur.need(29 * n_tensors, f"{n_tensors:,} tensors")
        self.alignment = self._alignment()
        infos: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            info = self._tensor_info(cur)
            if info.name in infos:
                raise self._corrupt(f"it holds the tensor {info.name!r} twice")
            infos[info.name] = info
        self.data_start = _aligned(cur.pos, self.alignment)
        self._check_data(infos, size - self.data_start if self.data_start <= size else -1)
        self.tensors = infos

    def _alignment(self) -> int:
        value = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1):
            raise self._corrupt(f"general.alignment is {value!r}, not a power of two")
        return value

    def _tensor_info(self, cur: _Cursor) -> TensorInfo:
        name = cur.string("a tensor name")
        if len(name.encode("utf-8")) >= MAX_NAME:
            raise self._corrupt(f"the tensor name {name[:40]!r}... is longer than {MAX_NAME - 1} bytes")
        n_dims = cur.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._corrupt(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(cur.u64() for _ in range(n_dims))
        type_id = cur.u32()
        if type_id not in GGML_TYPES:
            raise self._corrupt(f"tensor {name!r} has the unknown GGML type {type_id}")
        offset = cur.u64()
        if 0 in dims:
            raise self._corrupt(f"tensor {name!r} has an empty dimension {list(dims)}")
        kind, block, block_bytes = GGML_TYPES[type_id]
        if dims[0] % block:
            raise self._corrupt(f"tensor {name!r} is {kind} with rows of {dims[0]}, not blocks of {block}")
        nbytes = math.prod(dims) // block * block_bytes  # exact: Python integers never overflow
        return TensorInfo(name, dims, type_id, offset, nbytes)

    def _check_data(self, infos: dict[str, TensorInfo], data_size: int) -> None:
        if data_size < 0 and infos:
            raise self._corrupt("it ends before its data section")
        end = 0
        for info in sorted(infos.values(), key=lambda i: i.offset):
            if info.offset % self.alignment:
                raise self._corrupt(
                    f"tensor {info.name!r} starts at offset {info.offset}, not a multiple of the alignment "
                    f"{self.alignment}")
            if info.offset + info.nbytes > data_size:
                raise self._corrupt(
                    f"tensor {info.name!r} needs bytes {info.offset:,}..{info.offset + info.nbytes:,} of a "
                    f"data section of {max(data_size, 0):,} bytes (the file is truncated?)")
            if info.offset < end:
                raise self._corrupt(f"tensor {info.name!r} overlaps the tensor before it")
            end = info.offset + info.nbytes

    def _corrupt(self, what: str) -> WeightsError:
        return WeightsError(f"{self.path} is not a valid GGUF file: {what}; re-download or re-convert it")

    # -- data -------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored form as a read-only view of the file.

        f32 -> float32, f16 -> float16, bf16 -> uint16 bits, other float types
        their numpy dtype, each in the numpy shape; block types -> uint8
        ``[n_rows, row_bytes]`` (a row being ``dims[0]`` elements).
        """
        info = self.tensors[name]
        if self._mm is None:
            raise ValueError(f"{self.path} is closed")
        dtype = _ELEMENT_DTYPES.get(info.ggml_type)
        start = self.data_start + info.offset
        if dtype is not None:
            flat = np.frombuffer(self._mm, dtype, count=math.prod(info.dims), offset=start)
            return flat.reshape(info.shape)
        row_bytes = info.nbytes // math.prod(info.dims[1:])
        flat = np.frombuffer(self._mm, np.uint8, count=info.nbytes, offset=start)
        return flat.reshape(-1, row_bytes)



_ELEMENT_DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "f64": np.dtype("<f8"),
    "i8": np.dtype("i1"), "i16": np.dtype("<i2"), "i32": np.dtype("<i4"), "i64": np.dtype("<i8"),
}  # fmt: skip


def _aligned(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class _Cursor:
    """Reads the header from the mapping, refusing to read (or allocate for) bytes beyond ``end``."""

    def __init__(self, mm: mmap.mmap, pos: int, end: int, file: GGUFFile) -> None:
        self.mm, self.pos, self.end, self.file = mm, pos, end, file

    def need(self, n: int, what: str) -> None:
        left = self.end - self.pos
        if n > left:
            limit = " (the header limit)" if self.end == MAX_HEADER_BYTES else ""
            raise self.file._corrupt(f"it claims {what} at offset {self.pos:,} but only {left:,} bytes "
                                     f"follow{limit} (truncated or damaged)")

    def take(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.mm, self.pos)
        self.pos += n
        return value

    def u32(self) -> int:
        return self.take("<I", 4, "a 4-byte number")

    def u64(self) -> int:
        return self.take("<Q", 8, "an 8-byte number")

    def string(self, what: str) -> str:
        n = self.u64()
        self.need(n, f"{what} of {n:,} bytes")
        raw = self.mm[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.file._corrupt(f"{what} at offset {self.pos - n:,} is not UTF-8") from None

    def value(self, type_id: int, key: str) -> Any:
        if type_id in _SCALARS:
            fmt, n = _SCALARS[type_id]
            return self.take(fmt, n, f"the value of {key!r}")
        if type_id == STRING:
            return self.string(f"the value of {key!r}")
        if type_id != ARRAY:
            raise self.file._corrupt(f"key {key!r} has the unknown value type {type_id}")
        item, count = self.u32(), self.u64()
        if count > MAX_ARRAY:
            raise self.file._corrupt(f"key {key!r} is an array of {count:,} items (at most {MAX_ARRAY:,})")
        if item in _ARRAY_DTYPES:
            dtype = np.dtype(_ARRAY_DTYPES[item])
            self.need(count * dtype.itemsize, f"{key!r}, an array of {count:,} numbers")
            array = np.frombuffer(self.mm, dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return array
        if item == 7:
            self.need(count, f"{key!r}, an array of {count:,} bools")
            values = bytes(self.mm[self.pos:self.pos + count])
            self.pos += count
            return [bool(b) for b in values]
        if item == STRING:
            self.need(8 * count, f"{key!r}, an array of {count:,} strings")
            return [self.string(f"item {i} of {key!r}") for i in range(count)]
        what = "nested arrays" if item == ARRAY else f"the unknown item type {item}"
        raise self.file._corrupt(f"key {key!r} is an array of {what}")
