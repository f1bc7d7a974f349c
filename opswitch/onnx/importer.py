"""An ONNX GPT-2 -> ``(GPT2Config, params)``, so it runs on our ops and any backend.

We do not execute the ONNX graph: we recognise the GPT-2 in it and take its
weights.  Recognition follows the data flow, not the names (exporters rename
and even share identical initializers): the token embedding is the float
matrix ``Gather``-ed by the input ids, the position embedding the other one;
``LayerNormalization`` nodes in graph order are ``ln_1``, ``ln_2`` per layer
and then ``ln_f``; the ``MatMul``/``Gemm`` nodes with a weight operand are
``c_attn``, ``c_proj``, ``c_fc``, ``c_proj`` per layer and the head last,
each with its bias (Gemm's C, or the ``Add`` that follows).  The number of
heads comes from the reshape to ``[..., n_head, head_dim]``.

Anything we do not understand stops the import with a one-line error naming
it, rather than running a model that is not the one in the file: an op
outside the list a GPT-2 graph uses, a float weight no role claims, a shape
that does not fit, a count that does not add up.  Before that, the file and
its tensors are checked (``tensors``) and the graph's shape (``structure``);
last, the graph itself is run on inputs of our choosing (``verify``) and must
give the logits of the GPT-2 built from the weights taken, which catches a
graph that is wired differently around the right weights.  Works for our own export and
for ``torch.onnx.export(..., dynamo=True)`` of HF's ``GPT2LMHeadModel``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from opswitch.model.config import GPT2Config
from opswitch.model.weights import Params, nest_params
from opswitch.onnx import OnnxError
from opswitch.onnx.structure import check_structure, logits_name, token_input_name
from opswitch.onnx.tensors import _dtype_name, check_tensors, read_model, tensor_array
from opswitch.onnx.verify import check_by_running

# Every op the two exporters we support emit: weights, the forward pass, and
# the shape and mask arithmetic around it.  Anything else is refused.
KNOWN_OPS = frozenset({
    "Add", "And", "Cast", "CastLike", "Concat", "Constant", "ConstantOfShape", "CumSum", "Div", "Equal",
    "Expand", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "Greater", "GreaterOrEqual",
    "Identity", "IsInf", "IsNaN", "LayerNormalization", "Less", "LessOrEqual", "MatMul", "Max", "Min",
    "Mul", "Neg", "Not", "Or", "Pow", "Range", "Reshape", "Shape", "Slice", "Softmax", "Split", "Sqrt",
    "Squeeze", "Sub", "Tanh", "Transpose", "Trilu", "Unsqueeze", "Where",
})
_PASS_THROUGH = {"Identity", "Cast", "CastLike"}  # a weight seen through these is still the weight
_LOGITS_TAIL = {"Identity", "Cast", "CastLike", "Reshape", "Squeeze", "Unsqueeze"}  # may follow the head
_FLOATS = {1: np.float32, 10: np.float16, 11: np.float64, 16: "bfloat16"}  # TensorProto codes


def load_onnx(path: str | Path, *, verify: bool = True) -> tuple[GPT2Config, Params]:
    """Read an ONNX GPT-2 into (config, float32 params named like the checkpoint).

    The file and every tensor in it are checked first (``onnx.tensors``), then the graph's
    shape (``onnx.structure``: no cycles, nothing off the logits' path).  With ``verify``,
    the graph is then run on inputs of our choosing and must give our logits
    (``onnx.verify``): a graph that computes something else than GPT-2 (another mask, scale
    or wiring) is refused even if its weights looked right.
    """
    path = Path(path)
    model = read_model(path)
    check_tensors(model, path)
    check_structure(model.graph, path)
    mapper = GraphMapper(model.graph, path)
    config, params = mapper.map()
    if verify:
        check_by_running(model, path, config, params, mapper.initializer_arrays())
    return config, params


# ------------------------------------------------------------------------------ mapping
@dataclass
class _Linear:
    node: Any  # an onnx NodeProto
    weight: str  # initializer name
    transposed: bool  # the initializer is [out, in] (Gemm transB, or a Transpose before MatMul)
    bias: str | None


class GraphMapper:
    """Walks one graph and assigns its weights to GPT-2's roles (see the module docstring)."""

    def __init__(self, graph: Any, source: Path) -> None:
        self.graph, self.source = graph, source
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.claimed: dict[str, str] = {}  # initializer -> the role that took it
        self._arrays: dict[str, np.ndarray] = {}
        self._sources: dict[str, tuple[str, bool] | None] = {}
        self._dependents: dict[str, set[str]] = {}

    def initializer_arrays(self) -> dict[str, np.ndarray]:
        """Every initializer as an array (the weights memory-mapped or already read), for the check run."""
        return {t.name: self._arrays[t.name] if t.name in self._arrays and t.data_type == 1
                else tensor_array(t, self.source) for t in self.graph.initializer}

    def fail(self, message: str) -> NoReturn:
        raise OnnxError(f"{self.source}: {message}; opswitch maps GPT-2 graphs only")

    @staticmethod
    def describe(node: Any) -> str:
        return f"{node.op_type} node {node.name or node.output[0]!r}"

    # -- small helpers
    def array(self, name: str, role: str) -> np.ndarray:
        """The float initializer ``name`` as float32, claimed for ``role``."""
        tensor = self.inits[name]
        if tensor.data_type not in _FLOATS:
            dtype = _dtype_name(tensor.data_type)
            self.fail(f"initializer {name!r} used as {role} is {dtype}, not a float type")
        if name not in self._arrays:
            a = tensor_array(tensor, self.source)
            self._arrays[name] = np.asarray(a, dtype=np.float32)
        self.claimed.setdefault(name, role)
        return self._arrays[name]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a small constant input (an initializer or a Constant node), if it is one."""
        if name in self.inits:
            return tensor_array(self.inits[name], self.source)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            from onnx import helper

            for attr in node.attribute:
                if attr.name == "value":
                    return tensor_array(helper.get_attribute_value(attr), self.source)
        return None

    def weight_source(self, name: str, floats_only: bool = False) -> tuple[str, bool] | None:
        """(initializer, transposed) when ``name`` is an initializer, maybe seen through
        Identity/Cast or a 2-D Transpose (any dtype, so that a wrong one is named).

        Each value's answer is kept, so a hostile graph of many users of one long chain
        costs one walk of it (the chain ends: ``check_structure`` ruled out cycles)."""
        if name not in self._sources:
            self._walk_to_weight(name)
        found = self._sources[name]
        if found is None or (floats_only and self.inits[found[0]].data_type not in _FLOATS):
            return None
        return found

    def _walk_to_weight(self, name: str) -> None:
        """Follow ``name`` up its pass-through chain and record the answer for every value on it."""
        path: list[tuple[str, bool]] = []  # (value, transposed relative to the start)
        transposed, found = False, None
        while True:
            if name in self._sources:  # the rest of this chain is known
                rest = self._sources[name]
                found = None if rest is None else (rest[0], rest[1] ^ transposed)
                break
            path.append((name, transposed))
            if name in self.inits:
                found = (name, transposed) if len(self.inits[name].dims) >= 1 else None
                break
            node = self.producer.get(name)
            if node is None or not node.input:
                break
            if node.op_type in _PASS_THROUGH:
                name = node.input[0]
            elif node.op_type == "Transpose" and _attr(node, "perm", [1, 0]) == [1, 0]:
                name, transposed = node.input[0], not transposed
            else:
                break
        for value, parity in path:
            self._sources[value] = None if found is None else (found[0], found[1] ^ parity)

    def depends_on(self, name: str, target: str) -> bool:
        """Does ``name``'s value flow from ``target`` (not merely from its shape)?  One pass
        over the graph per target, in its (checked) topological order."""
        if target not in self._dependents:
            flows = {target}
            for node in self.graph.node:
                if node.op_type != "Shape" and any(i in flows for i in node.input):
                    flows.update(o for o in node.output if o)
            self._dependents[target] = flows
        return name in self._dependents[target]

    # -- the walk
    def map(self) -> tuple[GPT2Config, Params]:
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in KNOWN_OPS:
                domain = f" (domain {node.domain})" if node.domain not in ("", "ai.onnx") else ""
                self.fail(f"{self.describe(node)}{domain} is not an op a GPT-2 graph uses")
        ids = self.token_input()
        wte, wpe = self.embeddings(ids)
        n_vocab, n_embd = self.inits[wte].dims
        norms = self.layernorms(n_embd)
        linears = self.linears()
        n_layer = (len(norms) - 1) // 2
        if n_layer < 1 or len(norms) != 2 * n_layer + 1 or len(linears) != 4 * n_layer + 1:
            self.fail(f"found {len(norms)} LayerNormalization and {len(linears)} weight MatMul/Gemm nodes; "
                      "a GPT-2 of L layers has 2L+1 and 4L+1")
        self.check_counts(n_layer)
        n_head = self.heads(n_embd, linears[0].node)
        flat, eps = {}, norms[0][2]
        flat["wte.weight"] = self.array(wte, "wte.weight")
        flat["wpe.weight"] = self.array(wpe, "wpe.weight")
        lns = [f"h.{i}.{ln}" for i in range(n_layer) for ln in ("ln_1", "ln_2")] + ["ln_f"]
        for name, (g, b, e) in zip(lns, norms):
            if e != eps:
                self.fail(f"layer norms use different epsilons ({eps:g} and {e:g})")
            flat[f"{name}.weight"], flat[f"{name}.bias"] = self.norm_params(name, g, b, n_embd)
        d_ff = self.linear_params(linears[2], "h.0.mlp.c_fc", n_embd, None)[0].shape[1]
        roles = [("attn.c_attn", n_embd, 3 * n_embd), ("attn.c_proj", n_embd, n_embd),
                 ("mlp.c_fc", n_embd, d_ff), ("mlp.c_proj", d_ff, n_embd)]
        for i in range(n_layer):
            for j, (role, n_in, n_out) in enumerate(roles):
                w, bias = self.linear_params(linears[4 * i + j], f"h.{i}.{role}", n_in, n_out)
                flat[f"h.{i}.{role}.weight"], flat[f"h.{i}.{role}.bias"] = w, bias
        head, head_bias = self.linear_params(linears[-1], "lm_head", n_embd, n_vocab)
        if np.any(head_bias):
            self.fail(f"the output projection ({self.describe(linears[-1].node)}) has a bias; "
                      "GPT-2's has none")
        self.check_head_gives_the_logits(linears[-1])
        tied = linears[-1].weight == wte or np.array_equal(head.T, flat["wte.weight"])
        if not tied:
            flat["lm_head.weight"] = np.ascontiguousarray(head.T)
        self.check_all_claimed()
        config = GPT2Config(
            vocab_size=int(n_vocab), n_positions=int(self.inits[wpe].dims[0]), n_embd=int(n_embd),
            n_layer=n_layer, n_head=n_head, n_inner=None if d_ff == 4 * n_embd else int(d_ff),
            layer_norm_epsilon=float(np.format_float_scientific(np.float32(eps), unique=True)),
            bos_token_id=50256 if n_vocab > 50256 else None, eos_token_id=50256 if n_vocab > 50256 else None,
            tie_word_embeddings=bool(tied),
        )
        return config, nest_params(flat, n_layer)

    def token_input(self) -> str:
        name = token_input_name(self.graph)
        if name is None:
            self.fail("the graph has no integer input (token ids)")
        return name

    def embeddings(self, ids: str) -> tuple[str, str]:
        """(wte, wpe): the float matrices gathered by the token ids, and by anything else."""
        wte: set[str] = set()
        wpe: set[str] = set()
        for node in self.graph.node:
            if node.op_type != "Gather" or _attr(node, "axis", 0) != 0:
                continue
            src = self.weight_source(node.input[0], floats_only=True)
            if src is None or src[1] or len(self.inits[src[0]].dims) != 2:
                continue
            (wte if self.depends_on(node.input[1], ids) else wpe).add(src[0])
        if len(wte) != 1:
            self.fail(f"expected one token embedding (a float matrix Gather-ed by {ids!r}), found {len(wte)}")
        if len(wpe - wte) != 1:
            self.fail(f"expected one position embedding (a float matrix Gather-ed by positions), "
                      f"found {len(wpe - wte)}")
        (t,), (p,) = wte, wpe - wte
        if self.inits[t].dims[1] != self.inits[p].dims[1]:
            self.fail(f"token embedding {t!r} {list(self.inits[t].dims)} and position embedding {p!r} "
                      f"{list(self.inits[p].dims)} differ in width")
        return t, p

    def layernorms(self, n_embd: int) -> list[tuple[str, str | None, float]]:
        found = []
        for node in self.graph.node:
            if node.op_type != "LayerNormalization":
                continue
            if _attr(node, "axis", -1) not in (-1, 2):
                self.fail(f"{self.describe(node)} normalises axis {_attr(node, 'axis', -1)}, not the last")
            scale = self.weight_source(node.input[1])
            bias = self.weight_source(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if scale is None or (len(node.input) > 2 and node.input[2] and bias is None):
                self.fail(f"{self.describe(node)} takes its scale or bias from a computed value, "
                          "not a weight")
            found.append((scale[0], bias[0] if bias else None, float(_attr(node, "epsilon", 1e-5))))
        return found

    def norm_params(self, role: str, g: str, b: str | None, n_embd: int) -> tuple[np.ndarray, np.ndarray]:
        gain = self.array(g, f"{role}.weight")
        bias = self.array(b, f"{role}.bias") if b else np.zeros(n_embd, np.float32)
        for name, a in ((g, gain), (b, bias)):
            if a.shape != (n_embd,):
                self.fail(f"initializer {name!r} used as {role} has shape {list(a.shape)}, "
                          f"expected [{n_embd}]")
        return gain, bias

    def linears(self) -> list[_Linear]:
        found = []
        for node in self.graph.node:
            if node.op_type not in ("MatMul", "Gemm"):
                continue
            src = self.weight_source(node.input[1])
            if src is None:
                if any(self.weight_source(i) for i in node.input[:1]):
                    self.fail(f"{self.describe(node)} multiplies a weight from the left")
                continue
            weight, transposed = src
            bias = None
            if node.op_type == "Gemm":
                scaled = _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0
                if _attr(node, "transA", 0) or scaled:
                    self.fail(f"{self.describe(node)} scales or transposes its input (transA/alpha/beta)")
                transposed ^= bool(_attr(node, "transB", 0))
                if len(node.input) > 2 and node.input[2]:
                    bias = self.bias_source(node, node.input[2])
            else:
                users = self.consumers.get(node.output[0], [])
                if len(users) == 1 and users[0].op_type == "Add":
                    other = [i for i in users[0].input if i != node.output[0]]
                    src_b = self.weight_source(other[0]) if other else None
                    if src_b is not None and not src_b[1] and len(self.inits[src_b[0]].dims) == 1:
                        bias = src_b[0]
            found.append(_Linear(node, weight, transposed, bias))
        return found

    def check_head_gives_the_logits(self, head: _Linear) -> None:
        """Nothing may compute on the logits after the output projection but reshapes and casts:
        a change there (logits negated past some position) could hide beyond any length the
        check run can afford on a large model, so it is refused by the graph's shape."""
        name: str = head.node.output[0]
        target = logits_name(self.graph)
        while name != target:
            users = self.consumers.get(name, [])
            user = users[0] if len(users) == 1 and users[0].output and users[0].output[0] else None
            reshaped = user is not None and user.op_type in _LOGITS_TAIL and user.input[0] == name
            own_bias = user is not None and user.op_type == "Add" and head.bias is not None  # zero, checked
            if not (reshaped or own_bias):
                what = " and ".join(self.describe(u) for u in users[:2]) or "no node"
                self.fail(f"the output projection's result goes to {what} before the logits; "
                          "a GPT-2 computes nothing after its head")
            name = user.output[0]  # type: ignore[union-attr]  # fail() raised when there is no user

    def bias_source(self, node: Any, name: str) -> str:
        src = self.weight_source(name)
        if src is None:
            self.fail(f"{self.describe(node)} adds a computed value, not a bias weight")
        return src[0]

    def linear_params(self, lin: _Linear, role: str, n_in: int, n_out: int | None,
                      ) -> tuple[np.ndarray, np.ndarray]:
        w = self.array(lin.weight, f"{role}.weight")
        w = w.T if lin.transposed else w
        if w.ndim != 2 or w.shape[0] != n_in or (n_out is not None and w.shape[1] != n_out):
            want = f"[{n_in}, {n_out if n_out is not None else 'd_ff'}]"
            self.fail(f"initializer {lin.weight!r} ({self.describe(lin.node)}) is used as {role} but "
                      f"has shape {list(self.inits[lin.weight].dims)}"
                      f"{' transposed' if lin.transposed else ''}; expected {want}")
        n = w.shape[1]
        b = self.array(lin.bias, f"{role}.bias").reshape(-1) if lin.bias else np.zeros(n, np.float32)
        if b.shape != (n,):
            self.fail(f"initializer {lin.bias!r} used as {role}.bias has {b.size} values, expected {n}")
        return np.ascontiguousarray(w), b

    def heads(self, n_embd: int, c_attn: Any) -> int:
        """n_head from the first reshape to [..., n_head, head_dim] after c_attn."""
        nodes = list(self.graph.node)
        start = next(i for i, n in enumerate(nodes) if n is c_attn)
        for node in nodes[start:]:
            if node.op_type != "Reshape":
                continue
            shape = self.constant(node.input[1])
            if shape is not None and shape.size == 4 and shape[-1] > 0 and shape[-2] > 0 \
                    and shape[-1] * shape[-2] == n_embd:
                return int(shape[-2])
        self.fail("cannot find the number of attention heads (no reshape to [batch, seq, n_head, head_dim])")

    def check_counts(self, n_layer: int) -> None:
        """One softmax and one tanh-GELU per layer: the attention and activation GPT-2 has."""
        ops = Counter(n.op_type for n in self.graph.node)
        if ops["Softmax"] != n_layer:
            self.fail(f"{ops['Softmax']} Softmax nodes for {n_layer} layers; "
                      "GPT-2 attention has one per layer")
        gelus = [n for n in self.graph.node if n.op_type == "Gelu"]
        for node in gelus:
            if _attr(node, "approximate", b"none") not in (b"tanh", "tanh"):
                self.fail(f"{self.describe(node)} is the erf GELU; GPT-2 uses the tanh approximation")
        if ops["Tanh"] + len(gelus) != n_layer:
            self.fail(f"{ops['Tanh']} Tanh and {len(gelus)} Gelu nodes for {n_layer} layers; "
                      "GPT-2's MLP has one tanh-GELU per layer")

    def check_all_claimed(self) -> None:
        """Every float tensor with more than one value must be a weight we placed."""
        for tensor in self.graph.initializer:
            if tensor.name in self.claimed or tensor.data_type not in _FLOATS:
                continue
            if int(np.prod(tensor.dims, dtype=np.int64)) > 1:
                users = self.consumers.get(tensor.name, [])
                by = f", used by {self.describe(users[0])}" if users else ", unused"
                self.fail(f"initializer {tensor.name!r} {list(tensor.dims)}{by} is not a GPT-2 weight "
                          "opswitch recognises")
        for node in self.graph.node:
            if node.op_type == "Constant":
                value = self.constant(node.output[0])
                if value is not None and value.dtype.kind == "f" and value.size > 1:
                    self.fail(f"{self.describe(node)} holds a float tensor {list(value.shape)} that is not "
                              "a GPT-2 weight opswitch recognises")


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default
