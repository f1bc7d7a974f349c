"""Hostile GGUF files: each is one WeightsError/ConfigError line at once (exit 2 from the CLI, no
traceback), in bounded memory: never a hang, a huge allocation, a read outside the file or a
model that computes something else.

The files are built byte by byte here (``gguf_bytes``), independently of our writer, from a
valid tiny GPT-2 in llama.cpp's layout; each hostile one differs from it by the attack it
carries (the unedited one loads: ``test_the_unedited_file_loads``)."""

from __future__ import annotations

import struct
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import opswitch
from opswitch.cli.main import main
from opswitch.core.errors import OpswitchError
from opswitch.model.gguf_load import load_gguf
from opswitch.model.gguf_read import GGUFFile

U32, I32, F32, STRING, ARRAY, U64 = 4, 5, 6, 8, 9, 10
E, V, CTX, LAYERS, HEADS = 32, 40, 16, 1, 2  # n_embd a whole q8_0 block


def s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, type_id: int, value) -> bytes:
    if type_id == STRING:
        payload = s(value)
    elif type_id == ARRAY:
        item, items = value
        payload = struct.pack("<IQ", item, len(items)) + b"".join(
            s(i) if item == STRING else struct.pack("<i", i) for i in items)
    else:
        payload = struct.pack({U32: "<I", I32: "<i", F32: "<f", U64: "<Q"}[type_id], value)
    return s(key) + struct.pack("<I", type_id) + payload


def hparams(**changes) -> dict:
    values = {"general.architecture": (STRING, "gpt2"), "gpt2.context_length": (U32, CTX),
              "gpt2.embedding_length": (U32, E), "gpt2.feed_forward_length": (U32, 4 * E),
              "gpt2.block_count": (U32, LAYERS), "gpt2.attention.head_count": (U32, HEADS),
              "gpt2.attention.layer_norm_epsilon": (F32, 1e-5)}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """The tiny GPT-2 in ggml's layout (numpy shapes: rows = output channels)."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (V, E), "position_embd.weight": (CTX, E)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (E,), b + "attn_norm.bias": (E,),
                       b + "attn_qkv.weight": (3 * E, E), b + "attn_qkv.bias": (3 * E,),
                       b + "attn_output.weight": (E, E), b + "attn_output.bias": (E,),
                       b + "ffn_norm.weight": (E,), b + "ffn_norm.bias": (E,),
                       b + "ffn_up.weight": (4 * E, E), b + "ffn_up.bias": (4 * E,),
                       b + "ffn_down.weight": (E, 4 * E), b + "ffn_down.bias": (E,)})
    shapes.update({"output_norm.weight": (E,), "output_norm.bias": (E,)})
    return {n: (rng.standard_normal(shape) * 0.2).astype(np.float32) for n, shape in shapes.items()}


def gguf_bytes(meta: dict | None = None, arrays: dict | None = None, *, magic=b"GGUF", version=3,
               n_tensors=None, n_kv=None, infos=None, extra_kv=b"", alignment=32) -> bytes:
    """A GGUF file from parts; ``infos`` replaces the tensor-info records (name, dims, type, offset)."""
    meta = hparams() if meta is None else meta
    arrays = tensors() if arrays is None else arrays
    body = b"".join(kv(k, t, v) for k, (t, v) in meta.items()) + extra_kv
    data, records, at = b"", [], 0
    for name, a in arrays.items():
        raw = a.tobytes()
        type_id = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}.get(a.dtype, 8)
        dims = list(reversed(a.shape)) if type_id != 8 else [a.shape[1] // 34 * 32, a.shape[0]]
        records.append((name, dims, type_id, at))
        data += raw + b"\0" * (-len(raw) % alignment)
        at = len(data)
    infos = records if infos is None else infos
    header = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(meta) + (1 if extra_kv else 0) if n_kv is None else n_kv)
    header += body
    for name, dims, type_id, offset in infos:
        header += s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        header += struct.pack("<IQ", type_id, offset)
    return header + b"\0" * (-len(header) % alignment) + data


def save(tmp_path: Path, raw: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def refused(path: Path, match: str) -> str:
    """Loading ``path`` is one OpswitchError line holding ``match``, within a small allocation."""
    tracemalloc.start()
    try:
        with pytest.raises(OpswitchError) as info:
            opswitch.load_model(path, backend="naive")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message and match in message, message
    assert peak < 8 << 20, f"{peak} bytes allocated refusing {path.name}"
    return message


def test_the_unedited_file_loads(tmp_path):
    lm = opswitch.load_model(save(tmp_path, gguf_bytes()), backend="naive")
    assert lm.config.n_embd == E and lm.config.vocab_size == V and lm.tokenizer is None
    assert lm.generate_ids([1, 2, 3], max_new_tokens=2, temperature=0).new_ids


def _blk_infos(changes: dict):
    infos = []
    at = 0
    for name, a in tensors().items():
        infos.append([name, list(reversed(a.shape)), 0, at])
        at += a.nbytes + (-a.nbytes % 32)
    for i, change in changes.items():
        for field, value in change if isinstance(change, list) else [change]:
            infos[i][field] = value
    return [tuple(r) for r in infos]


HUGE = 2**62
CASES = {
    "wrong magic": (lambda: gguf_bytes(magic=b"GGML"), "not the GGUF magic"),
    "version 1": (lambda: gguf_bytes(version=1), "versions 2 and 3"),
    "big-endian": (lambda: gguf_bytes(version=3 << 24), "big-endian"),
    "huge kv count": (lambda: gguf_bytes(n_kv=HUGE), "key/value pairs"),
    "huge tensor count": (lambda: gguf_bytes(n_tensors=HUGE), "tensors"),
    "huge string length": (lambda: gguf_bytes(extra_kv=struct.pack("<Q", HUGE) + b"x"), "bytes"),
    "huge array count": (lambda: gguf_bytes(extra_kv=s("a") + struct.pack("<IIQ", ARRAY, U32, 2**40)),
                         "items"),
    "array just over its bytes": (
        lambda: gguf_bytes(extra_kv=s("a") + struct.pack("<IIQ", ARRAY, U64, 10**6)), "numbers"),
    "nested array": (lambda: gguf_bytes(extra_kv=s("a") + struct.pack("<IIQ", ARRAY, ARRAY, 1)), "nested"),
    "unknown value type": (lambda: gguf_bytes(extra_kv=s("a") + struct.pack("<I", 77)), "value type 77"),
    "string not utf-8": (lambda: gguf_bytes(extra_kv=struct.pack("<Q", 2) + b"\xff\xfe"), "UTF-8"),
    "duplicate key": (lambda: gguf_bytes(extra_kv=kv("gpt2.block_count", U32, 1)), "twice"),
    "alignment not a power of two": (lambda: gguf_bytes(hparams(**{"general.alignment": (U32, 24)})),
                                     "power of two"),
    "dims product beyond the file": (lambda: gguf_bytes(infos=_blk_infos({0: (1, [2**32, 2**32])})),
                                     "data section"),
    "dims product overflowing 64 bits": (lambda: gguf_bytes(infos=_blk_infos({0: (1, [2**63, 2**62, 8])})),
                                         "data section"),
    "zero dimension": (lambda: gguf_bytes(infos=_blk_infos({0: (1, [E, 0])})), "empty dimension"),
    "five dimensions": (lambda: gguf_bytes(infos=_blk_infos({0: (1, [1, 1, 1, 1, E * V])})), "dimensions"),
    "offset outside the file": (lambda: gguf_bytes(infos=_blk_infos({3: (3, 2**40)})), "data section"),
    "misaligned offset": (lambda: gguf_bytes(infos=_blk_infos({3: (3, 8)})), "alignment"),
    "overlapping tensors": (lambda: gguf_bytes(infos=_blk_infos({3: (3, 0)})), "overlaps"),
    "unknown tensor type": (lambda: gguf_bytes(infos=_blk_infos({0: (2, 99)})), "unknown GGML type 99"),
    "q8_0 rows not whole blocks": (lambda: gguf_bytes(infos=_blk_infos({0: [(2, 8), (1, [16, 2])]})),
                                   "not blocks of 32"),
    "integer weights": (lambda: gguf_bytes(infos=_blk_infos({0: (2, 26)})), "not a float type"),
    "duplicate tensor name": (lambda: gguf_bytes(infos=_blk_infos({3: (0, "blk.0.attn_norm.weight")})),
                              "twice"),
    "name too long": (lambda: gguf_bytes(infos=_blk_infos({3: (0, "x" * 80)})), "longer than 63"),
    "unknown architecture": (lambda: gguf_bytes(hparams(**{"general.architecture": (STRING, "llama")})),
                             "architecture 'llama': not supported"),
    "no architecture": (lambda: gguf_bytes(hparams(**{"general.architecture": None})), "not supported"),
    "missing hyper-parameter": (lambda: gguf_bytes(hparams(**{"gpt2.block_count": None})),
                                "gpt2.block_count is missing"),
    "hyper-parameter of the wrong type": (
        lambda: gguf_bytes(hparams(**{"gpt2.context_length": (STRING, "16")})), "not a number"),
    "a billion layers": (lambda: gguf_bytes(hparams(**{"gpt2.block_count": (U32, 10**9)})), "block_count"),
    "heads not dividing the width": (lambda: gguf_bytes(hparams(**{"gpt2.attention.head_count": (U32, 5)})),
                                     "not divisible"),
    "grouped-query attention": (lambda: gguf_bytes(hparams(**{"gpt2.attention.head_count_kv": (U32, 1)})),
                                "grouped-query"),
    "missing tensor": (
        lambda: gguf_bytes(arrays={k: v for k, v in tensors().items() if "ffn_down.bias" not in k}),
        "lacks 1 tensor"),
    "unexpected tensor": (
        lambda: gguf_bytes(arrays={**tensors(), "blk.0.attn_q.weight": np.zeros((E, E), np.float32)}),
        "blk.0.attn_q.weight"),
    "shape against the hyper-parameters": (
        lambda: gguf_bytes(hparams(**{"gpt2.context_length": (U32, 32)})), "position_embd.weight has dims"),
    "wrong width": (
        lambda: gguf_bytes(hparams(**{"gpt2.feed_forward_length": (U32, 3 * E)})), "ffn_up.weight"),
    "NaN in f32 weights": (
        lambda: gguf_bytes(arrays={**tensors(), "blk.0.attn_qkv.weight": np.full((3 * E, E), np.nan, "f4")}),
        "non-finite"),
    "Inf in f16 weights": (lambda: gguf_bytes(arrays={**tensors(), "token_embd.weight":
                                                      np.full((V, E), np.inf, np.float16)}), "non-finite"),
    "NaN q8_0 block scale": (
        lambda: gguf_bytes(arrays={**tensors(), "token_embd.weight": _q8_nan_scale()}),
        "non-finite block scales"),
}


def _q8_nan_scale() -> np.ndarray:
    blocks = np.zeros((V, 34), np.uint8)
    blocks[:, :2] = np.array([np.nan], np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_hostile_file_is_one_line_in_bounded_memory(tmp_path, case):
    build, match = CASES[case]
    refused(save(tmp_path, build()), match)


@pytest.mark.parametrize("case", ["huge tensor count", "overlapping tensors", "unknown architecture",
                                  "NaN in f32 weights", "missing tensor"])
def test_the_cli_exits_2_with_one_line(tmp_path, case, capsys):
    path = save(tmp_path, CASES[case][0]())
    assert main(["generate", "--model", str(path), "--prompt", "Hi", "--backend", "naive"]) == 2
    assert CASES[case][1] in one_error_line(capsys)
    if case in ("huge tensor count", "overlapping tensors"):  # inspect reads the header: same check
        assert main(["inspect", str(path)]) == 2
        one_error_line(capsys)


def test_a_file_truncated_anywhere_is_refused(tmp_path):
    raw = gguf_bytes()
    data_start = len(raw) - sum(a.nbytes + (-a.nbytes % 32) for a in tensors().values())
    cuts = sorted({0, 3, 4, 7, 8, 16, 23, *range(24, data_start, 37), data_start - 1, data_start,
                   data_start + 100, len(raw) - 1})
    for cut in cuts:
        refused(save(tmp_path, raw[:cut]), "")


def test_special_files_and_missing_ones(tmp_path):
    import os

    refused(tmp_path / "absent.gguf", "does not exist")
    (tmp_path / "dir.gguf").mkdir()
    refused(tmp_path / "dir.gguf", "a directory")
    os.mkfifo(tmp_path / "fifo.gguf")
    refused(tmp_path / "fifo.gguf", "a FIFO")  # never opened for reading: no hang


# -- fuzz: whatever the bytes, a result or an OpswitchError --------------------------------------

FUZZ = settings(max_examples=120, deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VALID = gguf_bytes()
HEADER = len(VALID) - sum(a.nbytes + (-a.nbytes % 32) for a in tensors().values())

edits = st.lists(
    st.tuples(st.integers(0, HEADER + 64), st.sampled_from(["set", "insert", "delete"]),
              st.one_of(st.binary(min_size=1, max_size=8),
                        st.sampled_from([b"\xff" * 8, struct.pack("<Q", 2**63), struct.pack("<I", 9)]))),
    min_size=1, max_size=4)


@FUZZ
@given(edits)
def test_fuzzed_headers_give_a_model_or_one_error_line(changes):
    raw = bytearray(VALID)
    for at, how, blob in changes:
        at = min(at, len(raw))
        if how == "set":
            raw[at:at + len(blob)] = blob
        elif how == "insert":
            raw[at:at] = blob
        else:
            del raw[at:at + len(blob)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.gguf"
        path.write_bytes(bytes(raw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                GGUFFile(path).close()
                load_gguf(path)
            except OpswitchError as exc:
                assert "\n" not in str(exc) and len(str(exc)) < 1000, str(exc)
