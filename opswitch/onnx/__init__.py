"""ONNX in and out: export a GPT-2 as a standard ONNX graph, import one onto our ops.

``onnx`` is an optional dependency (``pip install 'opswitch[onnx]'``); it is
imported only when a function here needs it, so the rest of opswitch never
pays for it.  ONNX Runtime is not needed at all (the tests use it as the
reference).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from opswitch.core.errors import WeightsError


class OnnxError(WeightsError):
    """An ONNX file we cannot read, map onto GPT-2 or write."""


def require_onnx() -> Any:
    """The ``onnx`` module, or a one-line error naming the extra that provides it."""
    try:
        import onnx
    except ImportError:
        raise OnnxError("ONNX support needs the onnx package: pip install 'opswitch[onnx]'") from None
    return onnx


def is_onnx_path(path: str | os.PathLike[str]) -> bool:
    """Does ``path`` name an ONNX file (by its suffix; it may not exist yet, or be something else
    than a file, which the reader refuses)?  A model directory that happens to end in ``.onnx``
    (it holds a config.json) is not one."""
    if path is None or Path(str(path)).suffix.lower() != ".onnx":
        return False
    return not (Path(str(path)) / "config.json").is_file()
