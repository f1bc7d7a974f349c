"""ONNX out and in: export -> onnx.checker -> ONNX Runtime parity (with and without the KV
cache); import of our export and of torch's dynamo export on every backend; inspect; bad files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from support import require

onnx = require("onnx")
ort = require("onnxruntime")
torch = require("torch")

import opswitch  # noqa: E402
from opswitch.cli.main import main  # noqa: E402
from opswitch.core.registry import get_registry  # noqa: E402
from opswitch.model.gpt2 import GPT2  # noqa: E402
from opswitch.model.weights import flatten_params, load_gpt2  # noqa: E402
from opswitch.onnx import OnnxError  # noqa: E402
from opswitch.onnx.export import export_onnx  # noqa: E402
from opswitch.onnx.importer import load_onnx  # noqa: E402

# As in test_parity: two correct float32 computations of the logits agree to ~2e-5 of their scale.
LOGIT_RTOL = 2e-5
SHAPE = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)


def rel_err(got, expected) -> float:
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from helpers import save_hf

    from opswitch.bench.models import random_hf_model

    model = random_hf_model(seed=5, **SHAPE)
    return save_hf(model, tmp_path_factory.mktemp("hf")), model


@pytest.fixture(scope="module")
def loaded(hf):
    return load_gpt2(hf[0])


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    plain = export_onnx(*loaded, directory / "model.onnx")
    past = export_onnx(*loaded, directory / "model-with-past.onnx", with_past=True)
    return plain, past


@pytest.fixture(scope="module")
def torch_exported(hf, tmp_path_factory):
    """What users bring: torch.onnx.export(dynamo=True) of GPT2LMHeadModel returning logits."""
    require("onnxscript")

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    path = tmp_path_factory.mktemp("torch-onnx") / "gpt2.onnx"
    seq = torch.export.Dim("sequence", max=SHAPE["n_positions"])
    torch.onnx.export(Logits(hf[1]).eval(), (torch.tensor([[1, 2, 3, 4, 5]]),), str(path), dynamo=True,
                      input_names=["input_ids"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {1: seq}}, verbose=False)
    return path


def _ids(batch: int, n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, SHAPE["vocab_size"], (batch, n))


def _ours(loaded, ids: np.ndarray) -> np.ndarray:
    model = GPT2(*loaded, get_registry().backend("naive"))
    return np.stack([model.forward(row) for row in ids]).astype(np.float64)


def _hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf[1](torch.tensor(np.asarray(ids))).logits.numpy().astype(np.float64)


# ---------------------------------------------------------------- export
def test_export_passes_the_full_checker_with_checkpoint_names_and_dynamic_axes(exported, loaded):
    for path in exported:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert {o.domain: o.version for o in model.opset_import}[""] >= 17
        names = {t.name for t in model.graph.initializer}
        assert names == {f"transformer.{n}" for n in flatten_params(loaded[1])}
        ops = {n.op_type for n in model.graph.node}
        assert "LayerNormalization" in ops and "Tanh" in ops
        ids = model.graph.input[0]
        assert ids.name == "input_ids"
        assert [d.dim_param for d in ids.type.tensor_type.shape.dim] == ["batch", "sequence"]
    past = onnx.load(str(exported[1]))
    assert [i.name for i in past.graph.input][1:3] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in past.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]


def test_onnxruntime_logits_equal_ours(exported, loaded):
    ids = _ids(2, 13)
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": ids})
    assert rel_err(logits, _ours(loaded, ids)) < LOGIT_RTOL


def test_onnxruntime_with_past_equals_ours_at_prefill_and_each_decode_step(exported, loaded):
    config = loaded[0]
    ids = _ids(2, 14)
    expected = _ours(loaded, ids)
    session = ort.InferenceSession(str(exported[1]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    d = config.n_embd // config.n_head
    empty = np.zeros((2, config.n_head, 0, d), np.float32)
    past = {f"past_key_values.{i}.{kind}": empty for i in range(config.n_layer) for kind in ("key", "value")}
    out = dict(zip(names, session.run(None, {"input_ids": ids[:, :9], **past})))
    assert rel_err(out["logits"], expected[:, :9]) < LOGIT_RTOL
    for t in range(9, 14):
        past = {f"past_key_values.{i}.{kind}": out[f"present.{i}.{kind}"]
                for i in range(config.n_layer) for kind in ("key", "value")}
        out = dict(zip(names, session.run(None, {"input_ids": ids[:, t : t + 1], **past})))
        assert rel_err(out["logits"][:, 0], expected[:, t]) < LOGIT_RTOL
        assert out["present.1.value"].shape == (2, config.n_head, t + 1, d)


def test_external_data_export_round_trips(loaded, tmp_path):
    path = export_onnx(*loaded, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > (tmp_path / "ext.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]  # no temp left
    onnx.checker.check_model(str(path), full_check=True)
    ids = _ids(1, 7)
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids})
    assert rel_err(logits, _ours(loaded, ids)) < LOGIT_RTOL
    params = load_onnx(path)[1]
    assert all(np.array_equal(a, flatten_params(loaded[1])[n]) for n, a in flatten_params(params).items())


def test_a_failed_export_leaves_nothing_behind(loaded, tmp_path, monkeypatch):
    (tmp_path / "model.onnx").write_bytes(b"the previous file")

    def refuse(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(*loaded, tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert (tmp_path / "model.onnx").read_bytes() == b"the previous file"
    with pytest.raises(OnnxError, match="not a directory"):
        export_onnx(*loaded, tmp_path / "missing" / "model.onnx")


# ---------------------------------------------------------------- import
def test_import_of_our_export_gives_back_the_same_weights(exported, loaded):
    for path in exported:
        config, params = load_onnx(path)
        assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.n_positions) == (
            2, 4, 64, 1000, 64)
        assert config.layer_norm_epsilon == 1e-5 and config.tie_word_embeddings
        ours = flatten_params(loaded[1])
        theirs = flatten_params(params)
        assert theirs.keys() == ours.keys()
        assert all(np.array_equal(theirs[n], ours[n]) for n in ours)


def test_untied_head_and_custom_mlp_width_round_trip(tmp_path):
    from opswitch.model.config import GPT2Config
    from opswitch.model.weights import nest_params

    config = GPT2Config(vocab_size=97, n_positions=16, n_embd=24, n_layer=3, n_head=3, n_inner=40,
                        layer_norm_epsilon=1e-6, tie_word_embeddings=False, bos_token_id=None,
                        eos_token_id=None)
    rng = np.random.default_rng(4)
    flat = {n: (0.3 * rng.standard_normal(shape) + n.endswith("ln_1.weight")).astype(np.float32)
            for n, shape in config.param_shapes().items()}
    params = nest_params({**flat, "lm_head.weight": rng.standard_normal((97, 24)).astype(np.float32)}, 3)
    path = export_onnx(config, params, tmp_path / "untied.onnx", with_past=True)
    got_config, got = load_onnx(path)
    assert got_config == config
    assert all(np.array_equal(a, flatten_params(params)[n]) for n, a in flatten_params(got).items())
    ids = np.arange(11) % 97
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids[None], **{
            f"past_key_values.{i}.{k}": np.zeros((1, 3, 0, 8), np.float32)
            for i in range(3) for k in ("key", "value")}})
    ours = GPT2(config, params, get_registry().backend("naive")).forward(ids).astype(np.float64)
    assert rel_err(logits[0], ours) < LOGIT_RTOL


def test_our_export_runs_on_every_backend(exported, hf, opswitch_backend):
    ids = _ids(1, 21)
    lm = opswitch.load_model(exported[1], backend=opswitch_backend)
    assert rel_err(lm.forward(ids[0]), _hf_logits(hf, ids)[0]) < LOGIT_RTOL


def test_torch_dynamo_export_runs_on_every_backend(torch_exported, hf, opswitch_backend):
    ids = _ids(1, 19)
    lm = opswitch.load_model(torch_exported, backend=opswitch_backend)
    assert lm.config.n_head == 4 and lm.config.n_layer == 2 and lm.config.tie_word_embeddings
    assert rel_err(lm.forward(ids[0]), _hf_logits(hf, ids)[0]) < LOGIT_RTOL
    greedy = lm.generate_ids(ids[0][:5].tolist(), max_new_tokens=8, temperature=0, stop_token=-1)
    assert len(greedy.new_ids) == 8


def test_an_onnx_model_needs_a_tokenizer_only_for_text(exported, tiny_model_dir, tmp_path):
    lm = opswitch.load_model(exported[0], backend="naive")
    assert lm.tokenizer is None and lm.forward([1, 2, 3]).shape == (3, 1000)
    with pytest.raises(opswitch.core.errors.TokenizerError, match="tokenizer"):
        lm.encode("Hello")
    # a vocabulary of 50257, so the real GPT-2 tokenizer fits: export it, then score text with it
    onnx_path = tmp_path / "tiny.onnx"
    assert main(["export-onnx", "--model", str(tiny_model_dir), "--out", str(onnx_path)]) == 0
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a fortune.")
    r = run_cli("eval", "--model", onnx_path, "--text", text, "--backend", "naive", "--json", timeout=300)
    assert r.returncode == 2 and "--tokenizer" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("eval", "--model", onnx_path, "--tokenizer", tiny_model_dir, "--text", text,
                "--backend", "naive", "--json", timeout=300)
    via_onnx = json.loads(r.stdout)
    via_dir = json.loads(run_cli("eval", "--model", tiny_model_dir, "--text", text, "--backend", "naive",
                                 "--json", timeout=300).stdout)
    assert via_onnx["tokens_scored"] == via_dir["tokens_scored"]
    assert via_onnx["loss"] == pytest.approx(via_dir["loss"], rel=1e-6)


# ---------------------------------------------------------------- the commands
def test_export_and_inspect_commands(hf, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", "--model", str(hf[0]), "--out", str(out), "--with-past"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and "onnx.checker passed" in captured.err
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "onnx" and report["opset"] == {"ai.onnx": 17}
    assert report["producer"].startswith("opswitch")
    assert report["op_counts"]["LayerNormalization"] == 5 and report["op_counts"]["Softmax"] == 2
    wte = next(t for t in report["tensors"] if t["name"] == "transformer.wte.weight")
    assert wte == {"name": "transformer.wte.weight", "dtype": "float32", "shape": [1000, 64],
                   "size": 64000, "bytes": 256000}
    n_params = sum(a.size for a in flatten_params(load_gpt2(hf[0])[1]).values())
    assert report["total_params"] == n_params
    assert [i["name"] for i in report["inputs"]][:2] == ["input_ids", "past_key_values.0.key"]

    assert main(["inspect", str(hf[0] / "model.safetensors"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["format"] == "safetensors" and st["total_params"] == n_params
    assert main(["inspect", str(hf[0])]) == 0  # a model directory: every weights file in it
    text = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_fc.weight" in text and "float32" in text and "total: " in text
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "opset ai.onnx 17" in text and "nodes: " in text and "LayerNormalization 5" in text


# ---------------------------------------------------------------- bad input
def _edit(source: Path, tmp_path: Path, edit) -> Path:
    model = onnx.load(str(source))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def _initializer(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _replace(model, name, array):
    t = _initializer(model, name)
    t.CopyFrom(onnx.numpy_helper.from_array(array, name))


def _bad_files(exported: Path, tmp_path: Path) -> dict[str, Path]:
    files = {}
    data = exported.read_bytes()
    files["truncated"] = tmp_path / "truncated.onnx"
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["not-onnx"] = tmp_path / "text.onnx"
    files["not-onnx"].write_text("this is not a model\n")
    files["tensor-not-model"] = tmp_path / "tensor.onnx"
    files["tensor-not-model"].write_bytes(
        onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "t").SerializeToString())

    def relu(model):
        next(n for n in model.graph.node if n.op_type == "Tanh").op_type = "Relu"
    (tmp_path / "relu").mkdir()
    files["unsupported-op"] = _edit(exported, tmp_path / "relu", relu)

    def custom_domain(model):
        next(n for n in model.graph.node if n.op_type == "Softmax").domain = "com.example"
    (tmp_path / "domain").mkdir()
    files["custom-domain"] = _edit(exported, tmp_path / "domain", custom_domain)

    def flipped_mask(model):  # maps like GPT-2, computes something else: caught by running it
        next(n for n in model.graph.node if n.op_type == "Greater").op_type = "Less"
    (tmp_path / "mask").mkdir()
    files["wrong-wiring"] = _edit(exported, tmp_path / "mask", flipped_mask)

    def wrong_shape(model):
        _replace(model, "transformer.h.1.attn.c_proj.weight", np.zeros((64, 65), np.float32))
    (tmp_path / "shape").mkdir()
    files["wrong-shape"] = _edit(exported, tmp_path / "shape", wrong_shape)

    def wrong_dtype(model):
        _replace(model, "transformer.h.0.mlp.c_fc.weight", np.zeros((64, 256), np.int32))
    (tmp_path / "dtype").mkdir()
    files["wrong-dtype"] = _edit(exported, tmp_path / "dtype", wrong_dtype)

    def stray_weight(model):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(64, np.float32), "extra.scale"))
    (tmp_path / "stray").mkdir()
    files["stray-weight"] = _edit(exported, tmp_path / "stray", stray_weight)

    for case, location in (("missing-data", "model.onnx.data"), ("traversal", "../outside.data"),
                           ("absolute", "/etc/passwd")):
        directory = tmp_path / case
        directory.mkdir()
        model = onnx.load(str(exported))
        t = _initializer(model, "transformer.wpe.weight")
        raw = t.raw_data
        (tmp_path / "outside.data").write_bytes(raw)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
            t.external_data.add(key=key, value=value)
        onnx.save(model, str(directory / "model.onnx"))
        files[case] = directory / "model.onnx"
    return files


BAD = {
    "truncated": "is not an ONNX model",
    "not-onnx": "not an ONNX model",
    "tensor-not-model": "not an ONNX model",
    "unsupported-op": "Relu node",
    "custom-domain": "domain com.example",
    "wrong-wiring": "the graph's own logits differ from the GPT-2 opswitch built",
    "wrong-shape": "'transformer.h.1.attn.c_proj.weight'",
    "wrong-dtype": "'transformer.h.0.mlp.c_fc.weight' used as h.0.mlp.c_fc.weight is INT32",
    "stray-weight": "'extra.scale'",
    "missing-data": "which is not in",
    "traversal": "outside the model's directory",
    "absolute": "outside the model's directory",
}


@pytest.fixture(scope="module")
def bad_files(exported, tmp_path_factory):
    return _bad_files(exported[0], tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_onnx_files_are_one_line_errors_with_exit_2(bad_files, case, capsys):
    with pytest.raises(OnnxError, match=BAD[case].replace("(", r"\(").replace(")", r"\)")):
        load_onnx(bad_files[case])
    text = bad_files[case].parent / "t.txt"
    text.write_text("Hello there.")
    assert main(["eval", "--model", str(bad_files[case]), "--text", str(text), "--backend", "naive"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opswitch: error: ") and err.count("\n") == 1 and BAD[case] in err


def test_missing_onnx_file_and_inspect_of_a_bad_file(tmp_path, bad_files, capsys):
    assert main(["inspect", str(tmp_path / "nope.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(bad_files["truncated"])]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
    (tmp_path / "x.bin").write_bytes(b"1234")
    assert main(["inspect", str(tmp_path / "x.bin")]) == 2
    assert "inspect reads .onnx, .safetensors and .gguf" in capsys.readouterr().err


def test_without_the_onnx_package_the_error_names_the_extra(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    for argv in (["inspect", str(exported[0])], ["export-onnx", "--out", str(tmp_path / "x.onnx")]):
        assert main(argv) == 2
        assert "pip install 'opswitch[onnx]'" in capsys.readouterr().err
    with pytest.raises(OnnxError, match=r"opswitch\[onnx\]"):
        opswitch.load_model(exported[0])
