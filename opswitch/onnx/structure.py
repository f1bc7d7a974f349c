"""The shape of an ONNX graph, checked before anything walks or runs it.

Every later step follows producer chains (``weight_source``, ``depends_on``)
or runs nodes in order, so the graph must first be a proper one: nodes in
topological order (as the ONNX spec requires) with each value computed once
— which also rules out cycles, in one linear pass, so no walk can loop — and
every node on the way to the logits.  A node whose result reaches no logit
(a stray ``ConstantOfShape``, a side computation) is not part of a GPT-2 and
would only cost time and memory in the check run, so it is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opswitch.onnx import OnnxError

MAX_NODES = 100_000  # GPT-2 xl (48 layers) exports to ~5,000 nodes; more is not a GPT-2


def describe(node: Any) -> str:
    return f"{node.op_type} node {node.name or (node.output[0] if node.output else '')!r}"


def logits_name(graph: Any) -> str:
    names = [o.name for o in graph.output]
    if not names:
        raise OnnxError("the graph has no outputs; opswitch maps GPT-2 graphs only")
    return "logits" if "logits" in names else names[0]


def token_input_name(graph: Any) -> str | None:
    """The graph's token-id input: ``input_ids``, else its first integer input (None: none)."""
    inits = {t.name for t in graph.initializer}
    ints = [i.name for i in graph.input if i.name not in inits
            and i.type.tensor_type.elem_type in (6, 7)]  # INT32, INT64
    return "input_ids" if "input_ids" in ints else (ints[0] if ints else None)


def check_structure(graph: Any, source: Path) -> None:
    """Refuse a graph that is out of order or cyclic, computes a value twice, or holds a node
    whose outputs do not reach the logits; linear in the graph's size."""
    if len(graph.node) > MAX_NODES:
        raise OnnxError(f"{source}: the graph has {len(graph.node):,} nodes, more than any GPT-2 export "
                        f"({MAX_NODES:,} at most)")
    available = {""} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name not in available:
                raise OnnxError(f"{source}: {describe(node)} uses {name!r} before any node computes it "
                                "(the graph has a cycle, is out of order or misses a value)")
        for name in node.output:
            if name in available and name:
                raise OnnxError(f"{source}: {describe(node)} computes {name!r}, which already has a value "
                                "(each value of an ONNX graph is computed once)")
            if name:
                available.add(name)
                producer[name] = index
    for output in graph.output:
        if output.name not in available:
            raise OnnxError(f"{source}: graph output {output.name!r} is computed by no node")
    useful = [False] * len(graph.node)
    stack = [logits_name(graph)]
    while stack:
        at = producer.get(stack.pop())
        if at is None or useful[at]:
            continue
        useful[at] = True
        stack.extend(graph.node[at].input)
    for index, node in enumerate(graph.node):
        if not useful[index]:
            raise OnnxError(f"{source}: {describe(node)} does not contribute to the logits; a GPT-2 graph "
                            "computes nothing else, and opswitch does not run such nodes")
