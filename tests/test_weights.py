"""GPT-2 model directories: HF's transformers writes them, we read them; we write them, HF reads them."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import require

from opswitch.core.errors import ConfigError, ModelNotFoundError, WeightsError
from opswitch.model.config import PRESETS, GPT2Config
from opswitch.model.safetensors import SafetensorsFile, save_safetensors
from opswitch.model.weights import flatten_params, load_gpt2, nest_params, param_count, save_gpt2

torch = transformers = None  # set by the `hf` fixture: only the tests that compare with HF need them


@pytest.fixture(scope="module")
def hf() -> None:
    """torch and transformers for the tests that compare with HF; the rest of this file runs without."""
    global torch, transformers
    torch, transformers = require("torch"), require("transformers")

TINY = dict(n_layer=2, n_embd=96, n_head=3, vocab_size=101, n_positions=64)
TINY.update(bos_token_id=100, eos_token_id=100)  # inside the vocabulary, so transformers stays quiet
_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


def hf_tiny(**overrides: object) -> transformers.GPT2LMHeadModel:
    """A tiny GPT-2 with every parameter random (HF inits biases and LayerNorms to constants)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def hf_flat(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as {checkpoint name without "transformer.": float32 array}."""
    return {
        k.removeprefix("transformer."): v.float().numpy()
        for k, v in model.state_dict().items()
        if not _BUFFER.fullmatch(k)
    }


def assert_params_equal(params: dict, want: dict[str, np.ndarray]) -> None:
    flat = flatten_params(params)
    assert sorted(flat) == sorted(want)
    for name, a in want.items():
        assert flat[name].dtype == np.float32, name
        np.testing.assert_array_equal(flat[name], a, err_msg=name)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(20).reshape(2, 10) % 101).logits


@pytest.fixture(scope="module")
def model(hf) -> transformers.GPT2LMHeadModel:
    return hf_tiny()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module) -> Path:
    d = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def flat(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v for k, v in hf_flat(model).items() if k != "lm_head.weight"}  # tied


def make_dir(d: Path, tensors: dict[str, np.ndarray], config: dict | None = None) -> Path:
    """A model directory written by hand: config.json (TINY unless given) + model.safetensors."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config or {"model_type": "gpt2", **TINY}))
    save_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
    return d


# -- loading what transformers writes ------------------------------------------------------


def test_load_hf_checkpoint(hf_dir: Path, model: torch.nn.Module, flat: dict) -> None:
    assert "transformer.h.0.attn.c_attn.weight" in SafetensorsFile(hf_dir / "model.safetensors")
    config, params = load_gpt2(hf_dir)
    assert (config.n_layer, config.n_embd, config.n_head, config.vocab_size) == (2, 96, 3, 101)
    assert "lm_head" not in params  # tied: the output projection is wte
    assert_params_equal(params, flat)
    assert param_count(params) == config.n_params == sum(p.numel() for p in model.parameters())
    # zero-copy from the F32 file, and nobody writes to weights in place
    wte = params["wte"]
    assert not wte.flags.owndata and not wte.flags.writeable


def test_linear_layout_is_in_out(hf_dir: Path, model: torch.nn.Module) -> None:
    """HF's Conv1D computes x @ W + b, so weights are [in, out] and need no transpose."""
    _, params = load_gpt2(hf_dir)
    block = params["h"][1]
    assert block["attn"]["c_attn"]["weight"].shape == (96, 288)
    assert block["mlp"]["c_fc"]["weight"].shape == (96, 384)
    assert block["mlp"]["c_proj"]["weight"].shape == (384, 96)
    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    with torch.no_grad():
        want = model.transformer.h[1].mlp.c_fc(torch.from_numpy(x)).numpy()
    got = x @ block["mlp"]["c_fc"]["weight"] + block["mlp"]["c_fc"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint(tmp_path: Path, model: torch.nn.Module, flat: dict) -> None:
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    _, params = load_gpt2(tmp_path)
    assert_params_equal(params, flat)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path: Path, model: torch.nn.Module, dtype: str) -> None:
    half = copy.deepcopy(model).to(getattr(torch, dtype))
    half.save_pretrained(tmp_path, safe_serialization=True)
    _, params = load_gpt2(tmp_path)
    stored = {k: v for k, v in hf_flat(half).items() if k != "lm_head.weight"}  # .float(): exact
    assert_params_equal(params, stored)


def test_unprefixed_names_and_mask_buffers(tmp_path: Path, flat: dict) -> None:
    """OpenAI's converted gpt2 on the hub has no "transformer." prefix; old files carry mask buffers."""
    tensors = dict(flat)
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    _, params = load_gpt2(make_dir(tmp_path / "m", tensors))
    assert_params_equal(params, flat)


def test_untied_head(hf, tmp_path: Path) -> None:
    untied = hf_tiny(tie_word_embeddings=False)
    untied.save_pretrained(tmp_path / "hf", safe_serialization=True)
    config, params = load_gpt2(tmp_path / "hf")
    assert not config.tie_word_embeddings
    assert_params_equal(params, hf_flat(untied))
    save_gpt2(tmp_path / "ours", config, params)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(logits(again), logits(untied))


def test_distinct_head_in_tied_config_is_kept(tmp_path: Path, flat: dict) -> None:
    """transformers (5.x) unties when both are stored and differ; so do we."""
    head = np.random.default_rng(1).standard_normal(flat["wte.weight"].shape).astype(np.float32)
    _, params = load_gpt2(make_dir(tmp_path / "m", {**flat, "lm_head.weight": head}))
    np.testing.assert_array_equal(params["lm_head"], head)
    config, params = load_gpt2(tmp_path / "m")
    save_gpt2(tmp_path / "saved", config, params)  # the saved config says what the params are
    config, params = load_gpt2(tmp_path / "saved")
    assert not config.tie_word_embeddings
    np.testing.assert_array_equal(params["lm_head"], head)
    _, params = load_gpt2(make_dir(tmp_path / "same", {**flat, "lm_head.weight": flat["wte.weight"]}))
    assert "lm_head" not in params


# -- saving for transformers ---------------------------------------------------------------


def test_save_gpt2_loads_in_transformers(tmp_path: Path, hf_dir: Path, model: torch.nn.Module) -> None:
    config, params = load_gpt2(hf_dir)
    out = tmp_path / "new" / "model"  # parents are created
    save_gpt2(out, config, params)
    with SafetensorsFile(out / "model.safetensors") as f:
        assert f.metadata == {"format": "pt"}
        assert sorted(f.names) == sorted(SafetensorsFile(hf_dir / "model.safetensors").names)
    again, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    torch.testing.assert_close(logits(again.eval()), logits(model), rtol=0, atol=0)
    config2, params2 = load_gpt2(out)
    assert config2 == config
    assert_params_equal(params2, flatten_params(params))


def test_save_gpt2_refuses_to_overwrite(tmp_path: Path, hf_dir: Path) -> None:
    config, params = load_gpt2(hf_dir)
    params = nest_params({k: np.array(v) for k, v in flatten_params(params).items()}, config.n_layer)
    save_gpt2(tmp_path, config, params)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(WeightsError, match=r"already holds config\.json, model\.safetensors.*overwrite=True"):
        save_gpt2(tmp_path, config, params)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    params["wpe"] = params["wpe"] + 1
    save_gpt2(tmp_path, config, params, overwrite=True)
    np.testing.assert_array_equal(load_gpt2(tmp_path)[1]["wpe"], params["wpe"])


def test_save_gpt2_overwrite_replaces_a_sharded_copy(tmp_path: Path, model: torch.nn.Module) -> None:
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    config, params = load_gpt2(tmp_path)
    params = nest_params({k: np.array(v) for k, v in flatten_params(params).items()}, config.n_layer)
    save_gpt2(tmp_path, config, params, overwrite=True)
    assert not list(tmp_path.glob("model-*.safetensors")) and not list(tmp_path.glob("*.index.json"))
    assert_params_equal(load_gpt2(tmp_path)[1], flatten_params(params))


def test_save_gpt2_checks_params_against_config(tmp_path: Path, hf_dir: Path) -> None:
    config, params = load_gpt2(hf_dir)
    del params["h"][1]["ln_2"]["bias"]
    with pytest.raises(WeightsError, match=r"params lacks 1 tensor.*h\.1\.ln_2\.bias"):
        save_gpt2(tmp_path, config, params)
    assert not (tmp_path / "model.safetensors").exists()


# -- what goes wrong -----------------------------------------------------------------------


def broken(tmp_path: Path, flat: dict, **changes: np.ndarray | None) -> Path:
    tensors = {**flat, **changes}
    return make_dir(tmp_path / "m", {k: v for k, v in tensors.items() if v is not None})


def test_missing_tensor(tmp_path: Path, flat: dict) -> None:
    d = broken(tmp_path, flat, **{"h.1.ln_2.bias": None})
    with pytest.raises(WeightsError, match=r"model\.safetensors lacks 1 tensor.*: h\.1\.ln_2\.bias"):
        load_gpt2(d)


def test_many_missing_tensors_are_counted(tmp_path: Path, flat: dict) -> None:
    d = broken(tmp_path, flat, **{k: None for k in flat if k.startswith("h.1.") and k != "h.1.ln_1.weight"})
    with pytest.raises(WeightsError, match=r"lacks 11 tensor\(s\).*, \.\.\. \(11 in all\)"):
        load_gpt2(d)


def test_unexpected_layer(tmp_path: Path, flat: dict) -> None:
    d = broken(tmp_path, flat, **{"h.2.ln_1.weight": flat["h.1.ln_1.weight"]})
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\): h\.2\.ln_1\.weight.*n_layer=2"):
        load_gpt2(d)


def test_wrong_shape(tmp_path: Path, flat: dict) -> None:
    d = broken(tmp_path, flat, **{"h.1.mlp.c_fc.weight": np.zeros((96, 380), np.float32)})
    with pytest.raises(WeightsError) as err:
        load_gpt2(d)
    assert "h.1.mlp.c_fc.weight in " in str(err.value) and "model.safetensors" in str(err.value)
    assert "has shape [96, 380], config expects [96, 384]" in str(err.value)


def test_wrong_dtype(tmp_path: Path, flat: dict) -> None:
    d = broken(tmp_path, flat, **{"h.0.ln_1.weight": np.ones(96, np.int64)})
    with pytest.raises(WeightsError, match=r"h\.0\.ln_1\.weight in .*model\.safetensors is I64"):
        load_gpt2(d)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("vocab_size", 100, r"says vocab_size=100, but wte\.weight in .* has 101 rows"),
        ("n_positions", 128, r"says n_positions=128, but wpe\.weight in .* has 64 rows"),
        ("n_inner", 200, r"n_inner=200 \(an MLP width of 200\), but h\.0\.mlp\.c_fc\.weight .* 384 columns"),
    ],
)
def test_config_does_not_fit_weights(tmp_path: Path, flat: dict, key: str, value: int, message: str) -> None:
    d = make_dir(tmp_path / "m", flat, {"model_type": "gpt2", **TINY, key: value})
    with pytest.raises(ConfigError, match=message) as err:
        load_gpt2(d)
    assert str(d / "config.json") in str(err.value)


def test_missing_config(tmp_path: Path, hf_dir: Path) -> None:
    shutil.copy(hf_dir / "model.safetensors", tmp_path)
    with pytest.raises(ConfigError, match=r"config\.json does not exist"):
        load_gpt2(tmp_path)


def test_pickle_only_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02 not really a pickle")  # never opened
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin holds pickled weights.*arbitrary code"):
        load_gpt2(tmp_path)
    with pytest.raises(WeightsError, match="pickled"):
        load_gpt2(tmp_path / "pytorch_model.bin")


def test_pickle_conversion_command_works(tmp_path: Path, model: torch.nn.Module, flat: dict) -> None:
    """The one-liner in the refusal converts a real pickled checkpoint into one we load."""
    src = tmp_path / "pickled"
    src.mkdir()
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(WeightsError) as err:
        load_gpt2(src)
    command = re.search(r'python -c "(.*)" and load (\S+)$', str(err.value))
    assert command is not None
    exec(command[1], {})  # what the user would run in a shell
    assert_params_equal(load_gpt2(command[2])[1], flat)


def test_no_weights_and_no_directory(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"no model\.safetensors .*weights\.safetensors"):
        load_gpt2(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_gpt2(tmp_path / "nowhere")


def test_sharded_index_problems(tmp_path: Path, model: torch.nn.Module) -> None:
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    index_path = tmp_path / "model.safetensors.index.json"
    original = index_path.read_text()
    index = json.loads(original)
    shards = set(index["weight_map"].values())
    shard = sorted(shards)[-1]

    (tmp_path / shard).rename(tmp_path / "moved")
    with pytest.raises(WeightsError, match=rf"lists 1 shard\(s\) not in .*: {re.escape(shard)}; download"):
        load_gpt2(tmp_path)
    (tmp_path / "moved").rename(tmp_path / shard)

    index["weight_map"]["transformer.wte.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"not a file name in the model directory"):
        load_gpt2(tmp_path)

    index = json.loads(original)
    holder = index["weight_map"]["transformer.ln_f.bias"]
    index["weight_map"]["transformer.ln_f.bias"] = next(s for s in sorted(shards) if s != holder)
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"maps 'transformer\.ln_f\.bias' to .*, which lacks it"):
        load_gpt2(tmp_path)

    index_path.write_text("{}")
    with pytest.raises(WeightsError, match="no weight_map"):
        load_gpt2(tmp_path)


# -- config --------------------------------------------------------------------------------


def test_config_from_hf_and_back(hf, tmp_path: Path) -> None:
    hf = transformers.GPT2Config(**TINY, n_inner=200, layer_norm_epsilon=1e-6)
    hf.save_pretrained(tmp_path)
    config = GPT2Config.from_json(tmp_path / "config.json")
    assert (config.n_inner, config.d_ff, config.layer_norm_epsilon) == (200, 200, 1e-6)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    back = transformers.GPT2Config.from_pretrained(tmp_path)
    for key, value in config.to_dict().items():
        if key not in ("model_type", "architectures"):
            assert getattr(back, key) == value, key
    assert back.architectures == ["GPT2LMHeadModel"]


def test_config_aliases_and_defaults() -> None:
    config = GPT2Config.from_dict({"vocab_size": 10, "n_ctx": 8, "n_embd": 4, "n_layer": 1, "n_head": 2})
    assert (config.n_positions, config.d_ff, config.activation_function) == (8, 16, "gelu_new")
    assert config.tie_word_embeddings and config.eos_token_id == 50256


GOOD = {"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 4, "n_layer": 1, "n_head": 2}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_head": None}, r"missing key 'n_head'"),
        ({"n_embd": 6, "n_head": 4}, r"n_embd=6 is not divisible by n_head=4"),
        ({"n_layer": 0}, r"n_layer=0 must be a positive integer"),
        ({"vocab_size": "10"}, r"vocab_size='10' must be a positive integer"),
        ({"n_head": True}, r"n_head=True must be a positive integer"),
        ({"n_inner": -1}, r"n_inner=-1 must be a positive integer or null"),
        ({"layer_norm_epsilon": 0}, r"layer_norm_epsilon=0 must be a positive number"),
        ({"activation_function": "relu"}, r"'relu' is not supported: only the tanh GELU"),
        ({"activation_function": "gelu"}, r"only the tanh GELU \(gelu_new, gelu_pytorch_tanh\)"),
        ({"model_type": "llama"}, r"model_type is 'llama', but opswitch only runs GPT-2"),
        ({"scale_attn_by_inverse_layer_idx": True}, r"scale_attn_by_inverse_layer_idx=True is not supported"),
        ({"tie_word_embeddings": "yes"}, r"tie_word_embeddings='yes' must be true or false"),
    ],
)
def test_config_errors_name_the_file_and_key(changes: dict, message: str) -> None:
    d = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    with pytest.raises(ConfigError, match=message) as err:
        GPT2Config.from_dict(d, source="models/x/config.json")
    assert str(err.value).startswith("models/x/config.json: ")


def test_config_accepts_pytorch_tanh_gelu() -> None:
    assert GPT2Config.from_dict({**GOOD, "activation_function": "gelu_pytorch_tanh"}).d_ff == 16


def test_config_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        GPT2Config.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        GPT2Config.from_json(tmp_path / "config.json")


def test_config_validates_direct_construction() -> None:
    with pytest.raises(ConfigError, match="GPT2Config: n_embd=10 is not divisible by n_head=3"):
        GPT2Config(vocab_size=5, n_positions=4, n_embd=10, n_layer=1, n_head=3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_counts_match_transformers(hf, name: str) -> None:
    preset = PRESETS[name]
    hf_config = transformers.GPT2Config.from_dict(preset.to_dict())
    with torch.device("meta"):  # shapes only: gpt2-xl costs no memory
        hf_model = transformers.GPT2LMHeadModel(hf_config)
    assert preset.n_params == sum(p.numel() for p in hf_model.parameters())  # tied head counted once


def test_preset_sizes() -> None:
    assert PRESETS["gpt2"].n_params == 124_439_808
    assert PRESETS["distilgpt2"].n_layer == 6 and PRESETS["distilgpt2"].n_embd == PRESETS["gpt2"].n_embd
