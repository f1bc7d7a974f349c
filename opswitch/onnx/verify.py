"""Run an ONNX graph on inputs of our choosing and compare its logits with our GPT-2.

The importer maps weights by recognising a GPT-2 in the graph; this run is
what catches a graph wired differently around the right weights: another
mask, scale or wiring, or logits changed past some position.  So it runs on
lengths we pick: 1; 2, in a batch of two if the batch is dynamic; the
longest that is cheap (the whole context for small models), split into a
prefill and a chunk through the KV cache when the graph has one; and with a
cache, two tokens after a random past ending at the context's last position
and at a random one.  Token ids are drawn at random at each load (a graph
cannot single out the ids it will be checked on); the shapes the file
declares are never used.

The graph cannot make the check expensive either: onnx's reference
evaluator runs node by node under our loop, and before each node its
output size (and for MatMul/Gemm, its multiply-adds) is bounded from the
actual input shapes and values; the live values, the total work and the
wall time each have a budget scaled to the model's own weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from opswitch.core.registry import get_registry
from opswitch.model.config import GPT2Config
from opswitch.model.gpt2 import GPT2
from opswitch.model.weights import Params
from opswitch.onnx import OnnxError
from opswitch.onnx.structure import describe, logits_name, token_input_name
from opswitch.onnx.tensors import onnx_dtype

# float32 runs of the same GPT-2 agree to ~1e-6 of the logit scale; a structural difference
# moves logits by O(1) of it, so 1e-3 separates the two.
TOLERANCE = 1e-3
FULL_CHECK_WORK = 2**29  # multiply-adds (tokens x weights) we spend to check every position
MIN_LONG = 11  # the long run is longer than any threshold a graph could test on short inputs
TIME_LIMIT = 120.0  # seconds, far above a real run (GPT-2 small: about a second)

_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Equal", "Greater", "GreaterOrEqual", "Less",
              "LessOrEqual", "And", "Or", "Where", "Max", "Min"}


def check_by_running(model: Any, source: Path, config: GPT2Config, params: Params, inits: dict) -> None:
    """Refuse the model unless its graph gives our logits on every run (see the module docstring).

    ``inits`` holds the graph's initializers as arrays (weights memory-mapped, not copied).
    """
    graph = model.graph
    runner = BoundedRun(model, source, inits)
    n_weights = sum(int(np.size(a)) for a in inits.values())
    long = min(config.n_positions, max(MIN_LONG, FULL_CHECK_WORK // max(n_weights, 1)))
    rng = np.random.default_rng()
    ids = rng.integers(0, config.vocab_size, (2, long))
    ours = GPT2(config, params, get_registry().backend("naive"))
    expected = [ours.forward(ids[0]).astype(np.float64), ours.forward(ids[1, :2]).astype(np.float64)]
    feeds = Feeds(graph, source, config)
    pair = (ids[:, :2], [expected[0][:2], expected[1]]) if feeds.batched else (ids[:1, :2], [expected[0][:2]])
    runs: list[tuple[Any, ...]] = [(ids[:1, :1], [expected[0][:1]]), pair]  # (ids, rows[, past])
    if feeds.has_past and long > 2:
        split = long - min(3, long // 2)
        out = runner.run(feeds.make(ids[:1, :split]))
        compare(source, out[logits_name(graph)], [expected[0][:split]], config)
        runs.append((ids[:1, split:], [expected[0][split:]], feeds.presents(out)))
    elif long > 2:
        runs.append((ids[:1], [expected[0]]))
    if feeds.has_past:  # far positions, cheaply: a past of our choosing, then two tokens
        for start in {config.n_positions - 2, int(rng.integers(long, max(long + 1, config.n_positions - 2)))}:
            if start > long:
                runs.append(seeded_past(ours, feeds, rng, start))
    for ids_, rows, *past in runs:
        out = runner.run(feeds.make(ids_, *past))
        compare(source, out[logits_name(graph)], rows, config)


def seeded_past(ours: GPT2, feeds: Feeds, rng: np.random.Generator, start: int) -> tuple:
    """(ids, [expected logits], past): two tokens at positions ``start``, ``start + 1`` after a
    random KV cache of ``start`` positions, given to the graph as its past and to our GPT-2 as
    its cache: positions up to the context's end cost two tokens, not a whole prefill."""
    c = ours.config
    ids = rng.integers(0, c.vocab_size, (1, 2))
    cache = ours.new_cache()
    past = {}
    for layer, (k, v) in enumerate(cache.layers):
        for kind, buffer in (("key", k), ("value", v)):
            values = rng.standard_normal((c.n_head, start, c.head_dim)).astype(np.float32)
            buffer[:, :start] = values
            past[feeds.past_name(layer, kind)] = values[None]
    cache.length = start
    expected = ours.step([(ids[0], cache)], all_rows=True).astype(np.float64)
    return ids, [expected], past


def compare(source: Path, theirs: Any, rows: list[np.ndarray], config: GPT2Config) -> None:
    theirs = np.asarray(theirs, dtype=np.float64)
    n = rows[0].shape[0]
    fits = theirs.size == len(rows) * n * config.vocab_size and theirs.shape[-1] == config.vocab_size
    if fits:
        theirs = theirs.reshape(len(rows), n, config.vocab_size)
        ours = np.stack(rows)
        err = np.abs(theirs - ours).max() / max(np.abs(ours).max(), 1e-30)
    else:
        err = np.inf
    if not err <= TOLERANCE:
        what = f"max error {err:.2g} of the logit scale" if fits else f"shape {list(theirs.shape)}"
        raise OnnxError(f"{source}: the graph's own logits differ from the GPT-2 opswitch built from its "
                        f"weights ({what}, {len(rows)} x {n} tokens); it computes something else than GPT-2")


class Feeds:
    """The graph's inputs, filled with values of our choosing for given token ids."""

    def __init__(self, graph: Any, source: Path, config: GPT2Config) -> None:
        self.source, self.config = source, config
        inits = {t.name for t in graph.initializer}
        self.inputs = [i for i in graph.input if i.name not in inits]
        self.ids_name = token_input_name(graph)
        dims = next(i for i in self.inputs if i.name == self.ids_name).type.tensor_type.shape.dim
        self.batched = len(dims) == 2 and not dims[0].HasField("dim_value")  # else batch 1 (an export's)
        self.past = [i.name for i in self.inputs if i.name != self.ids_name and self._is_past(i)]
        outputs = {o.name for o in graph.output}
        self.has_past = bool(self.past) and all(self._present(p) in outputs for p in self.past)

    @staticmethod
    def _present(past: str) -> str:
        return past.replace("past_key_values", "present", 1)

    @staticmethod
    def _is_past(value) -> bool:
        t = value.type.tensor_type
        return t.elem_type in (1, 10, 11) and len(t.shape.dim) == 4

    def past_name(self, layer: int, kind: str) -> str:
        """The past input for ``layer``'s keys or values (optimum's names), which must exist."""
        name = f"past_key_values.{layer}.{kind}"
        if name not in self.past:
            raise OnnxError(f"{self.source}: the graph has KV cache inputs but no {name!r}; opswitch "
                            "reads caches named as optimum names them (past_key_values.N.key/value)")
        return name

    def presents(self, out: dict) -> dict:
        return {p: out[self._present(p)] for p in self.past}

    def make(self, ids: np.ndarray, past: dict | None = None) -> dict:
        c = self.config
        batch, n = ids.shape
        empty = np.zeros((batch, c.n_head, 0, c.n_embd // c.n_head), np.float32)
        start = next(iter(past.values())).shape[2] if past else 0
        feeds = {}
        for value in self.inputs:
            name, dtype = value.name, onnx_dtype(value.type.tensor_type.elem_type)
            if name == self.ids_name:
                feeds[name] = ids.astype(dtype)
            elif name in self.past:
                feeds[name] = past[name] if past else empty.astype(dtype)
            elif "position" in name:
                feeds[name] = np.broadcast_to(np.arange(start, start + n, dtype=dtype), (batch, n)).copy()
            elif "mask" in name:
                feeds[name] = np.ones((batch, start + n), dtype=dtype)
            else:
                raise OnnxError(f"{self.source}: graph input {name!r} is neither token ids, positions, an "
                                "attention mask nor a KV cache; opswitch maps GPT-2 graphs only")
        return feeds


class BoundedRun:
    """onnx's reference evaluator, node by node, each node's cost bounded before it runs."""

    def __init__(self, model: Any, source: Path, inits: dict) -> None:
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        graph = model.graph
        self.source, self.inits, self.nodes = source, inits, list(graph.node)
        self.outputs = [o.name for o in graph.output]
        n_weights = sum(int(np.size(a)) for a in inits.values())
        self.budget = 4 * n_weights + 2**24  # live values, in elements
        self.work_budget = 8 * FULL_CHECK_WORK + 64 * n_weights  # multiply-adds and elements, per run
        stripped = helper.make_model(  # the nodes only: initializers come from ``inits``, unread here
            helper.make_graph(self.nodes, graph.name or "g", [], list(graph.output)),
            opset_imports=list(model.opset_import), ir_version=model.ir_version)
        try:
            self.impls = ReferenceEvaluator(stripped).rt_nodes_
        except Exception as e:  # the evaluator's errors are as varied as the graphs it loads
            raise self.error(None, e) from None
        self.last_use: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for name in node.input:
                self.last_use[name] = index

    def error(self, node: Any, e: Exception | str) -> OnnxError:
        why = e if isinstance(e, str) else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        at = f" at {describe(node)}" if node is not None else ""
        return OnnxError(f"{self.source}: cannot run the graph to check the weights opswitch took from it"
                         f"{at} ({why})")

    def run(self, feeds: dict) -> dict:
        values = {"": None, **self.inits, **feeds}
        live, work, started = 0, 0, time.monotonic()
        for index, (node, impl) in enumerate(zip(self.nodes, self.impls)):
            inputs = [values[name] for name in node.input]
            try:
                size, cost = bound(node.op_type, inputs, node)
            except (ValueError, TypeError, IndexError, OverflowError) as e:
                raise self.error(node, e) from None
            work += cost
            if live + size > self.budget or work > self.work_budget:
                raise self.error(node, f"it would need {size:,} more values or {work:,} operations, far "
                                       "beyond what this model's GPT-2 needs; refusing to run it")
            try:
                outputs = product(*inputs) if _is_linear(node, inputs) else impl.run(*inputs)
            except Exception as e:  # as varied as the graphs it runs
                raise self.error(node, e) from None
            for name, value in zip(node.output, outputs):
                values[name] = value
                live += int(np.size(value))
            for name in node.input:
                if self.last_use.get(name) == index and name not in self.outputs and name in values \
                        and name not in self.inits and name not in feeds and name:
                    live -= int(np.size(values.pop(name)))
            if time.monotonic() - started > TIME_LIMIT:
                raise self.error(node, f"it ran for over {TIME_LIMIT:.0f} s")
        return values


def _is_linear(node, inputs) -> bool:
    return node.op_type == "MatMul" and len(inputs) == 2 and np.ndim(inputs[0]) >= 2 \
        and np.ndim(inputs[1]) == 2


def product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray]:
    """MatMul of [..., k] by a matrix [k, n], as one 2-D GEMM: numpy's matmul of a stacked
    [2, 2, k] input takes a loop that was measured 7x slower on GPT-2's weights."""
    a = np.asarray(a)
    return ((np.ascontiguousarray(a).reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[1]),)


def bound(op: str, inputs: list, node: Any) -> tuple[int, int]:
    """(output elements, work) of one node, from its inputs' shapes (and values where they set
    the output's shape), without computing it; an upper bound."""
    shapes = [tuple(int(d) for d in np.shape(x)) if x is not None else () for x in inputs]
    sizes = [math.prod(s) for s in shapes]
    if op in _BROADCAST:
        n = math.prod(broadcast(shapes))
        return n, n
    if op == "MatMul":
        a, b = (s if len(s) > 1 else (1, *s) for s in shapes[:2])
        b = b if len(shapes[1]) > 1 else (*b[1:], 1)
        n = math.prod(broadcast([a[:-2], b[:-2]])) * a[-2] * b[-1]
        return n, n * a[-1]
    if op == "Gemm":
        n = (shapes[0][0] if not _attr(node, "transA") else shapes[0][-1]) * \
            (shapes[1][-1] if not _attr(node, "transB") else shapes[1][0])
        return n, n * shapes[0][-1]
    if op == "Expand":
        n = math.prod(broadcast([shapes[0], tuple(int(d) for d in np.ravel(inputs[1]))]))
        return n, n
    if op == "ConstantOfShape":
        n = math.prod(int(d) for d in np.ravel(inputs[0]))
        return n, n
    if op == "Range":
        start, limit, delta = (float(np.ravel(x)[0]) for x in inputs[:3])
        n = max(0, math.ceil((limit - start) / delta)) if delta else 0
        return n, n
    if op == "Gather":
        axis = _attr(node, "axis") or 0
        data = shapes[0]
        return math.prod(data) // max(data[axis], 1) * sizes[1], sizes[1]
    if op == "GatherND":
        return sizes[0] * max(1, sizes[1]), sizes[0]
    if op == "Constant":
        return 0, 0  # bounded by the file itself
    n = 3 * sum(sizes)  # elementwise, reshapes, reductions, slices: never more than their inputs
    return n, n


def broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """numpy's broadcast of ``shapes`` in Python integers (no overflow), or ValueError."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {1}
        if len(dims) > 1 or any(d < 0 for d in dims):
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _attr(node, name: str):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)
