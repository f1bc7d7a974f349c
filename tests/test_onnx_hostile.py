"""Hostile ONNX files: each is a one-line OnnxError at once, never a hang, a read outside the
model's folder, a huge allocation or a model that computes something else.

The hostile graphs are our own export of a tiny GPT-2, edited with ``onnx.helper``, so each
differs from a good file by exactly the attack it carries (the unedited file loads: see
``test_the_unedited_files_load``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from support import require

onnx = require("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from opswitch.cli.main import main  # noqa: E402
from opswitch.model.weights import flatten_params  # noqa: E402
from opswitch.onnx import OnnxError  # noqa: E402
from opswitch.onnx.export import build_model  # noqa: E402
from opswitch.onnx.importer import load_onnx  # noqa: E402


@pytest.fixture(scope="module")
def models(tiny_config, tiny_params):
    """Fresh ModelProtos of the tiny GPT-2 (n_positions 48), without and with the KV cache."""
    return {past: build_model(tiny_config, tiny_params, with_past=past).SerializeToString()
            for past in (False, True)}


def fresh(models, past: bool = False):
    model = onnx.ModelProto()
    model.ParseFromString(models[past])
    return model


def save(model, directory: Path, name: str = "model.onnx") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(model.SerializeToString())
    return path


def refused(path: Path, match: str, seconds: float = 60) -> str:
    """The one-line OnnxError loading ``path`` raises within ``seconds`` (a hang fails, not stalls,
    the suite: the load runs in a daemon thread)."""
    result: list = []

    def load():
        try:
            load_onnx(path)
            result.append(None)
        except Exception as e:  # checked below: it must be an OnnxError
            result.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"loading {path} did not finish in {seconds} s"
    assert isinstance(result[0], OnnxError), repr(result[0])
    message = str(result[0])
    assert "\n" not in message and match in message, message
    return message


def node(model, op: str, index: int = 0):
    return [n for n in model.graph.node if n.op_type == op][index]


def rename_output(model, old: str, new: str) -> None:
    """Make the node that computes ``old`` compute ``new`` (so a new node can compute ``old``)."""
    for n in model.graph.node:
        for i, o in enumerate(n.output):
            if o == old:
                n.output[i] = new
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new


def const(name: str, value, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype)))


def test_the_unedited_files_load(models, tmp_path, tiny_params):
    for past in (False, True):
        config, params = load_onnx(save(fresh(models, past), tmp_path / str(past)))
        assert config.n_positions == 48
        ours = flatten_params(tiny_params)
        assert all(np.array_equal(a, ours[n]) for n, a in flatten_params(params).items())


# ------------------------------------------------------------------ the file itself
SPECIAL_FILES = textwrap.dedent("""
    import json, os, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # eating memory fails, not the machine
    from opswitch.core.errors import OpswitchError
    from opswitch.onnx.importer import load_onnx
    out = {}
    for path in sys.argv[1:]:
        try:
            load_onnx(path)
            out[path] = "loaded"
        except OpswitchError as e:
            out[path] = str(e)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_a_device_a_directory_or_a_huge_file_named_onnx_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo.onnx")
    (tmp_path / "zero.onnx").symlink_to("/dev/zero")
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "dangling.onnx").symlink_to(tmp_path / "nowhere")
    with open(tmp_path / "huge.onnx", "wb") as f:  # sparse: 3 GB claimed, nothing written
        f.truncate(3 << 30)
    names = ["fifo.onnx", "zero.onnx", "dir.onnx", "dangling.onnx", "huge.onnx"]
    r = subprocess.run([sys.executable, "-c", SPECIAL_FILES, *(str(tmp_path / n) for n in names)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr[-2000:]
    out = {Path(k).name: v for k, v in json.loads(r.stdout).items()}
    assert "is a FIFO, not a file" in out["fifo.onnx"]
    assert "is a character device, not a file" in out["zero.onnx"]
    assert "is a directory, not a file" in out["dir.onnx"]
    assert "dangling link" in out["dangling.onnx"]
    assert "more than any ONNX model file" in out["huge.onnx"]


def test_the_cli_names_the_special_file(tmp_path, capsys):
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "t.txt").write_text("Hello.")
    assert main(["eval", "--model", str(tmp_path / "dir.onnx"), "--text", str(tmp_path / "t.txt"),
                 "--backend", "naive"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory, not a file" in err


# ------------------------------------------------------------------ the graph's shape
def test_a_cycle_is_refused_at_once(models, tmp_path):
    """Two Identity nodes feeding each other, one of them standing in for a layer norm's scale:
    a producer chain without a visited set follows them forever."""
    model = fresh(models)
    ln = node(model, "LayerNormalization")
    model.graph.node.extend([helper.make_node("Identity", ["cycle_b"], ["cycle_a"], name="A"),
                             helper.make_node("Identity", ["cycle_a"], ["cycle_b"], name="B")])
    ln.input[1] = "cycle_a"
    refused(save(model, tmp_path), "before any node computes it (the graph has a cycle")


def test_a_value_computed_twice_is_refused(models, tmp_path):
    model = fresh(models)
    tanh = node(model, "Tanh")
    model.graph.node.append(helper.make_node("Neg", [tanh.input[0]], [tanh.output[0]], name="again"))
    refused(save(model, tmp_path), "already has a value")


def test_a_node_off_the_logits_path_is_refused_before_it_runs(models, tmp_path):
    """One ConstantOfShape no output needs: the old check ran it (gigabytes)."""
    model = fresh(models)
    model.graph.node.extend([const("waste_shape", [2**15, 2**15]),
                             helper.make_node("ConstantOfShape", ["waste_shape"], ["waste"], name="Waste")])
    refused(save(model, tmp_path), "does not contribute to the logits")


def test_a_huge_value_on_the_logits_path_is_refused_before_it_is_allocated(models, tmp_path):
    """A ConstantOfShape of 2^40 zeros sliced back to one and added to the residual stream."""
    model = fresh(models)
    ln_f = node(model, "LayerNormalization", -1)
    at = list(model.graph.node).index(ln_f)
    nodes = list(model.graph.node)
    nodes[at:at] = [
        const("big_shape", [2**20, 2**20]),
        helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="Big",
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        const("zero2", [0, 0]), const("one2", [1, 1]),
        helper.make_node("Slice", ["big", "zero2", "one2"], ["tiny"], name="Tiny"),
        helper.make_node("Add", [ln_f.input[0], "tiny"], ["with_tiny"], name="AddTiny"),
    ]
    ln_f.input[0] = "with_tiny"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    refused(save(model, tmp_path), "at ConstantOfShape node 'Big' (it would need")


def test_the_check_runs_on_our_lengths_not_the_declared_ones(models, tmp_path, tiny_params):
    """input_ids declared [1, 2^40]: the old check allocated that many ids."""
    model = fresh(models)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = 1, 2**40
    _, params = load_onnx(save(model, tmp_path))
    assert np.array_equal(flatten_params(params)["wte.weight"], flatten_params(tiny_params)["wte.weight"])


# ------------------------------------------------------------------ graphs that compute something else
def negate_past(model, threshold: int, where: str = "logits") -> None:
    """value := Where(position < threshold, value, -value), on the positions the graph computes;
    the value is the logits, or the residual stream going into the final layer norm."""
    positions = node(model, "Range").output[0]
    if where == "logits":
        rename_output(model, "logits", "clean")
        target, at = "logits", len(model.graph.node)
    else:
        ln_f = node(model, "LayerNormalization", -1)
        at = list(model.graph.node).index(ln_f)
        target, ln_f.input[0] = ln_f.input[0], "switched"
        rename_output(model, target, "clean")
        ln_f.input[0], target = "switched", "switched"
    nodes = list(model.graph.node)
    nodes[at:at] = [
        const("axis_last", [1]), const("threshold", threshold),
        helper.make_node("Unsqueeze", [positions, "axis_last"], ["pos_column"], name="PosColumn"),
        helper.make_node("Less", ["pos_column", "threshold"], ["early"], name="Early"),
        helper.make_node("Neg", ["clean"], ["negated"], name="Negate"),
        helper.make_node("Where", ["early", "clean", "negated"], [target], name="Switch"),
    ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


@pytest.mark.parametrize("past", [False, True], ids=["plain", "with-past"])
@pytest.mark.parametrize("threshold", [5, 40, 10**6])
def test_logits_changed_after_the_head_are_refused_by_the_graphs_shape(models, tmp_path, past, threshold):
    """Past any position, even one no check run could reach."""
    model = fresh(models, past)
    negate_past(model, threshold)
    refused(save(model, tmp_path), "before the logits; a GPT-2 computes nothing after its head")


@pytest.mark.parametrize("past", [False, True], ids=["plain", "with-past"])
@pytest.mark.parametrize("threshold", [5, 40])
def test_a_residual_negated_past_a_position_is_refused_by_the_check_run(models, tmp_path, past, threshold):
    model = fresh(models, past)
    negate_past(model, threshold, "residual")
    refused(save(model, tmp_path), "the graph's own logits differ from the GPT-2 opswitch built")


def test_a_graph_without_the_causal_mask_is_refused_even_if_it_declares_one_token(models, tmp_path):
    """mask := Greater(k, q) And Greater(q, k), never true; declared length 1 (the old check's)."""
    model = fresh(models)
    greater = node(model, "Greater")
    at = list(model.graph.node).index(greater)
    model.graph.node.insert(at + 1, helper.make_node("Greater", list(reversed(greater.input)), ["flipped"]))
    model.graph.node.insert(at + 2, helper.make_node("And", ["mask_raw", "flipped"], [greater.output[0]]))
    greater.output[0] = "mask_raw"
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    refused(save(model, tmp_path), "the graph's own logits differ from the GPT-2 opswitch built")


# ------------------------------------------------------------------ tensors
def external(tensor, location: str, offset="0", length: str | None = None) -> bytes:
    raw = tensor.raw_data or numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
    tensor.ClearField("raw_data")
    for field in ("float_data", "int64_data", "int32_data", "double_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length or str(len(raw)))):
        tensor.external_data.add(key=key, value=value)
    return raw


def constant_tensor(model):
    """The value tensor of the first float Constant node (GELU's 0.044715)."""
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute[0].t.data_type == TensorProto.FLOAT:
            return n.attribute[0].t
    raise AssertionError("no float constant")


def test_external_data_of_a_constant_is_read_relative_to_the_model_folder(models, tmp_path, monkeypatch):
    model = fresh(models)
    raw = external(constant_tensor(model), "consts.bin")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "consts.bin").write_bytes(raw)
    (tmp_path / "elsewhere").mkdir()  # the current directory, which has no consts.bin
    monkeypatch.chdir(tmp_path / "elsewhere")
    config, _ = load_onnx(save(model, tmp_path / "m"))
    assert config.n_layer == 2


def _hostile_locations(tmp_path: Path) -> dict[str, tuple[str, str, str | None, str]]:
    """case -> (location, offset, length, expected message); files set up beside the model."""
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "escape.bin").symlink_to(tmp_path / "outside.bin")
    (tmp_path / "m" / "short.bin").write_bytes(b"\0\0")
    (tmp_path / "m" / "ok.bin").write_bytes(b"\0" * 64)
    (tmp_path / "m" / "sub").mkdir()
    os.mkfifo(tmp_path / "m" / "pipe.bin")
    return {
        "parent": ("../outside.bin", "0", None, "outside the model's directory"),
        "absolute": (str(tmp_path / "outside.bin"), "0", None, "outside the model's directory"),
        "symlink": ("escape.bin", "0", None, "outside the model's directory"),
        "empty": ("", "0", None, "outside the model's directory"),
        "nul": ("ok\0.bin", "0", None, "outside the model's directory"),
        "missing": ("nope.bin", "0", None, "which is not in"),
        "fifo": ("pipe.bin", "0", None, "which is a FIFO, not a file"),
        "directory": ("sub", "0", None, "which is a directory, not a file"),
        "short": ("short.bin", "0", None, "does not fit the file"),
        "past-end": ("ok.bin", "62", None, "does not fit the file"),
        "bad-offset": ("ok.bin", "abc", None, "does not fit the file"),
        "negative-offset": ("ok.bin", "-4", None, "does not fit the file"),
        "huge-offset": ("ok.bin", "9" * 40, None, "does not fit the file"),
        "wrong-length": ("ok.bin", "0", "3", "does not fit the file"),
    }


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
@pytest.mark.parametrize("where", ["constant", "initializer"])
def test_every_external_location_is_checked(models, tmp_path, where):
    for case, (location, offset, length, match) in _hostile_locations(tmp_path).items():
        model = fresh(models)
        tensor = constant_tensor(model) if where == "constant" else \
            next(t for t in model.graph.initializer if t.name == "transformer.h.0.ln_1.bias")
        external(tensor, location, offset, length)
        path = save(model, tmp_path / "m", f"{case}.onnx")
        message = refused(path, match)
        assert ("Constant node" if where == "constant" else "'transformer.h.0.ln_1.bias'") in message


def test_dims_that_do_not_match_the_inline_data_are_one_line_errors(models, tmp_path):
    def dims(m, name="transformer.wte.weight"):
        return next(t for t in m.graph.initializer if t.name == name).dims

    for i, edit in enumerate([
        lambda m: dims(m).__setitem__(1, 25),  # raw data for [61, 24]
        lambda m: constant_tensor(m).dims.append(7),  # a scalar's one value for 7
        lambda m: dims(m, "transformer.wpe.weight").__setitem__(0, -48),
        lambda m: dims(m, "transformer.ln_f.bias").extend([2**40, 2**40]),
    ]):
        model = fresh(models)
        edit(model)
        refused(save(model, tmp_path / str(i)), "dims")


def test_generate_without_a_tokenizer_names_the_flag_not_the_python_argument(models, tmp_path, capsys):
    path = save(fresh(models), tmp_path)
    assert main(["generate", "--model", str(path), "--prompt", "Hello", "--backend", "naive"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer DIR" in err and "tokenizer=PATH" not in err


def test_a_graph_with_more_nodes_than_any_gpt2_is_refused_before_it_is_walked(models, tmp_path):
    from opswitch.onnx.structure import MAX_NODES

    model = fresh(models)
    rename_output(model, "logits", "chain_0")
    chain = onnx.NodeProto()
    chain.op_type = "Identity"
    for i in range(MAX_NODES):
        chain.input[:] = [f"chain_{i}"]
        chain.output[:] = [f"chain_{i + 1}" if i + 1 < MAX_NODES else "logits"]
        model.graph.node.append(chain)
    refused(save(model, tmp_path), "more than any GPT-2 export")


def test_a_model_too_big_for_a_full_context_check_is_still_checked_at_its_last_positions(
        models, tmp_path, monkeypatch):
    """With no budget for a whole-context run (as for GPT-2 small), the long run is 11 tokens; a
    graph with a KV cache is then also run after a past of our choosing ending at the context's
    end, which a threshold anywhere below it cannot escape."""
    import opswitch.onnx.verify as verify

    monkeypatch.setattr(verify, "FULL_CHECK_WORK", 0)
    load_onnx(save(fresh(models, True), tmp_path / "good"))
    model = fresh(models, True)
    negate_past(model, 30, "residual")
    refused(save(model, tmp_path / "bad"), "the graph's own logits differ from the GPT-2 opswitch built")


def test_many_users_of_one_long_chain_cost_one_walk_of_it(models, tmp_path):
    """10,000 Gathers of the token embedding, each through a longer Identity chain and all
    added into the residual: walking each chain afresh took 5·10^7 steps.  (The mapping
    alone, as ``verify=False`` does it: the check run would then refuse the graph.)"""
    model = fresh(models)
    ln_f = node(model, "LayerNormalization", -1)
    residual = ln_f.input[0]
    extra, source = [], "transformer.wte.weight"
    for i in range(10_000):
        extra.append(helper.make_node("Identity", [source], [f"wte_{i}"]))
        extra.append(helper.make_node("Gather", [f"wte_{i}", "input_ids"], [f"gathered_{i}"]))
        extra.append(helper.make_node("Add", [residual, f"gathered_{i}"], [f"residual_{i}"]))
        source, residual = f"wte_{i}", f"residual_{i}"
    at = list(model.graph.node).index(ln_f)
    nodes = list(model.graph.node)
    ln_f.input[0] = residual
    del model.graph.node[:]
    model.graph.node.extend(nodes[:at] + extra + nodes[at:])
    path = save(model, tmp_path)
    done = []
    thread = threading.Thread(target=lambda: done.append(load_onnx(path, verify=False)), daemon=True)
    thread.start()
    thread.join(20)
    assert done, "mapping a graph of 30,000 nodes took over 20 s"
