"""Which files make a tokenizer: the one answer ``load_tokenizer``, ``load_model`` and the hub share.

Three places used to decide this and disagreed (``load_model(dir)`` dropped a
char tokenizer that ``load_tokenizer(dir)`` found).
"""

from __future__ import annotations

import os
from pathlib import Path

CHAR_FILE = "tokenizer_char.json"
# the sets a model directory's tokenizer is read from, in the order load_tokenizer prefers them
TOKENIZER_SETS: tuple[tuple[str, ...], ...] = (
    ("vocab.json", "merges.txt"), ("tokenizer.json",), (CHAR_FILE,),
)
TOKENIZER_FILES: tuple[str, ...] = tuple(name for names in TOKENIZER_SETS for name in names)


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
