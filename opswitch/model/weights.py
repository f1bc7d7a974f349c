"""GPT-2 weights from and to Hugging Face model directories.

``load_gpt2`` turns ``config.json`` + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) into picoGPT-style nested params, named
like the checkpoint so the forward pass can unpack them (``**block``)::

    {"wte": [n_vocab, n_embd], "wpe": [n_ctx, n_embd],
     "h": [{"ln_1": {"weight", "bias"},
            "attn": {"c_attn": {"weight": [n_embd, 3*n_embd], "bias"},
                     "c_proj": {"weight": [n_embd, n_embd], "bias"}},
            "ln_2": {...},
            "mlp": {"c_fc": {"weight": [n_embd, d_ff], "bias"},
                    "c_proj": {"weight": [d_ff, n_embd], "bias"}}}, ...],
     "ln_f": {"weight", "bias"}}

plus ``"lm_head": [n_vocab, n_embd]`` only when the checkpoint's output
projection differs from ``wte`` (otherwise the embedding is tied).  Linear
weights are ``[in, out]`` because HF's GPT-2 stores Conv1D weights that way.
Every array is read-only float32; F32 files are memory-mapped, not copied.

Everything is checked against the config before a single op runs, so a
wrong file fails here with the file and tensor named, not as a shape error
deep in the forward pass.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from opswitch.core.errors import ConfigError, ModelNotFoundError, WeightsError
from opswitch.core.files import INDEX_LIMIT, read_json
from opswitch.model.config import GPT2Config
from opswitch.model.safetensors import (
    FLOAT_DTYPES,
    PICKLE_SUFFIXES,
    SafetensorsFile,
    atomic_write,
    refuse_pickle,
    save_safetensors,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# GPT2LMHeadModel checkpoints prefix the body with "transformer."; GPT2Model ones (and
# OpenAI's converted gpt2 on the hub) do not.  Old ones also hold the causal-mask buffers.
_PREFIX = "transformer."
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER = re.compile(r"h\.(\d+)\.")
# Params keys that are arrays themselves rather than {"weight": ...} dicts.
_BARE = {"wte": "wte.weight", "wpe": "wpe.weight", "lm_head": "lm_head.weight"}

Params = dict[str, Any]


def load_gpt2(path: str | Path) -> tuple[GPT2Config, Params]:
    """Read a GPT-2 model directory into (config, nested float32 params).

    ``path`` may also be one ``.safetensors`` file: that file is loaded, with
    the config.json beside it.
    """
    target = Path(path)
    if not os.path.lexists(target):
        raise ModelNotFoundError(f"{target} does not exist; pass a model directory (config + weights)")
    if target.is_dir():
        directory = target
        shards, source = _weight_files(directory)
    else:
        refuse_pickle(target)
        if target.suffix != ".safetensors":
            raise WeightsError(
                f"{target} is not a model directory or a .safetensors file; pass the model directory"
            )
        directory = target.parent
        shards, source = {target: None}, target
    config_path = directory / CONFIG_NAME
    config = GPT2Config.from_json(config_path)

    files = [SafetensorsFile(p) for p in shards]
    try:
        found = _gather(files, shards)
        shapes = {name: f.info(stored)[1] for name, (f, stored) in found.items()}

        def where(name: str) -> str:
            return str(found[name][0].path if name in found else source)

        _check_fit(config, shapes, where, str(config_path))
        for name, (f, stored) in found.items():
            dtype = f.info(stored)[0]
            if dtype not in FLOAT_DTYPES:
                raise WeightsError(
                    f"{name} in {f.path} is {dtype}; opswitch reads weights stored as "
                    f"{', '.join(FLOAT_DTYPES)} — re-save the model with float32 weights"
                )
        flat = {name: f.get_float32(stored) for name, (f, stored) in found.items()}
        for name, a in flat.items():
            _check_finite(name, a, found[name][0].path)
    finally:
        for f in files:
            f.close()

    head = flat.pop("lm_head.weight", None)
    params = nest_params(flat, config.n_layer)
    if head is not None and not np.array_equal(head, params["wte"]):
        params["lm_head"] = head
    return config, params


def save_gpt2(
    path: str | Path, config: GPT2Config, params: Mapping[str, Any], *, overwrite: bool = False
) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads cleanly.

    Names follow HF's own ``save_pretrained`` for GPT2LMHeadModel
    (``transformer.h.0...``, ``lm_head.weight`` only when untied).  Params
    with a distinct ``lm_head`` are saved with ``tie_word_embeddings=false``
    so the config tells the truth about them.  Existing model files are
    replaced only with ``overwrite=True``, each by an atomic rename; an old
    sharded copy's index and shards (files named ``model-XXXXX-of-XXXXX.safetensors``,
    nothing else) are deleted after the new files are in place.  Between the
    two renames (weights, then config) a crash leaves new weights beside the
    old config: loading then fails with a clear mismatch if their shapes differ.
    """
    directory = Path(path)
    flat = {name: _float32(name, a) for name, a in flatten_params(params).items()}
    head = flat.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, flat.get("wte.weight", np.empty(0))):
        config = replace(config, tie_word_embeddings=False)
    if not config.tie_word_embeddings:
        head = head if head is not None else flat.get("wte.weight")
        if head is not None:
            flat["lm_head.weight"] = head
    _check_fit(config, {n: a.shape for n, a in flat.items()}, lambda _: "params", "the config")

    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME) if os.path.lexists(directory / n)]
    if existing and not overwrite:
        raise WeightsError(
            f"{directory} already holds {', '.join(existing)}; "
            "pass overwrite=True to replace them, or save elsewhere"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot create {directory}: {e.strerror or e}") from None
    stale = _stale_shards(directory) if INDEX_NAME in existing else []
    _remove(directory, _killed_writers_files(directory))
    # Each file is replaced by one rename: a crash leaves it old or new, never half-written.
    # The new model.safetensors wins over an old index from its rename on; the index and
    # the shards it names are removed only once the new files are in place.
    save_safetensors(
        directory / WEIGHTS_NAME,
        {(n if n == "lm_head.weight" else _PREFIX + n): a for n, a in flat.items()},
        metadata={"format": "pt"},
    )
    with atomic_write(directory / CONFIG_NAME) as f:
        f.write((json.dumps(config.to_dict(), indent=2) + "\n").encode("utf-8"))
    _fsync_directory(directory)
    _remove(directory, [INDEX_NAME, *stale] if INDEX_NAME in existing else [])


# HF's shard names (``save_pretrained``'s "model-00001-of-00003.safetensors"): the only
# files an overwrite deletes besides the index, so an index naming vocab.json or
# model.safetensors as a shard cannot make a save delete them.
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# What ``atomic_write`` leaves behind when its process is killed mid-write.
_TEMP = re.compile(rf"\.({re.escape(CONFIG_NAME)}|{re.escape(WEIGHTS_NAME)})\.[0-9a-f]{{12}}\.tmp")


def _stale_shards(directory: Path) -> list[str]:
    """The shard files the directory's old index names, that a save replacing it may delete."""
    try:
        named = set(_read_index(directory / INDEX_NAME).values())
    except WeightsError:  # unreadable: prove nothing, delete nothing but the index
        return []
    return sorted(n for n in named if _SHARD.fullmatch(n) and (directory / n).is_file())


def _killed_writers_files(directory: Path) -> list[str]:
    """Temporary files of a save that was killed before its rename (never loaded: hidden names)."""
    try:
        return sorted(p.name for p in directory.iterdir() if _TEMP.fullmatch(p.name))
    except OSError:
        return []


def _remove(directory: Path, names: list[str]) -> None:
    for name in names:
        try:
            (directory / name).unlink(missing_ok=True)
        except OSError as e:
            raise WeightsError(
                f"saved the model in {directory}, but cannot remove the stale {name}: {e.strerror or e}; "
                "delete it by hand"
            ) from None


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable before anything old is deleted (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _float32(name: str, a: Any) -> np.ndarray:
    try:
        return np.asarray(a, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"cannot save params: {name} is not a float array ({e})") from None


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested params -> {checkpoint name: array}, e.g. ``h.0.attn.c_attn.weight``."""
    flat: dict[str, Any] = {}

    def walk(node: Any, name: str) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, f"{name}.{key}" if name else str(key))
        elif isinstance(node, (list, tuple)):
            for i, child in enumerate(node):
                walk(child, f"{name}.{i}")
        else:
            flat[_BARE.get(name, name)] = node

    walk(params, "")
    return flat


def nest_params(flat: Mapping[str, Any], n_layer: int) -> Params:
    """{checkpoint name: array} -> nested params (the inverse of ``flatten_params``)."""
    bare = {v: k for k, v in _BARE.items()}
    params: Params = {"h": [{} for _ in range(n_layer)]}
    for name, a in flat.items():
        if name in bare:
            params[bare[name]] = a
            continue
        parts = name.split(".")
        node = params["h"][int(parts.pop(1))] if parts[0] == "h" else params.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = a
    return params


def release_pages(a: Any) -> None:
    """Drop a memory-mapped tensor's pages from this process once it has been encoded in
    a reduced format: the f32 file is then not resident beside the encoded copy (peak RSS
    stays near the encoded bytes), and a later ``bind`` reads the pages back from the file.
    A no-op for anything that is not a read-only view of an ``mmap``."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer(mmap) holds a memoryview of it
        base = base.obj
    if not isinstance(base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or base.closed:
        return
    try:
        start = a.ctypes.data - np.frombuffer(base, np.uint8, count=1).ctypes.data
    except (ValueError, BufferError):
        return
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + a.nbytes) // page * page  # whole pages inside it only
    if hi > lo:
        base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def param_count(params: Mapping[str, Any]) -> int:
    """Number of parameters in nested params (a tied embedding counts once)."""
    return sum(int(np.size(a)) for a in flatten_params(params).values())


# -- reading helpers ------------------------------------------------------------------------

def weight_files(directory: str | Path) -> list[Path]:
    """The files ``load_gpt2(directory)`` reads its weights from (raises if there are none)."""
    return list(_weight_files(Path(directory))[0])


def _weight_files(directory: Path) -> tuple[dict[Path, list[str] | None], Path]:
    """({shard: tensor names it must hold, None meaning all}, file to blame for missing tensors)."""
    single = directory / WEIGHTS_NAME
    if os.path.lexists(single):  # a FIFO or dangling link here is refused by the reader, not skipped
        return {single: None}, single
    index = directory / INDEX_NAME
    if os.path.lexists(index):
        shards: dict[Path, list[str] | None] = {}
        for name, shard in _read_index(index).items():
            shards.setdefault(directory / shard, []).append(name)  # type: ignore[union-attr]
        absent = sorted(p.name for p in shards if not os.path.lexists(p))
        if absent:
            raise WeightsError(
                f"{index} lists {len(absent)} shard(s) not in {directory}: {_few(absent)}; download them"
            )
        return shards, index
    pickles = sorted(p for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    others = sorted(p.name for p in directory.glob("*.safetensors") if p.is_file())
    hint = f" (it holds {_few(others)}: rename the model's file to {WEIGHTS_NAME})" if others else ""
    raise WeightsError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}{hint}")


def _read_index(index: Path) -> dict[str, str]:
    """The validated weight_map of a sharded checkpoint: {tensor name: shard file name}."""
    data = read_json(index, what="index", limit=INDEX_LIMIT, error=WeightsError, missing="re-save the model")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index} has no weight_map object; re-download or re-save the model")
    for name, shard in weight_map.items():
        # Plain file names only: an index must not point outside its directory.
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise WeightsError(
                f"{index}: weight_map[{name!r}] = {shard!r} is not a file name in the model directory; "
                "re-download or re-save the model"
            )
        if not shard.endswith(".safetensors"):  # never vocab.json, nor a killed writer's .tmp file
            raise WeightsError(
                f"{index}: weight_map[{name!r}] = {shard!r} is not a .safetensors file; "
                "re-download or re-save the model"
            )
    return weight_map


def _gather(
    files: list[SafetensorsFile], shards: Mapping[Path, list[str] | None]
) -> dict[str, tuple[SafetensorsFile, str]]:
    """{checkpoint name without "transformer.": (file, name stored in it)}, buffers dropped."""
    found: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in files:
        wanted = shards[f.path]
        for stored in f.names if wanted is None else wanted:
            if stored not in f:
                raise WeightsError(
                    f"{INDEX_NAME} maps {stored!r} to {f.path}, which lacks it; re-download the model"
                )
            name = stored.removeprefix(_PREFIX)
            if _BUFFER.fullmatch(name):
                continue
            if name in found:
                raise WeightsError(
                    f"{f.path} holds {name!r} twice (with and without {_PREFIX!r}); re-save the model"
                )
            found[name] = (f, stored)
    return found


def _check_finite(name: str, a: np.ndarray, path: Path) -> None:
    """Refuse NaN/Inf weights: they turn every logit into NaN, which greedy decoding
    would silently read as token 0.  One float32 sum per tensor (NaN and Inf survive
    it, ~1 ms per million weights); only a non-finite sum pays for the exact check,
    since a sum of large finite weights may overflow on its own."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(a.sum()):
            return
    bad = ~np.isfinite(a)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), a.shape)
        raise WeightsError(
            f"{name} in {path} holds {int(bad.sum())} non-finite value(s) (NaN or Inf, first at "
            f"{list(map(int, first))}); the file is damaged: re-download or re-save the model"
        )


def _few(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _fmt(shape: tuple[int, ...]) -> str:
    return str(list(shape))


def _check_fit(
    config: GPT2Config, shapes: Mapping[str, tuple[int, ...]], where: Callable[[str], str], config_src: str
) -> None:
    """Names and shapes against the config: missing, unexpected, mismatched sizes.

    The layer count comes first: ``param_shapes`` is as long as ``n_layer``
    says, so a config claiming 10**9 layers must fail before it is built.
    """
    layers = {int(m[1]) for name in shapes if (m := _LAYER.match(name))}
    if config.n_layer > len(layers):
        holds = f"{len(layers)} layer(s)" + (f" (h.0 ... h.{max(layers)})" if layers else "")
        raise ConfigError(
            f"{config_src} says n_layer={config.n_layer}, but {where(next(iter(shapes), ''))} holds {holds}; "
            "use the config.json that belongs to these weights"
        )
    want = config.param_shapes()
    optional = {"lm_head.weight": (config.vocab_size, config.n_embd)}
    unexpected = [n for n in shapes if n not in want and n not in optional]
    if unexpected:
        extra_layers = [n for n in unexpected if (m := _LAYER.match(n)) and int(m[1]) >= config.n_layer]
        why = f"{config_src} says n_layer={config.n_layer}" if extra_layers else "GPT-2 has no such weights"
        raise WeightsError(
            f"{where(unexpected[0])} has {len(unexpected)} unexpected tensor(s): {_few(unexpected)}; {why} "
            "— check that the weights and config belong together"
        )
    missing = [n for n in want if n not in shapes]
    if missing:
        raise WeightsError(
            f"{where(missing[0])} lacks {len(missing)} tensor(s) that {config_src} requires: "
            f"{_few(missing)}; re-download or re-save the model"
        )
    # Sizes the config states outright: a mismatch means the config is the wrong one.
    for name, axis, setting in (
        ("wte.weight", 0, f"vocab_size={config.vocab_size}"),
        ("wte.weight", 1, f"n_embd={config.n_embd}"),
        ("wpe.weight", 0, f"n_positions={config.n_positions}"),
        ("h.0.mlp.c_fc.weight", 1, f"n_inner={config.n_inner} (an MLP width of {config.d_ff})"),
    ):
        got, expected = shapes[name], want[name]
        if len(got) == 2 and got[axis] != expected[axis]:
            raise ConfigError(
                f"{config_src} says {setting}, but {name} in {where(name)} has {got[axis]} "
                f"{'rows' if axis == 0 else 'columns'}; use the config.json that belongs to these weights"
            )
    for name, shape in shapes.items():
        expected = want.get(name) or optional[name]
        if tuple(shape) != expected:
            raise WeightsError(
                f"{name} in {where(name)} has shape {_fmt(shape)}, config expects {_fmt(expected)}; "
                "re-download or re-save the model"
            )
