"""Grouped-query attention without the key/value head copies, on a traced ONNX graph.

Hugging Face's ``repeat_kv`` copies each of the cache's ``kv_heads`` key/value heads ``rep``
times before attention; traced, that is, per layer and per step, over the whole past::

    X (B, kv, S, D) -> Unsqueeze(axis 2) (B, kv, 1, S, D) -> Expand (B, kv, rep, S, D)
                    -> Reshape (B, kv * rep, S, D) -> Attention's K or V

:func:`unrepeat_kv` feeds the op ``X`` itself and removes the nodes left without a consumer, in
one of two forms (query head ``h`` reads kv head ``h // rep`` in both, as the copies did):
``fold`` views Q ``(B, kv * rep, T, D)`` as ``(B, kv, rep * T, D)`` (plain attention, which
every runtime reads) and ``gqa`` hands the opset-23 op K/V with fewer heads than Q (its own
grouped attention, which OpenVINO 2026.4 misreads).
The pattern is recognised by its ops and the shapes the exporter recorded (symbolic dims
compared by name), never by module names; an Attention whose K and V do not both match is left
as it is.
"""

from __future__ import annotations

import numpy as np


def _shapes(proto) -> dict[str, list]:
    """``{tensor: [dim_param or dim_value, ...]}`` of every value with a recorded shape."""
    g = proto.graph
    out = {}
    for v in (*g.input, *g.output, *g.value_info):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                           for d in t.shape.dim]
    return out


def _constants(proto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs by name (small int tensors are what we read)."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
           if t.data_type in (6, 7)}  # int32 / int64
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _source(name: str, producer: dict, shapes: dict, consts: dict) -> str | None:
    """The un-repeated ``(B, kv, S, D)`` tensor behind a repeated K/V input ``name``, or None."""
    r = producer.get(name)
    e = producer.get(r.input[0]) if r is not None and r.op_type == "Reshape" else None
    u = producer.get(e.input[0]) if e is not None and e.op_type == "Expand" else None
    if u is None or u.op_type != "Unsqueeze" or len(u.input) < 2:
        return None
    axes = consts.get(u.input[1])
    if axes is None or np.asarray(axes).reshape(-1).tolist() not in ([2], [-3]):
        return None
    x, ex, rs = shapes.get(u.input[0]), shapes.get(e.output[0]), shapes.get(r.output[0])
    if x is None or ex is None or rs is None or len(x) != 4 or len(ex) != 5 or len(rs) != 4:
        return None
    b, kv, s, d = x
    rep = ex[2]
    if not all(isinstance(v, int) and v > 0 for v in (kv, rep)):
        return None
    if ex != [b, kv, rep, s, d] or rs != [b, kv * rep, s, d] or None in (b, s, d):
        return None
    return u.input[0]


MODES = ("fold", "gqa")


def unrepeat_kv(proto, mode: str = "fold") -> int:
    """Feed every matching ``Attention`` the un-repeated K/V in place; how many were rewritten.

    ``mode``: ``gqa`` hands the op K/V with fewer heads than Q (the opset-23 op's own grouped
    attention; OpenVINO 2026.4 reads it wrongly); ``fold`` instead views Q ``(B, kv * rep, T, D)``
    as ``(B, kv, rep * T, D)``, so each kv head attends for its ``rep`` query heads at once as
    plain multi-head attention (a mask ``(B, 1, T, S)`` tiled to ``(B, 1, rep * T, S)``, once
    per mask), and views the output back: no runtime needs grouped attention, and nothing the
    size of the cache is copied.
    """
    if mode not in MODES:
        from slimformer.errors import ExportError

        raise ExportError(f"unrepeat_kv mode {mode!r}; allowed: {', '.join(MODES)}")
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    shapes, consts = _shapes(proto), _constants(proto)
    nodes, masks, done = [], {}, 0
    for n in g.node:
        plan = _plan(n, producer, shapes, consts, mode)
        if plan is None:
            nodes.append(n)
            continue
        k, v, kv, rep, d, dv = plan
        n.input[1], n.input[2] = k, v
        done += 1
        if mode == "fold":
            nodes += _fold(n, kv, rep, d, dv, masks, g)
        else:
            nodes.append(n)
    if done:
        del g.node[:]
        g.node.extend(nodes)
        prune(proto)
    return done


def _plan(n, producer, shapes, consts, mode):
    """``(K, V, kv, rep, D, Dv)`` for an Attention fed repeated K/V it can take, else None."""
    if n.op_type != "Attention" or n.domain not in ("", "ai.onnx") or len(n.input) < 3:
        return None
    attrs = {a.name: a for a in n.attribute}
    if "q_num_heads" in attrs or "kv_num_heads" in attrs:
        return None  # 3-D inputs: heads are attributes there
    k, v = (_source(n.input[i], producer, shapes, consts) for i in (1, 2))
    q = shapes.get(n.input[0])
    if k is None or v is None or q is None or len(q) != 4:
        return None
    kv, kv_v, dv = shapes[k][1], shapes[v][1], shapes[v][3]
    if kv != kv_v or not isinstance(q[1], int) or q[1] % kv or q[1] == kv:
        return None
    if mode == "fold":
        mask = shapes.get(n.input[3]) if len(n.input) > 3 and n.input[3] else [1, 1, 1, 1]
        causal = attrs.get("is_causal")
        if (len(n.input) > 4 or any(n.output[1:]) or (causal is not None and causal.i)
                or mask is None or len(mask) != 4 or mask[1] != 1
                or not isinstance(q[3], int) or not isinstance(dv, int)):
            return None
    return k, v, kv, q[1] // kv, q[3], dv


def _fold(n, kv: int, rep: int, d: int, dv: int, masks: dict, g) -> list:
    """Reshape Q into ``(B, kv, rep * T, D)``, tile the mask, view the output back."""
    from onnx import helper, numpy_helper

    base = n.output[0]

    def const(name, values):
        g.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    out = [helper.make_node("Reshape", [n.input[0], const(f"{base}_qshape", [0, kv, -1, d])],
                            [f"{base}_qfold"])]
    n.input[0] = f"{base}_qfold"
    if len(n.input) > 3 and n.input[3]:
        key = (n.input[3], rep)
        if key not in masks:  # (B, 1, T, S) tiled to (B, 1, rep * T, S): row r * T + t
            name = f"{n.input[3]}_tile{rep}"
            out.append(helper.make_node("Tile", [n.input[3], const(f"{name}_reps",
                                                                  [1, 1, rep, 1])], [name]))
            masks[key] = name
        n.input[3] = masks[key]
    n.output[0] = f"{base}_fold"
    out += [n, helper.make_node("Reshape", [f"{base}_fold",
                                            const(f"{base}_oshape", [0, kv * rep, -1, dv])],
                                [base])]
    return out


def prune(proto) -> None:
    """Remove nodes, value infos and initializers no graph output depends on."""
    g = proto.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in needed for o in n.output) or _has_subgraph(n):
            keep.append(n)
            needed.update(i for i in n.input if i)
            needed.update(_subgraph_inputs(n))
    keep.reverse()
    if len(keep) == len(g.node):
        return
    del g.node[:]
    g.node.extend(keep)
    vi = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vi)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def _has_subgraph(node) -> bool:
    return any(a.type in (5, 10) for a in node.attribute)  # GRAPH, GRAPHS: kept as they are


def _subgraph_inputs(node) -> set[str]:
    """Every name a node's subgraphs read (outer-scope values included)."""
    names: set[str] = set()
    for a in node.attribute:
        for sub in ([a.g] if a.type == 5 else list(a.graphs) if a.type == 10 else []):
            for m in sub.node:
                names.update(m.input)
                names.update(_subgraph_inputs(m))
    return names
