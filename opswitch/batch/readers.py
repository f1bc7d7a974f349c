"""Read a dataset (JSON Lines or Parquet) into numbered rows, sorting out bad ones.

Every row gets its 0-based index in the input, which fixes its place in the
output and its seed.  A row that cannot be used (invalid JSON — an integer
past Python's digit limit, nesting too deep — not an object, the text field
missing or not text) is kept with the reason, so the job reports it in the
errors file instead of stopping.  A UTF-8 byte-order mark at the start of
the file is not part of the first row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opswitch.batch.errors import BatchError, require_pyarrow
from opswitch.generation import MAX_STOP_CHARS, MAX_STOPS

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Unreadable:
    """A JSONL line that did not parse, and why."""

    reason: str


@dataclass(frozen=True)
class Row:
    """One input row: its fields and the text to run, or why it cannot run."""

    index: int
    fields: dict[str, Any] | None
    text: str | None = None
    error: str | None = None
    stop: tuple[str, ...] = ()  # the row's own stop strings (a generate job's ``stop`` field)

    @property
    def id(self) -> Any:
        """The row's own ``id`` field when it has one (for the errors file)."""
        return self.fields.get("id") if self.fields else None


def data_format(path: Path, role: str) -> str:
    """``"jsonl"`` or ``"parquet"``, from the file name."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise BatchError(
        f"{role} {path} must end in .jsonl, .ndjson (JSON Lines) or .parquet, to say its format"
    )


def read_rows(path: Path, field: str, reserved: frozenset[str] = frozenset(), stop_field: bool = False
              ) -> list[Row]:
    """All rows of ``path``; ``field`` names the text, ``reserved`` the output's own columns;
    with ``stop_field``, a row's ``stop`` field (a text or a list of texts) is its stop strings."""
    if not path.is_file():
        missing = f"input file {path} does not exist"
        raise BatchError(missing if not path.exists() else f"input {path} is not a file")
    if data_format(path, "the input file") == "parquet":
        records = _read_parquet(path)
    else:
        records = _read_jsonl(path)
    rows = [_row(i, record, field, reserved) for i, record in enumerate(records)]
    return [_with_stop(row) for row in rows] if stop_field else rows


def _read_jsonl(path: Path) -> list[Any]:
    """Parsed values, or ``Unreadable`` for a line that is not valid JSON.
    Blank lines are not rows. Lines split on "\\n" only: U+2028 may sit inside a string."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BatchError(f"cannot read input file {path}: {exc.strerror or exc}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM (some Windows editors write one) is not data
        data = data[3:]
    records: list[Any] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8"), parse_constant=_not_json))
        except UnicodeDecodeError:
            records.append(Unreadable(f"line {number} is not valid UTF-8"))
        except json.JSONDecodeError as exc:
            records.append(Unreadable(f"line {number} is not valid JSON: {exc.msg} at column {exc.colno}"))
        except RecursionError:
            records.append(Unreadable(f"line {number} is nested too deeply to read"))
        except ValueError as exc:  # an integer past Python's digit limit, NaN or Infinity
            records.append(Unreadable(f"line {number} is not usable JSON: {str(exc)[:120]}"))
    return records


def _not_json(name: str):
    """``NaN`` and ``Infinity`` are Python's extension, not JSON: the output could not hold them."""
    raise ValueError(f"{name} is not a JSON value")


def _read_parquet(path: Path) -> list[dict]:
    require_pyarrow("reading Parquet")
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's errors have no common base worth naming
        raise BatchError(f"cannot read Parquet file {path}: {exc}") from None


_JSON_NAMES = {str: "string", int: "number", float: "number", bool: "boolean", list: "array",
               type(None): "null"}


def _row(index: int, record: Any, field: str, reserved: frozenset[str]) -> Row:
    if isinstance(record, Unreadable):
        return Row(index, None, error=record.reason)
    if not isinstance(record, dict):
        kind = _JSON_NAMES.get(type(record), type(record).__name__)
        return Row(index, None, error=f"the row is a JSON {kind}, not an object")
    clash = sorted(reserved & record.keys())
    if clash:
        return Row(index, record, error=f"field {clash[0]!r} would be overwritten by the output: rename it")
    if field not in record:
        return Row(index, record, error=f"no {field!r} field")
    text = record[field]
    if not isinstance(text, str):
        return Row(index, record, error=f"field {field!r} is {type(text).__name__}, not text")
    if not text:
        return Row(index, record, error=f"field {field!r} is empty")
    try:
        json.dumps(record, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return Row(index, record, error="the row holds a lone surrogate (\\ud800-\\udfff), not valid Unicode")
    except (RecursionError, ValueError):  # nested too deep to write back (Parquet input)
        return Row(index, record, error="the row cannot be written back as JSON (nested too deeply)")
    return Row(index, record, text=text)


STOP_RULE = (f"field 'stop' must be a non-empty text of at most {MAX_STOP_CHARS} characters, or a list of"
             f" at most {MAX_STOPS} of them")


def _with_stop(row: Row) -> Row:
    """The row with its stop strings, or with the reason its ``stop`` field cannot be used."""
    if row.error is not None or row.fields is None or row.fields.get("stop") is None:
        return row
    stop = row.fields["stop"]
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 0 < len(stops) <= MAX_STOPS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        return Row(row.index, row.fields, error=STOP_RULE)
    return Row(row.index, row.fields, row.text, stop=tuple(stops))
