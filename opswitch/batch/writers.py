"""The job's final files, assembled from complete shards: the output and the errors file.

Each is written whole to a temporary file and renamed, so an existing
output is always a finished one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from opswitch.batch.errors import BatchError, require_pyarrow
from opswitch.batch.readers import data_format
from opswitch.batch.shards import atomic_write, dumps


def errors_path(output: Path) -> Path:
    """``out.jsonl`` -> ``out.jsonl.errors.jsonl``: where bad rows are listed (beside
    ``out.jsonl.shards``: everything a job writes is named after its output)."""
    return output.with_name(output.name + ".errors.jsonl")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write(path, lambda f: f.writelines(dumps(row) + "\n" for row in rows))


def write_output(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """JSON Lines or Parquet, by the file name."""
    if data_format(path, "the output file") == "jsonl":
        write_jsonl(path, rows)
        return
    pa = require_pyarrow("writing Parquet")
    import pyarrow.parquet as pq

    rows = list(rows)
    try:
        # pa.array infers one struct type from every row, so a field only some rows have is kept.
        table = pa.Table.from_struct_array(pa.array(rows)) if rows else pa.table({})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise BatchError(
            f"the rows do not fit one Parquet schema ({exc}); write JSON Lines instead (--output *.jsonl)"
        ) from None
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
