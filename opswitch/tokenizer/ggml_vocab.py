"""The byte-level BPE tokenizer from a GGUF's ``tokenizer.ggml.*`` arrays.

llama.cpp's converter writes GPT-2's tokenizer as ``tokenizer.ggml.model =
"gpt2"``, the tokens in id order (``tokens``, the byte-level strings of
vocab.json), the merges as ``"a b"`` strings and a type per token
(``token_type``): control tokens (``<|endoftext|>``) are matched in the raw
text as specials, user-defined ones as added tokens, unused ids (the
converter's ``[PAD<i>]`` fillers) are gaps with no text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opswitch.core.errors import TokenizerError, shown
from opswitch.tokenizer.bpe import AddedToken, BPETokenizer

# llama.cpp's llama_token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5


def from_ggml_vocab(meta: Mapping[str, Any], source: str) -> BPETokenizer:
    """A BPETokenizer from the ``tokenizer.ggml.*`` values of a GGUF (``meta``);
    ``source`` names the file in errors."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(
            f"{source}: tokenizer.ggml.model is {shown(model)}; opswitch reads GPT-2 byte-level BPE ('gpt2')"
            " tokenizers only: pass --tokenizer DIR, or use token ids")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre != "gpt-2":  # another pre-tokenizer splits text differently: ids would be silently wrong
        raise TokenizerError(
            f"{source}: tokenizer.ggml.pre is {shown(pre)}; opswitch splits text as GPT-2 does ('gpt-2')"
            " only: pass --tokenizer DIR, or use token ids")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens is not a list of strings; re-convert it")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise TokenizerError(f"{source}: tokenizer.ggml.merges is not a list of strings; re-convert it")
    types = _types(meta.get("tokenizer.ggml.token_type"), len(tokens), source)
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == UNUSED:
            continue
        if token in vocab:
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens holds {shown(token)} twice (ids "
                                 f"{vocab[token]} and {i}); re-convert the model")
        vocab[token] = i
        if kind in (CONTROL, USER_DEFINED):
            added.append(AddedToken(token, i, special=kind == CONTROL))
    return BPETokenizer(vocab, _pairs(merges, source), added, source=source)


def _types(raw: Any, n: int, source: str) -> Sequence[int]:
    if raw is None:
        return [1] * n
    values = [int(t) for t in raw] if hasattr(raw, "__len__") and not isinstance(raw, (str, bytes)) else None
    if values is None or len(values) != n:
        raise TokenizerError(f"{source}: tokenizer.ggml.token_type does not give one type per token "
                             f"({n} tokens); re-convert the model")
    return values


def _pairs(merges: list[str], source: str) -> list[tuple[str, str]]:
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{source}: tokenizer.ggml.merges[{i}] is {shown(merge)}, not two tokens "
                                 "separated by a space; re-convert the model")
        pairs.append((parts[0], parts[1]))
    return pairs


def to_ggml_vocab(tokenizer: object) -> dict[str, list] | None:
    """The ``tokenizer.ggml.*`` arrays of a BPETokenizer (None for another kind, which GGUF's
    ``gpt2`` model cannot express): tokens in id order (gaps as ``[PAD<i>]`` of type unused,
    as llama.cpp's converter writes them), their types, the merges in rank order."""
    if not isinstance(tokenizer, BPETokenizer):
        return None
    table = tokenizer._tokens
    added = tokenizer._added
    tokens, types = [], []
    for i, token in enumerate(table):
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            extra = added.get(token)
            types.append(1 if extra is None or extra.id != i else CONTROL if extra.special else USER_DEFINED)
    merges = [f"{a} {b}" for (a, b), _ in sorted(tokenizer._ranks.items(), key=lambda item: item[1])]
    return {"tokens": tokens, "types": types, "merges": merges}
