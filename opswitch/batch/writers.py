"""The job's final files, assembled from complete shards: the output and the errors file.

Each is written whole to a temporary file, synced and renamed, so an
existing output is always a finished one.  A Parquet output needs every row
to fit one schema; whether they do is known from the input alone (the
columns the job adds always have the same types), so it is checked before
the model loads, not after every row has run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from opswitch.batch.errors import BatchError, require_pyarrow
from opswitch.batch.readers import Row, data_format
from opswitch.batch.shards import atomic_write, dumps
from opswitch.batch.work import Task


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]], tmp_dir: Path | None = None) -> None:
    atomic_write(path, lambda f: f.writelines(dumps(row) + "\n" for row in rows), tmp_dir=tmp_dir)


def write_output(path: Path, rows: Iterable[dict[str, Any]], tmp_dir: Path | None = None) -> None:
    """JSON Lines or Parquet, by the file name."""
    if data_format(path, "the output file") == "jsonl":
        write_jsonl(path, rows, tmp_dir)
        return
    import pyarrow.parquet as pq

    table = _table(list(rows))
    atomic_write(path, lambda f: pq.write_table(table, f), tmp_dir=tmp_dir, binary=True)


def check_output_schema(rows: Sequence[Row], task: Task) -> None:
    """Refuse now if the output rows could not share one Parquet schema: the input's
    fields of every usable row, beside the job's own columns with their types."""
    ours = _sample_columns(task)
    _table([{**row.fields, "index": row.index, **ours} for row in rows if row.error is None])  # type: ignore[dict-item]


def _table(rows: list[dict[str, Any]]):
    pa = require_pyarrow("writing Parquet")
    try:
        # pa.array infers one struct type from every row, so a field only some rows have is kept.
        return pa.Table.from_struct_array(pa.array(rows)) if rows else pa.table({})
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
        raise BatchError(
            f"the rows do not fit one Parquet schema ({str(exc)[:200]}); "
            "write JSON Lines instead (--output *.jsonl)"
        ) from None


def _sample_columns(task: Task) -> dict[str, Any]:
    """Values of the types ``work.run_rows`` gives each column."""
    settings = {"model": task.model, "backend": "", **task.generation}
    if task.kind == "generate":
        return {"completion": "", "completion_ids": [0], "stop_reason": "", "prompt_tokens": 0, "seed": 0,
                "settings": settings}
    return {"loss": 0.0, "perplexity": 0.0, "tokens": 0, "settings": settings}
