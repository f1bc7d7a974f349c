"""What is inside a weights file, without loading it: ``opswitch inspect``.

For ``.onnx`` and ``.safetensors`` files (or every such file in a model
directory): each tensor's name, dtype, shape and size, the totals, and for
ONNX the opset, producer, graph inputs/outputs and node counts per op type.
Only headers are read (ONNX external data is never loaded), so inspecting a
multi-gigabyte model is instant.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from opswitch.core.errors import ModelNotFoundError, WeightsError
from opswitch.model.safetensors import SafetensorsFile

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
                       "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn"}
_ONNX_DTYPES = {"FLOAT": "float32", "DOUBLE": "float64"}  # the rest: the lower-cased TensorProto name
_BITS = {"bool": 8, "float8_e5m2": 8, "float8_e4m3fn": 8, "int4": 4, "uint4": 4}


def inspect_path(path: str | Path) -> list[dict[str, Any]]:
    """One report per file: a file, or each .onnx / .safetensors file in a directory."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix in (".onnx", ".safetensors")) if path.is_dir() \
        else [path]
    if not files:
        raise WeightsError(f"{path} holds no .onnx or .safetensors file")
    return [inspect_file(f) for f in files]


def inspect_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return _safetensors(path)
    if path.suffix == ".onnx":
        return _onnx(path)
    raise WeightsError(f"{path}: inspect reads .onnx and .safetensors files (or a model directory)")


def _tensor(name: str, dtype: str, shape) -> dict[str, Any]:
    size = 1
    for d in shape:
        size *= int(d)
    width = re.search(r"\d+", dtype)
    bits = _BITS.get(dtype) or (int(width.group()) if width else 8)
    return {"name": name, "dtype": dtype, "shape": [int(d) for d in shape], "size": size,
            "bytes": (size * bits + 7) // 8}


def _totals(report: dict[str, Any]) -> dict[str, Any]:
    tensors = report["tensors"]
    report["total_tensors"] = len(tensors)
    report["total_params"] = sum(t["size"] for t in tensors)
    report["total_bytes"] = sum(t["bytes"] for t in tensors)
    return report


def _safetensors(path: Path) -> dict[str, Any]:
    with SafetensorsFile(path) as f:
        tensors = []
        for name in f.names:
            dtype, shape = f.info(name)
            tensors.append(_tensor(name, _SAFETENSORS_DTYPES.get(dtype, dtype.lower()), shape))
        return _totals({"path": str(path), "format": "safetensors", "metadata": f.metadata,
                        "tensors": tensors})


def _onnx(path: Path) -> dict[str, Any]:
    from opswitch.onnx.tensors import read_model

    model = read_model(path)  # first, as it names the extra to install when onnx is missing
    from onnx import TensorProto

    graph = model.graph

    def dtype(code: int) -> str:
        name = TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() else str(code)
        return _ONNX_DTYPES.get(name, name.lower())

    def value(v) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value if d.HasField("dim_value") or d.dim_param else "?"
                for d in t.shape.dim]
        return {"name": v.name, "dtype": dtype(t.elem_type), "shape": dims}

    external = sorted({e.value for t in graph.initializer for e in t.external_data if e.key == "location"})
    report = {
        "path": str(path),
        "format": "onnx",
        "ir_version": model.ir_version,
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [value(v) for v in graph.input if v.name not in {t.name for t in graph.initializer}],
        "outputs": [value(v) for v in graph.output],
        "nodes": len(graph.node),
        "op_counts": dict(Counter(n.op_type for n in graph.node).most_common()),
        "external_data": external,
        "tensors": [_tensor(t.name, dtype(t.data_type), t.dims) for t in graph.initializer],
    }
    return _totals(report)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def format_report(report: dict[str, Any]) -> list[str]:
    """Lines for a terminal (``--json`` prints the dict itself)."""
    lines = []
    if report["format"] == "onnx":
        opset = ", ".join(f"{d} {v}" for d, v in report["opset"].items())
        lines.append(f"{report['path']}: ONNX, IR {report['ir_version']}, opset {opset}, "
                     f"producer {report['producer'] or 'unknown'}")
        for kind in ("inputs", "outputs"):
            for v in report[kind]:
                shape = ", ".join(map(str, v["shape"]))
                lines.append(f"  {kind[:-1]:<7} {v['name']}  {v['dtype']}  [{shape}]")
        if report["external_data"]:
            lines.append(f"  external data: {', '.join(report['external_data'])}")
    else:
        lines.append(f"{report['path']}: safetensors" + (f", metadata {report['metadata']}"
                                                          if report["metadata"] else ""))
    width = max([len(t["name"]) for t in report["tensors"]] + [4])
    lines.append(f"  {'NAME':<{width}}  {'DTYPE':<8}  {'SHAPE':<16}  SIZE")
    for t in report["tensors"]:
        shape = "[" + ", ".join(map(str, t["shape"])) + "]"
        lines.append(f"  {t['name']:<{width}}  {t['dtype']:<8}  {shape:<16}  {_human_bytes(t['bytes'])}")
    lines.append(f"  total: {report['total_tensors']} tensors, {report['total_params']:,} values, "
                 f"{_human_bytes(report['total_bytes'])}")
    if report["format"] == "onnx":
        counts = ", ".join(f"{op} {n}" for op, n in report["op_counts"].items())
        lines.append(f"  nodes: {report['nodes']} ({counts})")
    return lines
