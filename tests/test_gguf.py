"""GGUF in and out: files laid out as llama.cpp's converter writes a GPT-2 (see gguf_files.py,
written with ggml-org's own gguf.GGUFWriter) load with HF's logits; our exports read back in
``gguf.GGUFReader`` and in our loader; the tokenizer comes from the file; every backend runs one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf_files import converter_tensors, hf_hparams, hf_model_to_gguf, vocab_from_dir, write_gguf
from support import require

gguf = require("gguf")
torch = require("torch")

import opswitch  # noqa: E402
from opswitch.bench.models import random_hf_model  # noqa: E402
from opswitch.cli.main import main  # noqa: E402
from opswitch.core import formats  # noqa: E402
from opswitch.model.gguf_load import load_gguf  # noqa: E402
from opswitch.model.weights import load_gpt2  # noqa: E402
from opswitch.tokenizer import load_tokenizer  # noqa: E402

# As in test_parity: two correct float32 computations of the logits agree to ~2e-5 of their scale.
LOGIT_RTOL = 2e-5
SHAPE = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
TYPES = ("f32", "f16", "q8_0", "q4_0")


def rel_err(got, expected) -> float:
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def hf():
    return random_hf_model(seed=3, **SHAPE)


@pytest.fixture(scope="module")
def files(hf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {t: hf_model_to_gguf(hf, folder / f"model-{t}.gguf", t) for t in TYPES}


def dequantised_hf(hf, path):
    """A copy of ``hf`` holding the file's weights as gguf.quants.dequantize decodes them."""
    import copy

    from gguf_files import TRANSPOSED, gguf_tensor_name

    reader = gguf.GGUFReader(str(path))
    decoded = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    model = copy.deepcopy(hf)
    state = model.state_dict()
    with torch.no_grad():
        for name, p in state.items():
            ggml = gguf_tensor_name(name)
            if ggml is None or ggml not in decoded:
                continue
            value = decoded[ggml].reshape(p.shape[::-1] if name.endswith(TRANSPOSED) else p.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(value.T if name.endswith(TRANSPOSED) else value)))
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


IDS = [3, 17, 999, 0, 512, 42, 7, 7, 256]


@pytest.mark.parametrize("kind", TYPES)
def test_a_converter_laid_out_gguf_gives_hf_logits_on_its_dequantised_weights(hf, files, kind):
    lm = opswitch.load_model(files[kind], backend="naive")
    assert lm.config.n_layer == 2 and lm.config.n_embd == 64 and lm.config.vocab_size == 1000
    assert lm.config.layer_norm_epsilon == 1e-5 and lm.config.tie_word_embeddings
    reference = hf_logits(dequantised_hf(hf, files[kind]), IDS)
    assert rel_err(lm.forward(IDS), reference) < LOGIT_RTOL
    if kind == "f32":  # and the file is the model itself
        assert rel_err(lm.forward(IDS), hf_logits(hf, IDS)) < LOGIT_RTOL


@pytest.mark.parametrize("kind", ("f16", "q8_0", "q4_0"))
def test_the_files_own_types_are_kept_and_decode_bit_identically_to_gguf(files, kind):
    model = load_gguf(files[kind])
    qkv = model.params["h"][1]["attn"]["c_attn"]["weight"]
    wte = model.params["wte"]
    assert isinstance(qkv, formats.Stored) and qkv.fmt == kind and qkv.shape == (64, 192)
    assert isinstance(wte, formats.Stored) and wte.fmt == kind and wte.shape == (1000, 64)
    reader = {t.name: t for t in gguf.GGUFReader(str(files[kind])).tensors}
    for ours, name in ((qkv, "blk.1.attn_qkv.weight"), (wte, "token_embd.weight")):
        t = reader[name]
        expected = gguf.quants.dequantize(t.data, t.tensor_type)  # [rows, ne0]
        got = formats.decode(ours)
        np.testing.assert_array_equal(got.T if ours.role == "linear" else got, expected)
    assert f"GGUF tensors: 19 f32, 9 {kind}" in model.notes


def test_an_untied_output_is_the_lm_head(tmp_path):
    hf = random_hf_model(seed=4, tie_word_embeddings=False, **SHAPE)
    path = hf_model_to_gguf(hf, tmp_path / "untied.gguf", "f32")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    lm = opswitch.load_model(path, backend="naive")
    assert not lm.config.tie_word_embeddings and "lm_head" in lm.model.host_params
    assert rel_err(lm.forward(IDS), hf_logits(hf, IDS)) < LOGIT_RTOL


def test_every_backend_generates_from_a_gguf(files, hf, opswitch_backend):
    lm = opswitch.load_model(files["q8_0"], backend=opswitch_backend)
    reference = hf_logits(dequantised_hf(hf, files["q8_0"]), IDS)
    # a backend keeping q8_0 natively (cpu) multiplies the same decoded values in float32
    assert rel_err(lm.forward(IDS), reference) < LOGIT_RTOL
    greedy = lm.generate_ids(IDS[:4], max_new_tokens=6, temperature=0, stop_token=-1)
    assert len(greedy.new_ids) == 6


def test_weights_override_re_encodes_each_tensor(files):
    kept = opswitch.load_model(files["q4_0"], backend="naive")
    as_f32 = opswitch.load_model(files["q4_0"], backend="naive", weights="f32")
    assert kept.model.weights is None and as_f32.model.weights == "f32"
    np.testing.assert_array_equal(kept.forward(IDS), as_f32.forward(IDS))  # decoding is exact
    # the f32 file quantised at load is the q8_0 file (gguf.quants quantised the same weights)
    as_q8 = opswitch.load_model(files["f32"], backend="naive", weights="q8_0")
    q8_file = opswitch.load_model(files["q8_0"], backend="naive")
    np.testing.assert_array_equal(as_q8.forward(IDS), q8_file.forward(IDS))
    assert not np.array_equal(as_q8.forward(IDS), kept.forward(IDS))


# -- round trips through our writer ----------------------------------------------------------

def _export(model, out, *extra):
    assert main(["export-gguf", "--model", str(model), "--out", str(out), *extra]) == 0
    return out


def test_safetensors_to_gguf_f32_and_back_gives_the_directorys_logits_bit_for_bit(tiny_model_dir, tmp_path):
    out = _export(tiny_model_dir, tmp_path / "tiny.gguf")
    ids = [464, 3290, 318, 257, 50256, 11]
    from_dir = opswitch.load_model(tiny_model_dir, backend="naive")
    from_gguf = opswitch.load_model(out, backend="naive")
    assert from_gguf.config == from_dir.config
    np.testing.assert_array_equal(from_gguf.forward(ids), from_dir.forward(ids))
    text = "Hello world, <|endoftext|> it's  a tést 123"
    assert from_gguf.encode(text) == from_dir.encode(text)
    assert from_gguf.tokenizer.eot_id == from_dir.tokenizer.eot_id == 50256


@pytest.mark.parametrize("kind", ("f32", "f16", "q8_0", "q4_0"))
def test_our_exports_read_back_in_ggufs_reader_with_llama_cpps_layout(tmp_path, kind):
    from opswitch.model.hub import DEMO_MODEL  # n_embd 192: whole blocks of 32

    out = _export(DEMO_MODEL, tmp_path / f"demo-{kind}.gguf", "--weights", kind)
    config, params = load_gpt2(DEMO_MODEL)
    state = {f"transformer.{k}": v for k, v in _flat(params).items()}
    expected = converter_tensors(state)
    reader = gguf.GGUFReader(str(out))
    got = {t.name: t for t in reader.tensors}
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        t = got[name]
        keep_f32 = want.ndim == 1 or name.startswith("position_embd")
        assert t.tensor_type.name == ("F32" if keep_f32 else kind.upper()), name
        if t.tensor_type.name in ("Q8_0", "Q4_0"):  # bytes as ggml's reference quantiser writes them
            np.testing.assert_array_equal(t.data, gguf.quants.quantize(want, t.tensor_type))
        else:
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                                          want.astype(np.float16) if kind == "f16" and not keep_f32 else want)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt2"
    assert reader.fields["gpt2.block_count"].parts[-1][0] == config.n_layer
    assert opswitch.load_model(out, backend="naive").generate("Hello", max_new_tokens=3, temperature=0)


def _flat(params):
    from opswitch.model.weights import flatten_params

    return {k: np.asarray(v) for k, v in flatten_params(params).items()}


def test_a_quantised_file_exports_its_blocks_unchanged(files, tmp_path):
    out = _export(files["q4_0"], tmp_path / "again.gguf", "--weights", "q4_0")
    before = {t.name: t.data for t in gguf.GGUFReader(str(files["q4_0"])).tensors}
    after = {t.name: t.data for t in gguf.GGUFReader(str(out)).tensors}
    for name, data in before.items():
        np.testing.assert_array_equal(after[name], data)


def test_export_refuses_an_existing_file_and_never_replaces_an_input(tiny_model_dir, files, tmp_path, capsys):
    from helpers import one_error_line

    out = tmp_path / "x.gguf"
    out.write_bytes(b"mine")
    assert main(["export-gguf", "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys) and out.read_bytes() == b"mine"
    size = files["f16"].stat().st_size
    assert main(["export-gguf", "--model", str(files["f16"]), "--out", str(files["f16"]), "--overwrite"]) == 2
    assert "read from" in one_error_line(capsys) and files["f16"].stat().st_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # no temporary left behind
    _export(tiny_model_dir, out, "--overwrite")
    assert out.read_bytes()[:4] == b"GGUF"


# -- tokenizer and CLI ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_vocab_gguf(tiny_model_dir, tmp_path_factory):
    """A converter-laid-out file with GPT-2's real tokenizer arrays."""
    config, params = load_gpt2(tiny_model_dir)
    state = {f"transformer.{k}": v for k, v in _flat(params).items()}
    hp = {"n_layer": config.n_layer, "n_ctx": config.n_positions, "n_embd": config.n_embd,
          "n_head": config.n_head, "layer_norm_epsilon": config.layer_norm_epsilon}
    path = tmp_path_factory.mktemp("vocab") / "gpt2-vocab.gguf"
    return write_gguf(path, hp, converter_tensors(state), "f16", vocab_from_dir(tiny_model_dir))


def test_the_tokenizer_comes_from_the_file(gpt2_vocab_gguf, tiny_model_dir):
    lm = opswitch.load_model(gpt2_vocab_gguf, backend="naive")
    ours, theirs = lm.tokenizer, load_tokenizer(tiny_model_dir)
    texts = ("Hello world", " a  b\n\nc", "<|endoftext|>x<|endoftext|>", "naïve café 🙂", "'s 've 123456")
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(theirs.encode(text)) == text
    assert ours.special_tokens == theirs.special_tokens and lm.config.eos_token_id == 50256


def test_generate_from_a_gguf_needs_no_tokenizer_flag(gpt2_vocab_gguf, capsys):
    assert main(["generate", "--model", str(gpt2_vocab_gguf), "--prompt", "Hello", "--max-tokens", "4",
                 "--temperature", "0", "--backend", "naive"]) == 0
    err = capsys.readouterr().err
    assert "Tokenizer loaded (vocab size=50257)" in err and "GGUF tensors: 19 f32, 9 f16" in err


def test_eval_and_inspect_read_a_gguf(gpt2_vocab_gguf, tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    assert main(["eval", "--model", str(gpt2_vocab_gguf), "--text", str(text), "--backend", "naive",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 10
    assert main(["inspect", str(gpt2_vocab_gguf), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "gguf" and report["metadata"]["general.architecture"] == "gpt2"
    names = {t["name"]: t for t in report["tensors"]}
    qkv = names["blk.0.attn_qkv.weight"]
    assert qkv["dtype"] == "f16" and qkv["shape"] == [48, 16]


def test_another_tokenizer_model_leaves_token_ids_working(hf, tmp_path, capsys):
    vocab = {"model": "llama", "tokens": [f"t{i}" for i in range(1000)], "types": [1] * 1000, "merges": []}
    path = write_gguf(tmp_path / "llama-vocab.gguf", hf_hparams(hf.config),
                      converter_tensors({k: v.numpy() for k, v in hf.state_dict().items()
                                         if k != "lm_head.weight"}), "f32", vocab)
    lm = opswitch.load_model(path, backend="naive")
    assert lm.tokenizer is None and any("'llama'" in n for n in lm.notes)
    assert len(lm.generate_ids(IDS, max_new_tokens=2, temperature=0).new_ids) == 2
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--backend", "naive"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_other_ggml_types_are_decoded_with_ggufs_dequantisers_and_stored_as_q8_0(hf, tmp_path):
    tensors = converter_tensors({k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    path = write_gguf(tmp_path / "mixed.gguf", hf_hparams(hf.config), tensors, "f32",
                      types={"blk.0.ffn_up.weight": "q5_1", "blk.1.ffn_down.weight": "q4_1"})
    model = load_gguf(path)
    assert any("q4_1, q5_1 tensors decoded and stored as q8_0" in n for n in model.notes)
    up = model.params["h"][0]["mlp"]["c_fc"]["weight"]
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_up.weight")
    expected = formats.encode(gguf.quants.dequantize(t.data, t.tensor_type).T, "q8_0", "linear")
    assert up.fmt == "q8_0"
    np.testing.assert_array_equal(up.data, expected.data)
