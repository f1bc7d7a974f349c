"""GPT-2 -> a standard ONNX graph, built node by node with ``onnx.helper``.

The graph is the forward pass of ``model/gpt2.py`` in batched form
(``[batch, sequence, n_embd]``) using only standard opset-17 ops:
``LayerNormalization``, ``MatMul`` + ``Add`` in the checkpoint's Conv1D
layout, GELU's tanh formula written out, ``Softmax`` behind a causal
``Where``.  Initializers carry HF's checkpoint names
(``transformer.h.0.attn.c_attn.weight``...), so any tool shows weights a
GPT-2 user recognises.  Batch and sequence axes are dynamic.

``with_past`` adds the KV cache as optimum names it: inputs
``past_key_values.N.key/value`` and outputs ``present.N.key/value``, each
``[batch, n_head, length, head_dim]``; a zero-length past is a prefill, so
one graph serves prefill and decode.  (No ``attention_mask``: sequences in a
batch are unpadded.)
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from opswitch import __version__
from opswitch.model.config import GPT2Config
from opswitch.model.weights import flatten_params
from opswitch.onnx import OnnxError, require_onnx

OPSET = 17
IR_VERSION = 8  # the IR of opset 17 (onnx 1.12): readable by every runtime that has opset 17
PROTOBUF_LIMIT = 2**31  # one protobuf message holds at most 2 GB: bigger weights go external
_HEADROOM = 64 * 2**20  # the graph itself, and protobuf framing


class _Builder:
    """Appends nodes with generated output names; constants as ``Constant`` nodes,
    so that the initializers are exactly the model's weights."""

    def __init__(self, onnx) -> None:
        self.onnx, self._n = onnx, 0
        self.nodes: list[Any] = []

    def __call__(self, op: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        self._n += 1
        out = out or f"{op.lower()}_{self._n}"
        node = self.onnx.helper.make_node(op, list(inputs), [out], name=f"{op}_{self._n}", **attrs)
        self.nodes.append(node)
        return out

    def split(self, x: str, n: int, axis: int) -> list[str]:
        self._n += 1
        outs = [f"split_{self._n}_{i}" for i in range(n)]
        self.nodes.append(self.onnx.helper.make_node("Split", [x], outs, name=f"Split_{self._n}", axis=axis))
        return outs

    def const(self, value, dtype=np.float32) -> str:
        tensor = self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype))
        return self("Constant", value=tensor)


def _gelu(g: _Builder, x: str) -> str:  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    cube = g("Mul", g("Mul", x, x), x)
    inner = g("Mul", g("Add", x, g("Mul", cube, g.const(0.044715))), g.const(math.sqrt(2.0 / math.pi)))
    return g("Mul", g("Mul", x, g.const(0.5)), g("Add", g("Tanh", inner), g.const(1.0)))


def _linear(g: _Builder, x: str, prefix: str) -> str:  # [.., n_in] -> [.., n_out]
    return g("Add", g("MatMul", x, f"{prefix}.weight"), f"{prefix}.bias")


def _attention(g, x, prefix, config, mask, past):  # [B, S, E] -> [B, S, E], (present k, v)
    n_head, d = config.n_head, config.n_embd // config.n_head
    to_heads = g.const([0, 0, n_head, d], np.int64)
    q, k, v = (g("Transpose", g("Reshape", t, to_heads), perm=[0, 2, 1, 3])  # [B, H, S, D]
               for t in g.split(_linear(g, x, f"{prefix}.c_attn"), 3, axis=-1))
    if past is not None:
        i = past
        k = g("Concat", f"past_key_values.{i}.key", k, axis=2, out=f"present.{i}.key")
        v = g("Concat", f"past_key_values.{i}.value", v, axis=2, out=f"present.{i}.value")
    scores = g("Mul", g("MatMul", q, g("Transpose", k, perm=[0, 1, 3, 2])), g.const(1.0 / math.sqrt(d)))
    probs = g("Softmax", g("Where", mask, g.const(-np.inf), scores), axis=-1)  # [B, H, S, P + S]
    merged = g("Reshape", g("Transpose", g("MatMul", probs, v), perm=[0, 2, 1, 3]),
               g.const([0, 0, config.n_embd], np.int64))
    return _linear(g, merged, f"{prefix}.c_proj"), (k, v)


def _graph_body(g: _Builder, config: GPT2Config, with_past: bool, head: str) -> str:
    """Nodes from ``input_ids`` to ``logits``; returns the logits' name."""
    one = g.const(1, np.int64)
    seq = g("Squeeze", g("Shape", "input_ids", start=1, end=2), g.const([0], np.int64))
    past_len = (g("Squeeze", g("Shape", "past_key_values.0.key", start=2, end=3), g.const([0], np.int64))
                if with_past else g.const(0, np.int64))
    total = g("Add", past_len, seq)
    positions = g("Range", past_len, total, one)  # [S]: this chunk's absolute positions
    # causal mask [S, P + S]: query at position p sees keys 0..p
    mask = g("Greater", g("Range", g.const(0, np.int64), total, one),
             g("Unsqueeze", positions, g.const([1], np.int64)))
    eps = config.layer_norm_epsilon
    x = g("Add", g("Gather", "transformer.wte.weight", "input_ids"),
          g("Gather", "transformer.wpe.weight", positions))
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        h = g("LayerNormalization", x, f"{p}.ln_1.weight", f"{p}.ln_1.bias", axis=-1, epsilon=eps)
        a, _ = _attention(g, h, f"{p}.attn", config, mask, i if with_past else None)
        x = g("Add", x, a)
        h = g("LayerNormalization", x, f"{p}.ln_2.weight", f"{p}.ln_2.bias", axis=-1, epsilon=eps)
        x = g("Add", x, _linear(g, _gelu(g, _linear(g, h, f"{p}.mlp.c_fc")), f"{p}.mlp.c_proj"))
    x = g("LayerNormalization", x, "transformer.ln_f.weight", "transformer.ln_f.bias", axis=-1, epsilon=eps)
    return g("MatMul", x, g("Transpose", head, perm=[1, 0]), out="logits")  # [B, S, n_vocab]


def build_model(config: GPT2Config, params: dict, *, with_past: bool = False) -> Any:
    """The ``onnx.ModelProto`` of a GPT-2 (weights inside; see ``export_onnx`` for writing)."""
    onnx = require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    flat = flatten_params(params)
    tied = "lm_head.weight" not in flat
    head = "transformer.wte.weight" if tied else "lm_head.weight"
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32),
                                name if name == "lm_head.weight" else f"transformer.{name}")
        for name, a in flat.items()
    ]
    g = _Builder(onnx)
    _graph_body(g, config, with_past, head)

    n_head, d = config.n_head, config.n_embd // config.n_head
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", "sequence", config.vocab_size])]
    if with_past:
        info, f32 = helper.make_tensor_value_info, TensorProto.FLOAT
        past = ["batch", n_head, "past_sequence", d]
        present = ["batch", n_head, "past_sequence + sequence", d]
        for i in range(config.n_layer):
            for kind in ("key", "value"):
                inputs.append(info(f"past_key_values.{i}.{kind}", f32, past))
                outputs.append(info(f"present.{i}.{kind}", f32, present))
    graph = helper.make_graph(g.nodes, "gpt2", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="opswitch", producer_version=__version__, ir_version=IR_VERSION)
    model.doc_string = (f"GPT-2 ({config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, "
                        f"vocab {config.vocab_size}, context {config.n_positions})"
                        + (" with KV cache inputs/outputs" if with_past else ""))
    return model


def export_onnx(
    config: GPT2Config,
    params: dict,
    path: str | Path,
    *,
    with_past: bool = False,
    external_data: bool | None = None,
) -> Path:
    """Write the model to ``path`` atomically and check it with ``onnx.checker`` (full check).

    ``external_data`` puts the weights in ``<name>.data`` beside the file;
    ``None`` does so only when they would not fit one protobuf (2 GB).
    Nothing is left at ``path`` unless the whole file was written and passed.
    """
    onnx = require_onnx()
    path = Path(path)
    if not path.parent.is_dir():
        raise OnnxError(f"cannot write {path}: {path.parent} is not a directory")
    weight_bytes = sum(int(np.size(a)) * 4 for a in flatten_params(params).values())
    if external_data is None:
        external_data = weight_bytes + _HEADROOM >= PROTOBUF_LIMIT
    model = build_model(config, params, with_past=with_past)
    data_name = f"{path.name}.data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        written = tmp / path.name
        if external_data:
            onnx.save_model(model, written, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=0)
        else:
            onnx.save_model(model, written)
        onnx.checker.check_model(str(written), full_check=True)
        if external_data:
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(written, path)
    except OSError as e:
        raise OnnxError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
