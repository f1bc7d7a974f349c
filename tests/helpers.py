"""Helpers several test modules share (import them from here, not from conftest or each other)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    """Rows as JSON Lines; a row that is a string is written as it is (a hostile line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_error_line(capsys) -> str:
    """The CLI's stderr is exactly one ``opswitch: error:`` line: returned."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opswitch: error:"), err
    return err[0]
