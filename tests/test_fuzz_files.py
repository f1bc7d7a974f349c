"""Fuzzing the files opswitch reads: whatever they hold, the answer is a result or an
OpswitchError — never another exception, never a hang (each example has a deadline)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import expect_result_or_opswitch_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opswitch.core.errors import OpswitchError
from opswitch.model.config import GPT2Config
from opswitch.model.safetensors import _ITEMSIZE, SafetensorsFile
from opswitch.model.weights import load_gpt2
from opswitch.tokenizer import load_tokenizer
from opswitch.tokenizer.bytes_to_unicode import BYTE_TO_UNICODE

FUZZ = settings(
    max_examples=150, deadline=3000, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ints = st.one_of(
    st.integers(-3, 70), st.sampled_from([0, 1, 2**31, 2**63, 10**9, 10**18, -(2**63)]), st.integers()
)
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


# -- safetensors headers ------------------------------------------------------------------------

tensor_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(sorted(_ITEMSIZE)), json_values),
        "shape": st.one_of(st.lists(ints, max_size=3), json_values),
        "data_offsets": st.one_of(st.lists(ints, min_size=2, max_size=2), json_values),
    },
)
headers = st.dictionaries(
    st.one_of(st.sampled_from(["__metadata__", "wte.weight", "a"]), st.text(max_size=5)),
    st.one_of(tensor_entry, json_values),
    max_size=4,
)


def _write_safetensors(path: Path, header_bytes: bytes, data: bytes, claimed: int | None) -> None:
    n = len(header_bytes) if claimed is None else claimed
    path.write_bytes(n.to_bytes(8, "little", signed=False) + header_bytes + data)


def _read_everything(path: Path) -> None:
    with SafetensorsFile(path) as f:
        for name in f.names:
            f.info(name)
            try:
                np.asarray(f.get_float32(name)).sum()
            except OpswitchError:
                pass


@FUZZ
@given(
    header=st.one_of(headers.map(lambda h: json.dumps(h).encode()), st.binary(max_size=200)),
    data=st.binary(max_size=64),
    claimed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_fuzz_safetensors_header(header: bytes, data: bytes, claimed: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        _write_safetensors(path, header, data, claimed)
        expect_result_or_opswitch_error(_read_everything, path)


@FUZZ
@given(data=st.data())
def test_fuzz_consistent_safetensors_headers(data) -> None:
    """Headers whose offsets tile the data: the reader gets past validation and reads tensors."""
    header, offset = {}, 0
    for i in range(data.draw(st.integers(0, 3))):
        dtype = data.draw(st.sampled_from(sorted(_ITEMSIZE)))
        shape = data.draw(st.lists(st.integers(0, 4), max_size=3))
        size = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        _write_safetensors(path, raw, data.draw(st.binary(min_size=offset, max_size=offset)), None)
        expect_result_or_opswitch_error(_read_everything, path)


# -- config.json and the model directory ------------------------------------------------------

GOOD_CONFIG = {"model_type": "gpt2", "vocab_size": 61, "n_positions": 16, "n_embd": 8, "n_layer": 2,
               "n_head": 2, "eos_token_id": 60}
config_keys = st.sampled_from([*GOOD_CONFIG, "n_ctx", "n_inner", "layer_norm_epsilon", "activation_function",
                               "bos_token_id", "tie_word_embeddings", "scale_attn_weights", "hidden_size"])
configs = st.one_of(
    st.dictionaries(config_keys, json_values, max_size=6).map(lambda d: {**GOOD_CONFIG, **d}),
    json_values,
)


@FUZZ
@given(config=st.one_of(configs.map(json.dumps), st.text(max_size=100)))
def test_fuzz_config_json(config: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(config, encoding="utf-8", errors="surrogatepass")
        expect_result_or_opswitch_error(GPT2Config.from_json, path)


@pytest.fixture(scope="module")
def small_model_files(tmp_path_factory) -> bytes:
    """The bytes of a valid model.safetensors for GOOD_CONFIG."""
    from opswitch.bench.models import random_params
    from opswitch.model.weights import save_gpt2

    directory = tmp_path_factory.mktemp("fuzz-model")
    config = GPT2Config.from_dict(GOOD_CONFIG)
    save_gpt2(directory, config, random_params(config))
    return (directory / "model.safetensors").read_bytes()


@FUZZ
@given(
    config=configs,
    index=st.one_of(st.none(), json_values, st.fixed_dictionaries({"weight_map": json_values})),
)
def test_fuzz_model_directory(small_model_files, config, index) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "config.json").write_text(json.dumps(config))
        if index is None:
            (directory / "model.safetensors").write_bytes(small_model_files)
        else:
            (directory / "model-00001-of-00001.safetensors").write_bytes(small_model_files)
            (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        expect_result_or_opswitch_error(load_gpt2, directory)


# -- tokenizer files --------------------------------------------------------------------------

BYTES_VOCAB = {c: i for i, c in enumerate(BYTE_TO_UNICODE)}
vocab_entries = st.dictionaries(
    st.one_of(st.text(min_size=2, max_size=4), st.sampled_from(BYTE_TO_UNICODE), st.text(max_size=4)),
    st.one_of(ints, json_values), max_size=6,
)
vocabs = st.one_of(vocab_entries.map(lambda d: {**BYTES_VOCAB, **d}), json_values)
merges = st.one_of(
    st.just(""),
    st.lists(
        st.one_of(st.tuples(st.sampled_from(BYTE_TO_UNICODE), st.sampled_from(BYTE_TO_UNICODE)).map(" ".join),
                  st.text(max_size=6)),
        max_size=6,
    ).map("\n".join),
)


def _load_and_use(directory: Path, text: str) -> None:
    tok = load_tokenizer(directory)
    ids = tok.encode(text)
    tok.decode(ids)
    tok.encode(text, max_tokens=2)


@FUZZ
@given(vocab=vocabs, merges_txt=merges, text=st.text(max_size=20))
def test_fuzz_vocab_and_merges(vocab, merges_txt: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text(merges_txt, encoding="utf-8", errors="surrogatepass")
        expect_result_or_opswitch_error(_load_and_use, directory, text)


tokenizer_json = st.fixed_dictionaries(
    {
        "model": st.one_of(
            st.fixed_dictionaries({
                "type": st.sampled_from(["BPE", "WordPiece"]),
                "vocab": vocabs,
                "merges": st.lists(st.one_of(st.text(max_size=5), json_values), max_size=4),
            }),
            json_values,
        ),
        "pre_tokenizer": st.one_of(
            st.fixed_dictionaries({"type": st.just("ByteLevel")}, optional={"add_prefix_space": json_values,
                                                                            "use_regex": json_values}),
            json_values,
        ),
    },
    optional={
        "added_tokens": st.one_of(
            st.lists(st.fixed_dictionaries({}, optional={"id": ints, "content": st.text(max_size=5),
                                                         "special": json_values, "lstrip": json_values,
                                                         "rstrip": json_values}), max_size=3),
            json_values,
        ),
        "normalizer": st.one_of(st.none(), st.just({"type": "NFC"}), json_values),
    },
)


@FUZZ
@given(data=st.one_of(tokenizer_json, json_values), text=st.text(max_size=20))
def test_fuzz_tokenizer_json(data, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "tokenizer.json").write_text(json.dumps(data))
        expect_result_or_opswitch_error(_load_and_use, directory, text)
