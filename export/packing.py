"""Packed projections: the weight MatMuls that read the same activation (a decoder layer's query,
key and value projections; its gate and up projections) become one MatMul over their weights side
by side, followed by a ``Split`` into the original outputs, before block-wise quantization.

A decode step multiplies one row by every weight matrix: 7 small GEMVs per layer, each with its
own kernel launch, thread wake-up and (``MatMulNBits`` at accuracy level 4) quantization of the
same input row. Packed, a layer runs 4. onnxruntime-genai's model builder packs the same way
(its "packed MatMul" for q/k/v). Exact: ``MatMulNBits`` quantizes each output column's weights in
blocks along the input dimension, so a packed column is quantized, and multiplied, as it was alone.
"""

from __future__ import annotations

from collections import Counter, defaultdict


def weight_matmuls(model) -> list:
    """MatMul nodes whose second input is a 2-D initializer (the LLM's linear layers)."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], [])) == 2]


def value_uses(graph) -> Counter:
    """How many times each value name is read: as a node input or as a graph output."""
    uses = Counter(name for n in graph.node for name in n.input)
    uses.update(o.name for o in graph.output)
    return uses


def pack_shared_matmuls(model, exclude: list[str] | tuple[str, ...] = ()) -> int:
    """Pack, in place, every group of two or more weight MatMuls (second input a 2-D float
    initializer used by no other node) that share their first input; MatMuls named in ``exclude``
    stay as they are. -> how many MatMuls the graph lost (a group of n: n - 1)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = value_uses(graph)
    groups = defaultdict(list)
    for n in weight_matmuls(model):
        w = inits[n.input[1]]
        if n.name not in exclude and uses[n.input[1]] == 1 and w.data_type == TensorProto.FLOAT:
            groups[n.input[0]].append(n)
    order = {id(n): i for i, n in enumerate(graph.node)}
    removed, drop = 0, set()
    replace: dict[int, list] = {}  # position of a group's first MatMul -> the nodes in its place
    for x, nodes in groups.items():
        if len(nodes) < 2 or len({inits[n.input[1]].dims[0] for n in nodes}) != 1:
            continue
        nodes.sort(key=lambda n: order[id(n)])
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        first = nodes[0]
        name = f"{first.name}_packed"
        w = numpy_helper.from_array(np.concatenate(ws, axis=1), f"{name}.weight")
        sizes = numpy_helper.from_array(np.array([a.shape[1] for a in ws], np.int64), f"{name}.split")
        graph.initializer.extend([w, sizes])
        out = f"{first.output[0]}_packed"
        replace[order[id(first)]] = [
            helper.make_node("MatMul", [x, w.name], [out], name=name),
            helper.make_node("Split", [out, sizes.name], [n.output[0] for n in nodes], name=f"{name}.split", axis=-1),
        ]
        drop.update(order[id(n)] for n in nodes)
        for n in nodes:
            graph.initializer.remove(inits[n.input[1]])
        removed += len(nodes) - 1
    if not removed:
        return 0
    # the packed MatMul and its Split take the first one's place: every consumer of the outputs
    # comes after the first MatMul of its group, and the shared input before it (topological order)
    new = []
    for i, n in enumerate(graph.node):
        new.extend(replace.get(i, []))
        if i not in drop:
            new.append(n)
    del graph.node[:]
    graph.node.extend(new)
    return removed


def feed_packed_qkv(model) -> int:
    """``GroupQueryAttention`` nodes (the fused decode graphs) whose query, key and value are the
    three outputs, in order, of one packed q|k|v ``Split`` read nothing else take the packed
    MatMul's output as their query input (ONNX Runtime's packed QKV: key and value left empty),
    in place; the Split goes. -> how many."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    uses = value_uses(graph)
    drop = []
    for n in graph.node:
        if n.op_type != "GroupQueryAttention" or len(n.input) < 3:
            continue
        split = producer.get(n.input[0])
        if (
            split is None
            or split.op_type != "Split"
            or list(split.output) != list(n.input[:3])
            or any(uses[o] != 1 for o in split.output)
        ):
            continue
        n.input[0], n.input[1], n.input[2] = split.input[0], "", ""
        drop.append(split)
    for split in drop:
        graph.node.remove(split)
        if len(split.input) > 1 and uses[split.input[1]] == 1:  # its sizes initializer
            graph.initializer.remove(next(i for i in graph.initializer if i.name == split.input[1]))
    return len(drop)
