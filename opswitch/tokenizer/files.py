"""Which files make a tokenizer: the one answer ``load_tokenizer`` and ``load_model`` share.

Three places used to decide this and disagreed (``load_model(dir)`` dropped a
char tokenizer that ``load_tokenizer(dir)`` found).  The names themselves are
``core.files``'s, so that the hub (in ``model``, which may not import the
tokenizer) downloads and checks the same files.
"""

from __future__ import annotations

import os
from pathlib import Path

from opswitch.core.files import CHAR_TOKENIZER_FILE, TOKENIZER_FILES, TOKENIZER_SETS

CHAR_FILE = CHAR_TOKENIZER_FILE
__all__ = ["CHAR_FILE", "TOKENIZER_FILES", "TOKENIZER_SETS", "has_tokenizer_files", "tokenizer_set"]


def tokenizer_set(directory: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The first complete set of tokenizer files in ``directory``, or None.

    Anything at a name counts (a FIFO or a dangling link is chosen, then refused with a
    message saying what it is, not skipped)."""
    directory = Path(directory)
    for names in TOKENIZER_SETS:
        if all(os.path.lexists(directory / name) for name in names):
            return names
    return None


def has_tokenizer_files(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds any tokenizer file: then it is meant to have a tokenizer,
    and a partial set is an error to explain, not a model without one."""
    return any(os.path.lexists(Path(directory) / name) for name in TOKENIZER_FILES)
