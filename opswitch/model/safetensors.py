"""Read and write safetensors files with numpy alone.

The format (https://github.com/huggingface/safetensors): 8 bytes holding the
little-endian length N of a UTF-8 JSON header, the header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data section, which offsets are relative to.  We own the reader
because the format is small, because it lets the model layer depend on numpy
only, and because a downloaded file is untrusted input: every check HF's
reader makes is made here too (offsets must tile the data section exactly,
no gaps, overlaps or trailing bytes), and every failure is a one-line
``WeightsError`` naming the file instead of a numpy or json traceback.

Reading memory-maps the file, so F32 tensors are zero-copy read-only views:
loading a model costs page cache, not a second copy of the weights.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from opswitch.core.errors import WeightsError
from opswitch.core.files import MappedFile, open_regular

# safetensors dtype -> numpy dtype (little-endian, as the format is).
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code) for name, code in {
        "BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
        "I32": "<i4", "U32": "<u4", "F32": "<f4", "F64": "<f8", "I64": "<i8", "U64": "<u8",
    }.items()
}
# Dtypes the format defines that numpy lacks: we validate them, get_float32 reads BF16.
_ITEMSIZE = {**{k: v.itemsize for k, v in NUMPY_DTYPES.items()}, "BF16": 2, "F8_E5M2": 1, "F8_E4M3": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_SAVE_NAMES = {v: k for k, v in NUMPY_DTYPES.items()}

MAX_HEADER_BYTES = 100_000_000  # the limit HF's reader enforces
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class _Entry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile(MappedFile):
    """A validated, memory-mapped safetensors file.

    Arrays returned by ``get``/``get_float32`` stay valid after ``close()``:
    they keep the mapping alive until they are garbage-collected.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        try:
            with open_regular(self.path, WeightsError, missing="re-download the model") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise _corrupt(self.path, f"it is only {size} bytes, too short for the header length")
                n = int.from_bytes(f.read(8), "little")
                if n > MAX_HEADER_BYTES:
                    raise _corrupt(self.path, f"its header claims {n} bytes (limit {MAX_HEADER_BYTES})")
                if 8 + n > size:
                    raise _corrupt(self.path, f"its header claims {n} bytes but only {size - 8} follow")
                self._entries, self._metadata = _parse_header(self.path, f.read(n), size - 8 - n)
                self._data_start = 8 + n
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise WeightsError(f"cannot read {self.path}: {e.strerror or e}") from None

    # -- inspection -----------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._entries)

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` dict ({} when the file has none)."""
        return dict(self._metadata)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype such as "F32", shape) without reading any data."""
        e = self._entry(name)
        return e.dtype, e.shape

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # -- data -----------------------------------------------------------------------
    def get(self, name: str) -> np.ndarray:
        """The tensor in its own dtype, as a zero-copy read-only view of the file."""
        e = self._entry(name)
        dtype = NUMPY_DTYPES.get(e.dtype)
        if dtype is None:
            raise WeightsError(
                f"{self.path}: tensor {name!r} is {e.dtype}, which numpy has no dtype for; "
                "read float tensors with get_float32"
            )
        return self._view(e, dtype)

    def get_float32(self, name: str) -> np.ndarray:
        """The tensor as float32, read-only: zero-copy for F32; F16, BF16 (exact) and F64 are converted."""
        e = self._entry(name)
        if e.dtype == "F32":
            return self._view(e, NUMPY_DTYPES["F32"])
        if e.dtype == "BF16":
            # bfloat16 is the high half of a float32: widening the bits is exact.
            out = (self._view(e, NUMPY_DTYPES["U16"]).astype(np.uint32) << 16).view(np.float32)
        elif e.dtype in ("F16", "F64"):
            with np.errstate(over="ignore"):
                out = self._view(e, NUMPY_DTYPES[e.dtype]).astype(np.float32)
        else:
            raise WeightsError(
                f"{self.path}: tensor {name!r} is {e.dtype}, not a float tensor opswitch reads "
                f"({', '.join(FLOAT_DTYPES)}); re-save the file with such weights"
            )
        out.setflags(write=False)
        return out

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise WeightsError(f"{self.path} has no tensor {name!r} ({len(self._entries)} others)") from None

    def _view(self, e: _Entry, dtype: np.dtype) -> np.ndarray:
        if self._mm is None:
            raise ValueError(f"{self.path} is closed")
        flat = np.frombuffer(self._mm, dtype, count=math.prod(e.shape), offset=self._data_start + e.begin)
        return flat.reshape(e.shape)

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._entries)} tensors)"


def _corrupt(path: Path, what: str) -> WeightsError:
    return WeightsError(f"{path} is not a valid safetensors file: {what}; re-download or re-save the file")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_header(path: Path, raw: bytes, data_size: int) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Validate the header against a data section of ``data_size`` bytes."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _corrupt(path, "its header is not UTF-8 text") from None
    except _DuplicateKey as e:
        raise _corrupt(path, f"its header names {e.args[0]!r} twice") from None
    except (ValueError, RecursionError) as e:
        raise _corrupt(path, f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "its __metadata__ is not an object of strings")

    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise _corrupt(path, f"{where} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise _corrupt(path, f"{where} has dtype {dtype!r}, not a string")
        if dtype not in _ITEMSIZE:
            raise WeightsError(
                f"{path}: tensor {name!r} has dtype {dtype!r}, which opswitch cannot read "
                f"(it reads {', '.join(_ITEMSIZE)}); re-save the file with one of those"
            )
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise _corrupt(path, f"{where} has shape {shape!r}, not a list of integers")
        if any(d < 0 for d in shape):
            raise _corrupt(path, f"{where} has negative dimensions in shape {shape}")
        two_ints = isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
        if not two_ints or min(offsets) < 0:
            raise _corrupt(path, f"{where} has data_offsets {offsets!r}, not two non-negative integers")
        begin, end = offsets
        if begin > end:
            raise _corrupt(path, f"{where} has data_offsets {offsets}: it begins after it ends")
        if end > data_size:
            raise _corrupt(path, f"{where} ends at byte {end}, past the {data_size}-byte data section")
        need = math.prod(shape) * _ITEMSIZE[dtype]
        if end - begin != need:
            raise _corrupt(path, f"{where} is {dtype} {shape} ({need} bytes) but spans {end - begin} bytes")
        entries[name] = _Entry(dtype, tuple(shape), begin, end)

    # Like HF's reader: the tensors must tile the data section exactly.
    entries = dict(sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)))
    pos = 0
    for name, entry in entries.items():
        if entry.begin < pos:
            where = f"bytes {entry.begin}..{pos}"
            raise _corrupt(path, f"tensor {name!r} overlaps the tensor before it ({where})")
        if entry.begin > pos:
            raise _corrupt(path, f"bytes {pos}..{entry.begin} of the data section belong to no tensor")
        pos = entry.end
    if pos != data_size:
        raise _corrupt(path, f"the last {data_size - pos} bytes of the data section belong to no tensor")
    return entries, metadata


# -- writing ----------------------------------------------------------------------------

@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or an exception mid-write leaves the old file untouched and no
    half-written file behind.  OS errors become WeightsError naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise WeightsError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def _saveable(path: Path, name: Any, value: Any) -> tuple[str, np.ndarray]:
    """(safetensors dtype, C-contiguous little-endian array) for one tensor, or a WeightsError."""
    if not isinstance(name, str) or name == "__metadata__":
        raise WeightsError(f"cannot save {path}: {name!r} is not a tensor name (a string, not __metadata__)")
    try:
        a = np.asarray(value)
    except Exception as e:  # anything a foreign __array__ may raise
        what = f"tensor {name!r} ({type(value).__name__})"
        raise WeightsError(f"cannot save {path}: {what} is not an array ({e})") from None
    if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, if the caller uses it
        return "BF16", np.asarray(a, order="C")
    le = a.dtype.newbyteorder("<")
    if le not in _SAVE_NAMES:
        raise WeightsError(
            f"cannot save {path}: tensor {name!r} has dtype {a.dtype}, which safetensors cannot hold "
            f"(use one of {', '.join(str(d) for d in _SAVE_NAMES)})"
        )
    return _SAVE_NAMES[le], np.asarray(a, dtype=le, order="C")  # (ascontiguousarray makes 0-d 1-d)


def _write_tensor(f: BinaryIO, a: np.ndarray) -> None:
    f.write(a.reshape(-1).view(np.uint8).data)


def save_safetensors(
    path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as a safetensors file that HF's reader accepts, atomically.

    Like HF's writer, tensors are laid out by descending item size, then
    name, after a header space-padded to a multiple of 8 bytes, so every
    tensor is aligned for its dtype when the file is memory-mapped.
    """
    path = Path(path)
    arrays = {name: _saveable(path, name, value) for name, value in tensors.items()}
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise WeightsError(f"cannot save {path}: metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    order = sorted(arrays, key=lambda n: (-arrays[n][1].dtype.itemsize, n))
    offset = 0
    for name in order:
        dtype, a = arrays[name]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            _write_tensor(f, arrays[name][1])


# -- pickles ----------------------------------------------------------------------------

def refuse_pickle(path: str | Path) -> None:
    """Raise WeightsError if ``path`` looks like pickled weights; return otherwise.

    Unpickling runs whatever code the file says, so opswitch never does it;
    the message gives a one-line conversion to run where the file is trusted.
    """
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return
    src = str(path.parent)
    out = f"{src}-safetensors"
    raise WeightsError(
        f"{path} holds pickled weights, which opswitch refuses to load because unpickling a file can "
        "run arbitrary code; if you trust it, convert it once to safetensors: python -c \"from "
        "transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained({src!r}).save_pretrained({out!r}, safe_serialization=True)\" and load {out}"
    )
