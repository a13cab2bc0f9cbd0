"""``MatMulNBits`` nodes reading one activation, merged into one op and a ``Split``.

A transformer's query / key / value projections (and a gated MLP's gate / up) read the same
normalised hidden state; as separate ``MatMulNBits`` ops ONNX Runtime dispatches, and at
``accuracy_level`` 4 quantizes that input to int8, once per op. :func:`fuse_shared_inputs`
concatenates their weights along ``N`` (each output column is its own dot product: the same
codes, scales and zero points, so the same numbers) and splits the result on the last axis
into the original outputs. Nodes merge only when they read the same tensor with the same
``K``, ``bits``, ``block_size`` and ``accuracy_level`` and have no ``g_idx`` or bias input; a
node without zero points beside ones with them gets its implicit zero points
(``2 ** (bits - 1)``) written out. Found from the graph (shared inputs), never from names.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

DOMAIN = "com.microsoft"


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fuse_shared_inputs(graph) -> int:
    """Merge the groups in ``graph`` in place; the number of merged groups."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = defaultdict(list)
    for n in graph.node:
        if n.op_type == "MatMulNBits" and n.domain == DOMAIN and len(n.input) <= 4 \
                and all(i in inits for i in n.input[1:] if i):
            a = _attrs(n)
            groups[(n.input[0], a["K"], a["bits"], a["block_size"],
                    a.get("accuracy_level", 0))].append(n)
    replace, drop, added = {}, set(), []
    for (x, k, bits, block, level), nodes in groups.items():
        if len(nodes) < 2:
            continue
        name = f"{nodes[0].name or nodes[0].output[0]}_fused"
        ns = [_attrs(n)["N"] for n in nodes]
        arr = [[numpy_helper.to_array(inits[i]) if i else None
                for i in (*n.input[1:], "")[:3]] for n in nodes]
        tensors = [numpy_helper.from_array(np.concatenate([a[0] for a in arr]), f"{name}_B"),
                   numpy_helper.from_array(np.concatenate(
                       [a[1].reshape(nn, -1) for a, nn in zip(arr, ns, strict=True)]),
                       f"{name}_scales")]
        if any(a[2] is not None for a in arr):
            k_blocks = -(-k // block)
            width = -(-k_blocks * bits // 8)  # bytes of zero points per row
            per = 8 // bits
            mid = sum((2 ** (bits - 1)) << (bits * i) for i in range(per))
            tensors.append(numpy_helper.from_array(np.concatenate(
                [a[2].reshape(nn, width) if a[2] is not None else
                 np.full((nn, width), mid, np.uint8) for a, nn in zip(arr, ns, strict=True)]),
                f"{name}_zero_points"))
        tensors.append(numpy_helper.from_array(np.asarray(ns, np.int64), f"{name}_split"))
        added += tensors
        replace[id(nodes[0])] = [
            helper.make_node("MatMulNBits", [x, *(t.name for t in tensors[:-1])],
                             [f"{name}_out"], name=name, domain=DOMAIN, K=k, N=sum(ns),
                             bits=bits, block_size=block, accuracy_level=level),
            helper.make_node("Split", [f"{name}_out", tensors[-1].name],
                             [n.output[0] for n in nodes], name=f"{name}_split", axis=-1)]
        drop.update(id(n) for n in nodes[1:])
    if not replace:
        return 0
    old = {i for n in graph.node if id(n) in drop or id(n) in replace for i in n.input[1:]}
    new = []
    for n in graph.node:
        if id(n) not in drop:
            new += replace.get(id(n), [n])
    del graph.node[:]
    graph.node.extend(new)
    read = {i for n in new for i in n.input} | {o.name for o in graph.output}
    if any(a.type in (5, 10) for n in new for a in n.attribute):
        read |= old  # a subgraph may read them: kept
    kept = [t for t in graph.initializer if t.name not in old or t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    return len(replace)
