"""Fuzzing ONNX files: mutations of a small valid export (nodes dropped, duplicated, rewired or
retyped, attributes and dims changed, external data pointed anywhere, bytes corrupted) either
load or raise a one-line OpswitchError: never another exception, a hang (each example has a
deadline) or a large allocation (tracemalloc's peak, numpy's buffers included, is bounded)."""

from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
from helpers import expect_result_or_opswitch_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import require

onnx = require("onnx")

from onnx import AttributeProto, TensorProto  # noqa: E402

from opswitch.model.config import GPT2Config  # noqa: E402
from opswitch.onnx.export import build_model  # noqa: E402
from opswitch.onnx.importer import KNOWN_OPS, load_onnx  # noqa: E402

FUZZ = settings(max_examples=60, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PEAK_LIMIT = 64 << 20  # the model is 10 KB; a check run of it needs well under 1 MB
CONFIG = GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                    bos_token_id=None, eos_token_id=None)


def _params():
    from opswitch.bench.models import random_params

    return random_params(CONFIG, seed=3)


GOOD = {past: build_model(CONFIG, _params(), with_past=past).SerializeToString() for past in (False, True)}

ints = st.one_of(st.integers(-3, 9), st.sampled_from([2**31, 2**40, 2**62, -(2**62)]))
locations = st.sampled_from(["model.data", "../model.data", "/etc/passwd", "", "sub", "link.data",
                             "nope.data", "a\0b", "./model.data", "sub/../model.data"])
counts = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["", "-1", "abc", "1e3", "9" * 30]))
ops = st.sampled_from(sorted(KNOWN_OPS | {"Relu", "Loop", "If"}))


def mutate(model, data) -> None:
    """Apply one drawn mutation to ``model`` in place."""
    graph = model.graph
    nodes = graph.node
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer] + \
        [o for n in nodes for o in n.output]
    kind = data.draw(st.sampled_from(["drop", "duplicate", "rewire", "retype", "attribute", "dims",
                                      "external", "input-dims", "output"]))
    i = data.draw(st.integers(0, len(nodes) - 1))
    if kind == "drop":
        del nodes[i]
    elif kind == "duplicate":
        copy = onnx.NodeProto()
        copy.CopyFrom(nodes[i])
        nodes.insert(data.draw(st.integers(0, len(nodes))), copy)
    elif kind == "rewire" and nodes[i].input:
        k = data.draw(st.integers(0, len(nodes[i].input) - 1))
        nodes[i].input[k] = data.draw(st.one_of(st.sampled_from(names), st.text(max_size=3)))
    elif kind == "retype":
        nodes[i].op_type = data.draw(ops)
    elif kind == "attribute":
        for a in nodes[i].attribute:
            if a.type == AttributeProto.INT:
                a.i = data.draw(ints)
            elif a.type == AttributeProto.INTS and a.ints:
                a.ints[data.draw(st.integers(0, len(a.ints) - 1))] = data.draw(ints)
            elif a.type == AttributeProto.FLOAT:
                a.f = data.draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
            elif a.type == AttributeProto.TENSOR:
                a.t.dims.append(data.draw(st.integers(0, 4)))
    elif kind == "dims":
        t = graph.initializer[data.draw(st.integers(0, len(graph.initializer) - 1))]
        t.dims[:] = data.draw(st.lists(ints, max_size=3))
    elif kind == "external":
        tensors = list(graph.initializer) + [a.t for n in nodes for a in n.attribute
                                             if a.type == AttributeProto.TENSOR]
        t = tensors[data.draw(st.integers(0, len(tensors) - 1))]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=data.draw(locations))
        for key in data.draw(st.lists(st.sampled_from(["offset", "length"]), unique=True)):
            t.external_data.add(key=key, value=data.draw(counts))
    elif kind == "input-dims":
        value = graph.input[data.draw(st.integers(0, len(graph.input) - 1))]
        for d in value.type.tensor_type.shape.dim:
            d.dim_value = data.draw(st.sampled_from([0, 1, 2, 5, 2**40]))
    elif kind == "output":
        graph.output[0].name = data.draw(st.sampled_from(names))


def _load_bounded(path: Path) -> None:
    tracemalloc.start()
    try:
        expect_result_or_opswitch_error(load_onnx, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"loading used {peak:,} bytes at its peak"


def _folder(tmp: str) -> Path:
    folder = Path(tmp) / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.data").write_bytes(np.arange(128, dtype=np.float32).tobytes())
    (Path(tmp) / "model.data").write_bytes(b"outside")
    (folder / "link.data").symlink_to(Path(tmp) / "model.data")
    return folder


@FUZZ
@given(past=st.booleans(), data=st.data())
def test_fuzz_onnx_graphs(past: bool, data) -> None:
    model = onnx.ModelProto()
    model.ParseFromString(GOOD[past])
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(model, data)
    with tempfile.TemporaryDirectory() as tmp:
        path = _folder(tmp) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        _load_bounded(path)


@FUZZ
@given(past=st.booleans(), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_fuzz_onnx_bytes(past: bool, flips, cut) -> None:
    raw = bytearray(GOOD[past])
    for where, value in flips:
        raw[min(int(where * len(raw)), len(raw) - 1)] = value
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    with tempfile.TemporaryDirectory() as tmp:
        path = _folder(tmp) / "model.onnx"
        path.write_bytes(bytes(raw))
        _load_bounded(path)


def test_the_unmutated_model_loads() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _folder(tmp) / "model.onnx"
        for past in (False, True):
            path.write_bytes(GOOD[past])
            assert load_onnx(path)[0] == CONFIG

