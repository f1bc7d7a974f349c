"""Errors of batch jobs: one-line messages the CLI prints before exiting 2."""

from __future__ import annotations

from opswitch.core.errors import OpswitchError


class BatchError(OpswitchError):
    """A bad batch flag, input file or output location (nothing was run)."""


class MissingExtraError(BatchError):
    """An optional dependency (Ray, pyarrow) is not installed."""

    def __init__(self, what: str, module: str, extra: str) -> None:
        super().__init__(f"{what} needs {module}, which is not installed: pip install 'opswitch[{extra}]'")


def require_pyarrow(what: str):
    """Import pyarrow (with parquet) or say which extra brings it."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MissingExtraError(what, "pyarrow", "parquet") from None
    return pyarrow
