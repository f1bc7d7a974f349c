"""Every tensor in an ONNX file, read as untrusted: the file itself, inline data, external data.

An ``.onnx`` path may name a FIFO, a link to ``/dev/zero`` or a directory; a
tensor may claim dims its bytes do not fill, or point its external data at
``/etc/passwd``, at ``../`` or through a symlink out of the model's folder,
at an offset past the end of the file.  The file is read like every other
model file (``core.files``: a regular file, of a bounded size); then every
``TensorProto`` anywhere in the model (initializers, ``Constant`` node
attributes, subgraphs) is checked once, before anything reads it, so no
later step (our mapper, the reference evaluator) can meet one that is
inconsistent or that reads outside the folder.  External data of small
tensors (constants) is read into the tensor then and there, with a size
bound; initializers stay on disk and are memory-mapped when used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from opswitch.core.errors import ModelNotFoundError, shown
from opswitch.core.files import MiB, not_a_file, read_bytes
from opswitch.onnx import OnnxError, require_onnx

MODEL_LIMIT = 2 * 1024 * MiB  # one protobuf message holds at most 2 GB; more is not an ONNX file
CONSTANT_LIMIT = 16 * MiB  # external data of a non-initializer tensor (GPT-2's constants are bytes)

# TensorProto data types a GPT-2 graph may hold, and the typed field that carries each inline.
_FIELD = {1: "float_data", 2: "int32_data", 3: "int32_data", 4: "int32_data", 5: "int32_data",
          6: "int32_data", 7: "int64_data", 9: "int32_data", 10: "int32_data", 11: "double_data",
          12: "uint64_data", 13: "uint64_data", 16: "int32_data"}
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def read_model(path: Path) -> Any:
    """Parse ``path`` as an ONNX model after checking it is a regular file of at most 2 GB;
    external data is not loaded (see ``check_tensors``)."""
    onnx = require_onnx()
    from google.protobuf.message import DecodeError

    if not_a_file(path) == "missing":
        raise ModelNotFoundError(f"{path} does not exist")
    data = read_bytes(path, what="ONNX model", limit=MODEL_LIMIT, error=OnnxError)
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError, RecursionError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OnnxError(f"{path} is not an ONNX model: cannot parse it as one ({why}); truncated or "
                        "another format?") from None
    if not model.HasField("graph") or not model.graph.node or not model.opset_import:
        raise OnnxError(f"{path} parses as protobuf but is not an ONNX model (no graph, nodes or opset); "
                        "truncated or another format?")
    return model


def all_tensors(model: Any) -> Iterator[tuple[Any, bool, str]]:
    """(tensor, is_initializer, what it is) for every TensorProto in the model, subgraphs and
    functions included."""
    from onnx import AttributeProto

    def graph_tensors(graph, top: bool):
        for t in graph.initializer:
            yield t, top, f"tensor {t.name!r}"
        for s in graph.sparse_initializer:
            yield s.values, False, f"sparse tensor {s.values.name!r}"
            yield s.indices, False, f"sparse tensor {s.values.name!r}'s indices"
        yield from node_tensors(graph.node)

    def node_tensors(nodes):
        for node in nodes:
            for a in node.attribute:
                label = node.name or (node.output[0] if node.output else "")
                what = f"tensor {a.t.name or a.name!r} of {node.op_type} node {label!r}"
                if a.type == AttributeProto.TENSOR:
                    yield a.t, False, what
                elif a.type == AttributeProto.TENSORS:
                    yield from ((t, False, what) for t in a.tensors)
                elif a.type in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS):
                    one = a.type == AttributeProto.SPARSE_TENSOR
                    for s in [a.sparse_tensor] if one else a.sparse_tensors:
                        yield s.values, False, what
                        yield s.indices, False, what
                elif a.type == AttributeProto.GRAPH:
                    yield from graph_tensors(a.g, False)
                elif a.type == AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from graph_tensors(g, False)

    yield from graph_tensors(model.graph, True)
    for function in model.functions:
        yield from node_tensors(function.node)


def check_tensors(model: Any, path: Path) -> None:
    """Check every tensor's dims against its data (inline) or its location (external), and read
    the external data of the small non-initializer ones into the tensor (bounded)."""
    from onnx import TensorProto

    for tensor, initializer, what in all_tensors(model):
        needed = tensor_bytes(tensor, path, what)
        if tensor.data_location == TensorProto.EXTERNAL:
            target, offset = external_span(tensor, path, needed, what)
            if not initializer:
                inline_external(tensor, path, target, offset, needed, what)
        else:
            check_inline(tensor, path, needed, what)


def tensor_bytes(tensor: Any, source: Path, what: str) -> int:
    """The bytes ``tensor``'s dims need, refusing negative dims and dtypes no GPT-2 has."""
    if tensor.data_type not in _ITEMSIZE:
        raise OnnxError(f"{source}: {what} has data type {_dtype_name(tensor.data_type)}, "
                        "which no GPT-2 graph holds")
    if any(d < 0 for d in tensor.dims):
        raise OnnxError(f"{source}: {what} has negative dims {list(tensor.dims)}")
    n = 1
    for d in tensor.dims:
        n *= int(d)
    return n * _ITEMSIZE[tensor.data_type]


def check_inline(tensor: Any, source: Path, needed: int, what: str) -> None:
    """Inline data must fill the dims exactly: ``raw_data`` byte for byte, or the typed field."""
    if tensor.HasField("raw_data"):
        have, want = len(tensor.raw_data), needed
    else:
        have, want = len(getattr(tensor, _FIELD[tensor.data_type])), needed // _ITEMSIZE[tensor.data_type]
    if have != want:
        raise OnnxError(f"{source}: {what} has dims {list(tensor.dims)} but "
                        f"{have:,} {'bytes' if tensor.HasField('raw_data') else 'values'} of data "
                        f"({want:,} needed); the file is damaged")


def external_span(tensor: Any, source: Path, needed: int, what: str) -> tuple[Path, int]:
    """(file, offset) of an external tensor, after checking that the file is a regular file inside
    the model's folder (no absolute path, no ``..`` or symlink out of it) and that
    offset + length lie inside it and match the tensor's dims."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    base = source.parent
    what = f"{source}: {what} points at external data {shown(location)}"
    try:
        inside = bool(location) and "\0" not in location and not Path(location).is_absolute() \
            and not os.path.isabs(location) and (base / location).resolve().is_relative_to(base.resolve())
    except (OSError, ValueError, RuntimeError):  # a link loop, a name the OS refuses
        inside = False
    if not inside:
        raise OnnxError(f"{what}, outside the model's directory {base}; refusing to read it")
    target = base / location
    kind = not_a_file(target)
    if kind == "missing":
        raise OnnxError(f"{what}, which is not in {base}; copy it beside the model")
    if kind is not None:
        raise OnnxError(f"{what}, which is {kind}, not a file")
    offset, length = _count(info.get("offset", "0")), _count(info.get("length", str(needed)))
    size = target.stat().st_size
    if offset is None or length is None or length != needed or offset + length > size:
        raise OnnxError(f"{what} at offset {shown(info.get('offset', '0'))} length "
                        f"{shown(info.get('length', str(needed)))}, which does not fit the file "
                        f"({size:,} bytes) or the tensor's dims {list(tensor.dims)} ({needed:,} bytes); "
                        "the data file is truncated or belongs to another model")
    return target, offset


def inline_external(tensor: Any, source: Path, target: Path, offset: int, needed: int, what: str) -> None:
    from onnx import TensorProto

    if needed > CONSTANT_LIMIT:
        raise OnnxError(f"{source}: {what} holds {needed:,} bytes of external data; no GPT-2 constant "
                        f"is that large ({CONSTANT_LIMIT // MiB} MiB at most)")
    with open(target, "rb") as f:  # a regular file, checked just before
        f.seek(offset)
        data = f.read(needed)
    if len(data) != needed:
        raise OnnxError(f"{source}: external data of {what} ends early in {target.name}")
    tensor.raw_data = data
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]


def tensor_array(tensor: Any, source: Path) -> np.ndarray:
    """A tensor checked by ``check_tensors`` as a numpy array; external data is memory-mapped."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        try:
            return numpy_helper.to_array(tensor)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise OnnxError(f"{source}: cannot read tensor {tensor.name!r} ({e}); "
                            "the file is damaged") from None
    what = f"tensor {tensor.name!r}"
    needed = tensor_bytes(tensor, source, what)
    target, offset = external_span(tensor, source, needed, what)
    shape = tuple(int(d) for d in tensor.dims)
    dtype = np.dtype(np.uint16 if tensor.data_type == 16 else onnx_dtype(tensor.data_type))
    if needed == 0:
        return np.zeros(shape, dtype)
    array = np.memmap(target, dtype=dtype, mode="r", offset=offset, shape=shape)
    return (np.asarray(array, dtype=np.uint32) << 16).view(np.float32) if tensor.data_type == 16 else array


def onnx_dtype(code: int) -> Any:
    from onnx import helper

    try:
        return helper.tensor_dtype_to_np_dtype(code)
    except (KeyError, ValueError):
        return np.uint8


def _count(text: str) -> int | None:
    """A non-negative decimal integer of at most 20 digits, else None."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None


def _dtype_name(code: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() else str(code)

