"""A GPT-2 from a GGUF file: config from the ``gpt2.*`` keys, params named like HF's checkpoint.

llama.cpp's converter (``convert_hf_to_gguf.py``, class GPT2Model) writes HF's
tensors under ggml names and transposes the Conv1D weights, so every matrix is
stored one output channel per row::

    token_embd.weight      ne [n_embd, n_vocab]   -> wte        [n_vocab, n_embd]
    position_embd.weight   ne [n_embd, n_ctx]     -> wpe        [n_ctx, n_embd]
    blk.N.attn_qkv.weight  ne [n_embd, 3*n_embd]  -> h.N.attn.c_attn.weight [n_embd, 3*n_embd] (transposed)
    blk.N.attn_output      ne [n_embd, n_embd]    -> h.N.attn.c_proj
    blk.N.ffn_up           ne [n_embd, n_ff]      -> h.N.mlp.c_fc
    blk.N.ffn_down         ne [n_ff, n_embd]      -> h.N.mlp.c_proj
    blk.N.attn_norm / ffn_norm, output_norm       -> ln_1 / ln_2, ln_f
    output.weight (only when untied)              -> lm_head

(``ne[0]`` is ggml's contiguous axis, the reduction axis of every matrix.)
The file's storage is kept: f32 tensors are zero-copy views (matrices as
transposed views), f16 and bf16 matrices become ``Stored`` f16/bf16 weights
and q8_0/q4_0 ones ``Stored`` blocks (slices of the mapped file, as
``formats.from_blocks`` takes them).  Other GGML types are decoded with the
``gguf`` package's reference dequantisers and stored as ``OTHER_TYPES_AS``.
Vectors (biases, norms, and ``wpe``, which the model adds rather than
multiplies) are always float32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opswitch.core import formats
from opswitch.core.errors import ConfigError, OpswitchError, WeightsError, shown
from opswitch.model.config import GPT2Config
from opswitch.model.gguf_read import GGUFFile, TensorInfo
from opswitch.model.weights import Params, _check_finite, nest_params

ARCH = "gpt2"
# GGUF name (without ".weight"/".bias") -> our checkpoint name; blk.N.* per layer.
_GLOBAL = {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "output": "lm_head"}
_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
          "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}  # fmt: skip
_BLOCK_NAME = re.compile(r"blk\.(\d{1,9})\.([a-z_]+)\.(weight|bias)")
_BARE = {"wte", "wpe", "lm_head"}  # params keys that are arrays, not {"weight": ...}
# Types we keep as they are, and what every other GGML float type is stored as once
# decoded: 8 bits per value (error <= max|w|/254 per block of 32) is finer than any
# of them (q4_1, q5_*, k-quants), so nothing of the file's precision is lost twice.
NATIVE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
OTHER_TYPES_AS = "q8_0"
_INTEGER_TYPES = ("i8", "i16", "i32", "i64")


@dataclass
class GGUFModel:
    """What a GGUF holds for us: the config, the params, the tokenizer's arrays, notes for the load line."""

    config: GPT2Config
    params: Params
    vocab: dict[str, Any] = field(default_factory=dict)  # tokenizer.ggml.* keys
    notes: list[str] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count


def our_name(gguf_name: str) -> str | None:
    """``blk.3.attn_qkv.weight`` -> ``h.3.attn.c_attn.weight`` (None for names GPT-2 lacks)."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL and kind in ("weight", "bias"):
        ours = _GLOBAL[stem]
        return None if ours in _BARE and kind == "bias" else f"{ours}.{kind}"
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m and m[2] in _BLOCK:
        return f"h.{int(m[1])}.{_BLOCK[m[2]]}.{m[3]}"
    return None


def gguf_name(ours: str) -> str:
    """The inverse of ``our_name``: ``h.3.mlp.c_fc.bias`` -> ``blk.3.ffn_up.bias``."""
    stem, _, kind = ours.rpartition(".")
    if not stem.startswith("h."):
        return f"{ {v: k for k, v in _GLOBAL.items()}[stem] }.{kind}"
    _, layer, rest = stem.split(".", 2)
    return f"blk.{layer}.{ {v: k for k, v in _BLOCK.items()}[rest] }.{kind}"


def role_of(ours: str) -> str:
    """The weight's role (``formats``): tables, linear matrices, or a vector."""
    if ours == "wte.weight":
        return "embedding"
    if ours == "lm_head.weight":
        return "lm_head"
    if ours.endswith(".weight") and (".attn." in ours or ".mlp." in ours):
        return "linear"
    return "vector"


def load_gguf(path: str | Path) -> GGUFModel:
    """Read a GPT-2 GGUF into (config, params, tokenizer arrays), every tensor checked."""
    f = GGUFFile(path)
    try:
        config = read_config(f)
        _check_tensors(f, config)
        model = GGUFModel(config, {}, {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")})
        flat: dict[str, Any] = {}
        others: set[str] = set()
        for name, info in f.tensors.items():
            ours = our_name(name)
            assert ours is not None  # _check_tensors refused the rest
            model.types[info.ggml_type] = model.types.get(info.ggml_type, 0) + 1
            flat[ours] = _tensor(f, info, ours, others)
    finally:
        f.close()
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(model.types.items(), key=lambda kv: -kv[1]))
    model.notes.append(f"GGUF tensors: {counts}")
    if others:
        model.notes.append(f"{', '.join(sorted(others))} tensors decoded and stored as {OTHER_TYPES_AS} "
                           f"(opswitch keeps {', '.join(NATIVE_TYPES)} as they are)")
    model.params = nest_params(flat, config.n_layer)
    return model


def read_config(f: GGUFFile) -> GPT2Config:
    """The hyper-parameters from the ``gpt2.*`` keys (as llama.cpp reads them)."""
    meta = f.metadata
    arch = meta.get("general.architecture")
    if arch != ARCH:
        what = f"architecture {shown(arch)}" if isinstance(arch, str) else "no general.architecture key"
        raise WeightsError(f"{f.path} has {what}: not supported, opswitch runs GGUF architecture 'gpt2'")

    def number(key: str, kind: type = int, required: bool = True) -> Any:
        full = f"{ARCH}.{key}"
        value = meta.get(full)
        if value is None and not required:
            return None
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if not ok:
            got = "missing" if value is None else f"{shown(value)}, not a number"
            raise ConfigError(f"{f.path}: {full} is {got}; the file is damaged or not a llama.cpp GPT-2")
        return value

    n_embd, n_head = number("embedding_length"), number("attention.head_count")
    n_kv = number("attention.head_count_kv", required=False)
    if n_kv is not None and n_kv != n_head:
        raise ConfigError(f"{f.path}: {ARCH}.attention.head_count_kv={n_kv} differs from head_count={n_head};"
                          " GPT-2 has no grouped-query attention")
    d_ff = number("feed_forward_length")
    eps = float(number("attention.layer_norm_epsilon", float))
    # GGUF stores eps as float32 (1e-5 becomes 9.99999974e-06): take the shortest decimal
    # that rounds to it, which is what the original config said.
    eps = float(str(np.float32(eps))) if math.isfinite(eps) else eps
    token_embd = f.tensors.get("token_embd.weight")
    n_vocab = token_embd.dims[-1] if token_embd is not None and len(token_embd.dims) == 2 else 0
    tokens = meta.get("tokenizer.ggml.tokens")
    if not n_vocab:
        n_vocab = len(tokens) if isinstance(tokens, list) else 0
    values: dict[str, Any] = dict(
        vocab_size=n_vocab, n_positions=number("context_length"), n_embd=n_embd,
        n_layer=number("block_count"), n_head=n_head,
        n_inner=None if isinstance(n_embd, int) and d_ff == 4 * n_embd else d_ff,
        layer_norm_epsilon=eps, tie_word_embeddings="output.weight" not in f.tensors,
    )
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        token = meta.get(f"tokenizer.ggml.{key}")
        values[ours] = token if isinstance(token, int) and not isinstance(token, bool) else None
    if values["eos_token_id"] is not None and values["eos_token_id"] >= n_vocab:
        values["eos_token_id"] = None  # no end-of-text token: generation runs to its limit
    try:
        return GPT2Config.from_dict({"model_type": "gpt2", **values}, source=f"{f.path} ({ARCH}.* keys)")
    except ConfigError:
        raise
    except OpswitchError as e:
        raise ConfigError(str(e)) from None


def expected_dims(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor llama.cpp's gpt2 loader asks for, with its ggml dims (``ne``)."""
    e, f, v = config.n_embd, config.d_ff, config.vocab_size
    want: dict[str, tuple[int, ...]] = {"token_embd.weight": (e, v),
                                        "position_embd.weight": (e, config.n_positions)}
    for i in range(config.n_layer):
        b = f"blk.{i}."
        want.update({
            b + "attn_norm.weight": (e,), b + "attn_norm.bias": (e,),
            b + "attn_qkv.weight": (e, 3 * e), b + "attn_qkv.bias": (3 * e,),
            b + "attn_output.weight": (e, e), b + "attn_output.bias": (e,),
            b + "ffn_norm.weight": (e,), b + "ffn_norm.bias": (e,),
            b + "ffn_up.weight": (e, f), b + "ffn_up.bias": (f,),
            b + "ffn_down.weight": (f, e), b + "ffn_down.bias": (e,),
        })  # fmt: skip
    want["output_norm.weight"] = (e,)
    want["output_norm.bias"] = (e,)
    if not config.tie_word_embeddings:
        want["output.weight"] = (e, v)
    return want


def _check_tensors(f: GGUFFile, config: GPT2Config) -> None:
    """Names and dims against the hyper-parameters, before any tensor is read.

    The layer count is checked first: 12 tensors per layer, so a file claiming
    10**9 blocks fails before 10**9 names are built."""
    if 12 * config.n_layer > len(f.tensors):
        raise ConfigError(
            f"{f.path}: {ARCH}.block_count={config.n_layer} needs {12 * config.n_layer + 4} tensors, "
            f"but the file holds {len(f.tensors)}; the file is damaged or incomplete")
    want = expected_dims(config)
    unexpected = [n for n in f.tensors if n not in want]
    if unexpected:
        raise WeightsError(f"{f.path} holds {len(unexpected)} tensor(s) a GPT-2 of {config.n_layer} layers "
                           f"has not: {_few(unexpected)}; is it really a llama.cpp GPT-2?")
    missing = [n for n in want if n not in f.tensors]
    if missing:
        raise WeightsError(f"{f.path} lacks {len(missing)} tensor(s) of its GPT-2: {_few(missing)}; "
                           "the file is incomplete, re-convert it")
    for name, dims in want.items():
        got = f.tensors[name].dims
        if got != dims:
            raise WeightsError(f"{f.path}: tensor {name} has dims {list(got)}, but the {ARCH}.* keys make it "
                               f"{list(dims)} (ggml order); the file is damaged")


def _tensor(f: GGUFFile, info: TensorInfo, ours: str, others: set[str]) -> Any:
    """One tensor as a param: an f32 array (a view of the file where it can be) or a ``Stored``."""
    kind, role = info.ggml_type, role_of(ours)
    if kind in _INTEGER_TYPES:
        raise WeightsError(f"{f.path}: tensor {info.name} is {kind}, not a float type; is it a model?")
    raw = f.raw(info.name)
    where = str(f.path)
    if kind in ("f32", "f64", "f16", "bf16"):
        _check_float(info.name, raw, kind, where)
        if kind in ("f32", "f64") or role == "vector":
            values = _float32(raw, kind)
            return values.T if role == "linear" else values  # a transposed view: no copy
        data = np.ascontiguousarray(raw.T) if role == "linear" else raw
        return formats.Stored(kind, role, data)
    if kind in ("q8_0", "q4_0") and role != "vector":
        stored = formats.from_blocks(kind, role, raw, _logical(info, role))
        scales = formats.block_scales(stored)
        if not np.isfinite(scales).all():
            raise WeightsError(f"{info.name} in {where} holds non-finite block scales (NaN or Inf); "
                               "the file is damaged: re-download or re-convert it")
        return stored
    values = _dequantize(f, info, raw)  # the file's numpy shape, float32
    _check_finite(info.name, values, Path(where))
    if kind not in ("q8_0", "q4_0"):
        others.add(kind)
    if role == "vector":
        return values
    matrix = values.T if role == "linear" else values
    return formats.encode(matrix, OTHER_TYPES_AS if OTHER_TYPES_AS in formats.FORMATS else "f16", role)


def _logical(info: TensorInfo, role: str) -> tuple[int, int]:
    """Our shape of a matrix: [n_in, n_out] for linear (ne as it is), [rows, n] for tables."""
    return (info.dims[0], info.dims[1]) if role == "linear" else (info.dims[1], info.dims[0])


def _float32(raw: np.ndarray, kind: str) -> np.ndarray:
    if kind == "f32":
        return raw
    if kind == "bf16":
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        with np.errstate(over="ignore"):
            out = raw.astype(np.float32)
    out.setflags(write=False)
    return out


def _check_float(name: str, raw: np.ndarray, kind: str, where: str) -> None:
    """Non-finite weights turn every logit into NaN: refuse them as the safetensors loader does."""
    if kind == "bf16":
        bad = int(np.count_nonzero((raw & 0x7F80) == 0x7F80))
        if bad:
            raise WeightsError(f"{name} in {where} holds {bad} non-finite value(s) (NaN or Inf); the file is "
                               "damaged: re-download or re-convert it")
        return
    _check_finite(name, raw, Path(where))


def _dequantize(f: GGUFFile, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """Any other GGML type through ``gguf``'s own reference dequantisers (numpy; optional)."""
    if info.ggml_type in ("q8_0", "q4_0"):  # a quantised vector (wpe): our own decoder
        return formats.decode(formats.from_blocks(info.ggml_type, "embedding", raw, info.shape))
    try:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise WeightsError(
            f"{f.path}: tensor {info.name} is {info.ggml_type}; decoding it needs the gguf package "
            "(pip install 'opswitch[gguf]'), or convert the model to f16, q8_0 or q4_0") from None
    try:
        values = dequantize(raw, GGMLQuantizationType(info.type_id))
    except (NotImplementedError, ValueError) as e:
        raise WeightsError(f"{f.path}: tensor {info.name} is {info.ggml_type}, which opswitch cannot decode "
                           f"({e}); convert the model to f16, q8_0 or q4_0") from None
    return np.asarray(values, dtype=np.float32).reshape(info.shape)


def _few(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")

