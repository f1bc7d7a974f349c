"""GGUF fixtures written with ggml-org's own ``gguf.GGUFWriter``, laid out as llama.cpp's
converter lays out a GPT-2 (``convert_hf_to_gguf.py``, class GPT2Model + ModelBase.prepare_tensors):

* HF names -> ggml names, the causal-mask buffers dropped, Conv1D weights
  (``c_attn``, ``c_proj``, ``c_fc``) transposed to one output channel per row;
* 1-D tensors, norms and ``position_embd`` always F32, the other matrices in the out type
  (quantised with ``gguf.quants.quantize``);
* ``gpt2.*`` hyper-parameters as ``set_gguf_parameters`` writes them (feed_forward_length
  = 4 * n_embd, context_length = n_ctx) and the tokenizer as ``_set_vocab_gpt2`` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HF_TO_GGUF = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "lm_head": "output"}
BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
         "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TRANSPOSED = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}


def gguf_tensor_name(hf_name: str) -> str | None:
    name = hf_name.removeprefix("transformer.")
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    stem, _, kind = name.rpartition(".")
    if stem in HF_TO_GGUF:
        return f"{HF_TO_GGUF[stem]}.{kind}"
    _, layer, rest = stem.split(".", 2)
    return f"blk.{layer}.{BLOCK[rest]}.{kind}"


def converter_tensors(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{ggml name: float32 array as the converter hands it to quantize} from an HF state dict."""
    out = {}
    for hf_name, a in state.items():
        name = gguf_tensor_name(hf_name)
        if name is None:
            continue
        a = np.asarray(a, dtype=np.float32)
        out[name] = np.ascontiguousarray(a.T) if hf_name.endswith(TRANSPOSED) else a
    return out


def write_gguf(path: Path, hparams: dict, tensors: dict[str, np.ndarray], outtype: str = "f32",
               vocab: dict | None = None, arch: str = "gpt2", types: dict[str, str] | None = None) -> Path:
    """A GGUF as the converter writes it; ``types`` forces a type per tensor name."""
    import gguf
    from gguf.constants import GGMLQuantizationType as T

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hparams["n_layer"])
    w.add_context_length(hparams["n_ctx"])
    w.add_embedding_length(hparams["n_embd"])
    w.add_feed_forward_length(4 * hparams["n_embd"])
    w.add_head_count(hparams["n_head"])
    w.add_layer_norm_eps(hparams["layer_norm_epsilon"])
    w.add_file_type(FILE_TYPES[outtype])
    if vocab:
        w.add_tokenizer_model(vocab.get("model", "gpt2"))
        w.add_tokenizer_pre(vocab.get("pre", "gpt-2"))
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        if vocab.get("bos") is not None:
            w.add_bos_token_id(vocab["bos"])
        if vocab.get("eos") is not None:
            w.add_eos_token_id(vocab["eos"])
    for name, a in tensors.items():
        kind = (types or {}).get(name)
        if kind is None:
            keep_f32 = a.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd")
            kind = "f32" if keep_f32 else outtype
        qtype = T[kind.upper()]
        if qtype == T.F32:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        else:
            data = gguf.quants.quantize(np.asarray(a, dtype=np.float32), qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_hparams(config) -> dict:
    return {"n_layer": config.n_layer, "n_ctx": config.n_positions, "n_embd": config.n_embd,
            "n_head": config.n_head, "layer_norm_epsilon": config.layer_norm_epsilon}


def hf_model_to_gguf(model, path: Path, outtype: str = "f32", vocab: dict | None = None) -> Path:
    """A random HF GPT2LMHeadModel written as the converter would (tied lm_head dropped, as
    ``save_pretrained`` drops it)."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return write_gguf(path, hf_hparams(model.config), converter_tensors(state), outtype, vocab)


def vocab_from_dir(directory: Path, eos: int | None = None) -> dict:
    """The ``_set_vocab_gpt2`` arrays of a vocab.json + merges.txt folder (``<|endoftext|>`` control)."""
    import json

    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    merges = [line for line in (directory / "merges.txt").read_text(encoding="utf-8").split("\n")[1:] if line]
    size = max(vocab.values()) + 1
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [5 if i not in by_id else 3 if by_id[i] == "<|endoftext|>" else 1 for i in range(size)]
    eot = vocab.get("<|endoftext|>")
    return {"tokens": tokens, "types": types, "merges": merges, "bos": eot,
            "eos": eot if eos is None else eos}
