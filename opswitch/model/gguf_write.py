"""Write a GPT-2 as a GGUF v3 file that llama.cpp loads (architecture ``gpt2``).

The layout is the one llama.cpp's converter writes (see ``gguf_load``): ggml
tensor names, every matrix one output channel per row, norms, biases and
``position_embd`` in F32, the other matrices in the chosen type (``f32``,
``f16``, ``bf16``, ``q8_0``, ``q4_0``; a matrix a block type cannot hold,
its reduction length not a multiple of 32, is written as F16, as the
converter falls back).  The hyper-parameters go in ``gpt2.*`` keys and the
tokenizer, when given, in ``tokenizer.ggml.*``.

The file is written to a hidden temporary name beside the target, fsynced and
renamed over it only once complete, so a crash never leaves half a model
under the real name.  Tensors are converted and written one at a time: peak
memory is the largest tensor, not the model.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from opswitch.core import formats
from opswitch.core.errors import WeightsError
from opswitch.model.config import GPT2Config
from opswitch.model.gguf_load import ARCH, expected_dims, our_name, role_of
from opswitch.model.gguf_read import DEFAULT_ALIGNMENT, GGML_TYPES, MAGIC, TYPE_IDS
from opswitch.model.safetensors import atomic_write
from opswitch.model.weights import flatten_params

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# llama_ftype: what general.file_type says the file mostly holds.
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}
_U8, _I32, _U32, _F32, _BOOL, _STRING, _ARRAY, _U64 = 0, 5, 4, 6, 7, 8, 9, 10


def save_gguf(path: str | Path, config: GPT2Config, params: Mapping[str, Any], *, weights: str = "f32",
              vocab: Mapping[str, Any] | None = None, name: str = "") -> dict[str, int]:
    """Write ``params`` as ``path`` (replacing it, atomically: callers check for overwrites).

    ``vocab``: the ``tokenizer.ggml.*`` arrays (``tokens``, ``types``, ``merges``;
    see ``opswitch.tokenizer.ggml_vocab.to_ggml_vocab``).  Returns the number of
    tensors written per GGML type.
    """
    if weights not in EXPORT_TYPES:
        raise WeightsError(f"cannot write GGUF weights as {weights!r}: use one of {', '.join(EXPORT_TYPES)}")
    flat = flatten_params(params)
    if not config.tie_word_embeddings and "lm_head.weight" not in flat:
        flat["lm_head.weight"] = flat["wte.weight"]
    dims = expected_dims(config)
    tensors = [(gguf_name, dims[gguf_name], flat[_ours(gguf_name)]) for gguf_name in dims]
    plan = [(n, d, _target_type(n, d, weights)) for n, d, _ in tensors]
    kv = _metadata(config, weights, vocab, name)
    counts: dict[str, int] = {}
    with atomic_write(path) as f:
        offsets = _write_header(f, kv, plan)
        for (gguf_name, _, kind), (_, _, value), offset in zip(plan, tensors, offsets):
            data = _encoded(gguf_name, value, kind)
            f.write(b"\0" * (offset - f.tell()))
            f.write(np.ascontiguousarray(data).data)
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _ours(gguf_name: str) -> str:
    name = our_name(gguf_name)
    assert name is not None
    return name


def _target_type(gguf_name: str, dims: tuple[int, ...], weights: str) -> str:
    """The converter's rule: 1-D tensors, norms and position_embd in F32, other matrices in ``weights``."""
    if len(dims) == 1 or gguf_name.startswith("position_embd") or weights == "f32":
        return "f32"
    block = GGML_TYPES[TYPE_IDS[weights]][1]
    return weights if dims[0] % block == 0 else "f16"


def _encoded(gguf_name: str, value: Any, kind: str) -> np.ndarray:
    """The tensor's bytes in GGML's layout: rows = output channels (Conv1D weights transposed)."""
    role = role_of(_ours(gguf_name))
    if isinstance(value, formats.Stored) and value.fmt == kind and kind in ("q8_0", "q4_0"):
        return value.data  # already GGML's blocks: written as they are, not re-quantised
    w = formats.decode(value) if isinstance(value, formats.Stored) else np.asarray(value, dtype=np.float32)
    if role == "vector" or kind == "f32":
        rows = w.T if role == "linear" else w
        return np.ascontiguousarray(rows, dtype=np.float32)
    if kind in ("q8_0", "q4_0"):
        stored = formats.encode(w, kind, role)
        if stored.fmt != kind:  # a block's scale would overflow f16
            raise WeightsError(f"{gguf_name} holds values too large for {kind}'s f16 block scales; "
                               "export it as f32 or f16")
        return stored.data
    stored = formats.encode(w, kind, role)  # f16 or bf16, in our [n_in, n_out] order
    return stored.data.T if role == "linear" else stored.data


def _metadata(config: GPT2Config, weights: str, vocab: Mapping[str, Any] | None, name: str) -> list[tuple]:
    kv: list[tuple] = [
        ("general.architecture", _STRING, ARCH),
        ("general.name", _STRING, name or "GPT-2"),
        ("general.file_type", _U32, _FILE_TYPES[weights]),
    ]
    if weights in ("q8_0", "q4_0"):
        kv.append(("general.quantization_version", _U32, 2))
    kv += [
        (f"{ARCH}.context_length", _U32, config.n_positions),
        (f"{ARCH}.embedding_length", _U32, config.n_embd),
        (f"{ARCH}.feed_forward_length", _U32, config.d_ff),
        (f"{ARCH}.block_count", _U32, config.n_layer),
        (f"{ARCH}.attention.head_count", _U32, config.n_head),
        (f"{ARCH}.attention.layer_norm_epsilon", _F32, config.layer_norm_epsilon),
    ]
    if vocab:
        kv += [
            ("tokenizer.ggml.model", _STRING, "gpt2"),
            ("tokenizer.ggml.pre", _STRING, "gpt-2"),
            ("tokenizer.ggml.tokens", _ARRAY, (_STRING, list(vocab["tokens"]))),
            ("tokenizer.ggml.token_type", _ARRAY, (_I32, [int(t) for t in vocab["types"]])),
            ("tokenizer.ggml.merges", _ARRAY, (_STRING, list(vocab["merges"]))),
        ]
    for key in ("bos_token_id", "eos_token_id"):
        token = getattr(config, key)
        if token is not None and token < config.vocab_size:
            kv.append((f"tokenizer.ggml.{key}", _U32, token))
    return kv


def _write_header(f: BinaryIO, kv: list[tuple], plan: list[tuple[str, tuple[int, ...], str]]) -> list[int]:
    """Magic, version 3, counts, key/values and tensor infos; returns each tensor's absolute offset."""
    sizes = [_nbytes(dims, kind) for _, dims, kind in plan]
    relative, at = [], 0
    for size in sizes:
        relative.append(at)
        at = _aligned(at + size)
    f.write(MAGIC + struct.pack("<IQQ", 3, len(plan), len(kv)))
    for key, type_id, value in kv:
        f.write(_string(key) + struct.pack("<I", type_id))
        f.write(b"".join(_value(type_id, value)))
    for (gguf_name, dims, kind), offset in zip(plan, relative):
        f.write(_string(gguf_name) + struct.pack("<I", len(dims)))
        f.write(struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", TYPE_IDS[kind], offset))
    start = _aligned(f.tell())
    f.write(b"\0" * (start - f.tell()))
    return [start + r for r in relative]


def _nbytes(dims: tuple[int, ...], kind: str) -> int:
    _, block, block_bytes = GGML_TYPES[TYPE_IDS[kind]]
    n = 1
    for d in dims:
        n *= d
    return n // block * block_bytes


def _aligned(n: int) -> int:
    return (n + DEFAULT_ALIGNMENT - 1) // DEFAULT_ALIGNMENT * DEFAULT_ALIGNMENT


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(type_id: int, value: Any) -> Iterator[bytes]:
    if type_id == _STRING:
        yield _string(value)
    elif type_id == _ARRAY:
        item, items = value
        yield struct.pack("<IQ", item, len(items))
        if item == _STRING:
            yield from (_string(v) for v in items)
        else:
            yield np.asarray(items, dtype={_I32: "<i4", _U32: "<u4", _F32: "<f4"}[item]).tobytes()
    else:
        yield struct.pack({_U32: "<I", _I32: "<i", _F32: "<f", _U64: "<Q", _U8: "<B", _BOOL: "<?"}[type_id],
                          value)
