"""ONNX Runtime's ``GroupQueryAttention`` in place of each layer's cache ``Concat``s and ``Attention``.

The traced decoder graph (after :func:`~slimformer.export.gqa.unrepeat_kv` in ``gqa`` mode)
computes, per layer::

    present.i.key   = Concat(past_key_values.i.key, K (B, kv, T, D), axis=2)   # same for value
    Y (B, H, T, D)  = Attention(Q (B, H, T, D), present.i.key, present.i.value, mask)

so every decode step copies the whole cache into new present tensors. :func:`to_ort_gqa`
rewrites each layer as one ``com.microsoft::GroupQueryAttention``::

    Y3 (B, T, H*D), present.i.key, present.i.value =
        GroupQueryAttention(Q3, K3, V3, past.i.key, past.i.value, seqlens_k, total_length,
                            attention_bias=padding of attention_mask)   causal

which ONNX Runtime updates *in place* when the past and present of a layer are bound to one
buffer of a larger capacity (:class:`~slimformer.export.ortgen.OrtDecoder` does; fed plain
tensors it concatenates as before). The rotary embedding stays the graph's own
``RotaryEmbedding`` (its 3-D form when the traced one read a transposed 4-D view), so positions
are the ``position_ids`` fed; ``attention_bias`` carries every masked position of
``attention_mask``, so left or right padding gives what the original graph computes.

All or nothing: every ``Attention`` must match (Q, K, V of ``(B, heads, T, D)`` with recorded
shapes; K/V the ``Concat`` of a past input and the new keys, written as a present output; a
mask built from the inputs and integer constants alone, no float bias such as ALiBi; no
softmax extras), and afterwards the past inputs must be read by the new ops alone; otherwise
the graph is left as it is and the reason returned. Sliding-window attention is refused by the
caller (:func:`~slimformer.export.decoder.cache_layout`), not seen here.
"""

from __future__ import annotations

import numpy as np

DOMAIN = "com.microsoft"
META_KEY = "slimformer.kv_cache"  # model metadata: "in-place" when the cache can be shared
IN_PLACE = "in-place"
_P = "ort_gqa"  # prefix of the names this rewrite adds
FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def to_ort_gqa(proto) -> tuple[int, str | None]:
    """Rewrite ``proto`` in place; ``(layers rewritten, None)`` or ``(0, why not)``."""
    from onnx import helper

    from slimformer.export.gqa import _shapes

    g = proto.graph
    shapes = _shapes(proto)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inputs = {i.name for i in g.input}
    outputs = {o.name for o in g.output}
    floats = {t.name for t in g.initializer if t.data_type in FLOAT_TYPES}
    if "attention_mask" not in inputs or "input_ids" not in inputs:
        return 0, "the graph has no attention_mask / input_ids inputs"
    atts = [n for n in g.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if not atts:
        return 0, "no opset-23 Attention in the graph"
    plans = []
    for n in atts:
        plan = _plan(n, producer, consumers, shapes, inputs, outputs, floats)
        if isinstance(plan, str):
            return 0, f"{n.name or n.output[0]}: {plan}"
        plans.append(plan)
    drop, replace, extra = set(), {}, []
    for n, plan in zip(atts, plans, strict=True):
        new = _layer(n, plan, helper)
        replace[id(n)] = new
        drop.update(id(x) for x in plan["drop"])
        extra += plan["inits"]
    splice(proto, replace, drop, extra, _shared_inputs(g, helper))
    readers = {n.op_type for n in g.node for i in n.input if i.startswith("past_key_values.")}
    if readers != {"GroupQueryAttention"}:
        return len(atts), (f"past inputs are also read by {sorted(readers - {'GroupQueryAttention'})}"
                           ": the cache cannot be shared in place")
    helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                   META_KEY: IN_PLACE})
    return len(atts), None


def splice(proto, replace: dict, drop: set, inits: list, head: list = ()) -> None:
    """Put ``replace[id(node)]`` (node lists) in place of those nodes, drop ``drop`` (ids).

    ``head`` nodes go first, ``inits`` join the initializers; nodes left without a consumer
    are pruned and the contrib domain is imported.
    """
    from onnx import helper

    from slimformer.export.gqa import prune

    g = proto.graph
    nodes = list(head)
    for n in g.node:
        if id(n) in replace:
            nodes += replace[id(n)]
        elif id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    prune(proto)
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plan(n, producer, consumers, shapes, inputs, outputs, floats) -> dict | str:
    """What one Attention becomes, or why it cannot."""
    a = _attrs(n)
    if a.get("qk_matmul_output_mode", 0) or len(n.input) > 4 or any(n.output[1:]):
        return "softmax extras or past inputs of the op itself"
    if "q_num_heads" in a or "kv_num_heads" in a:
        return "3-D inputs"
    q = shapes.get(n.input[0])
    if q is None or len(q) != 4 or not all(isinstance(v, int) for v in (q[1], q[3])):
        return "no recorded 4-D query shape"
    heads, d = q[1], q[3]
    cache = []
    for i in (1, 2):
        c = producer.get(n.input[i])
        if (c is None or c.op_type != "Concat" or len(c.input) != 2 or _attrs(c).get("axis") not in
                (2, -2) or c.input[0] not in inputs or c.output[0] not in outputs):
            return "K/V are not the Concat of a past input and the new keys into a present"
        new = shapes.get(c.input[1])
        if new is None or len(new) != 4 or not isinstance(new[1], int) or new[3] != d:
            return "no recorded (B, kv, T, D) shape of the new keys / values"
        cache.append(c)
    kv = shapes[cache[0].input[1]][1]
    if heads % kv or shapes[cache[1].input[1]][1] != kv:
        return f"{heads} query heads over {kv} kv heads"
    if len(n.input) > 3 and n.input[3] and not _integer_built(n.input[3], producer, inputs, floats):
        return "the mask is built with float constants (a positional bias): not a padding mask"
    if a.get("is_causal", 0) == 0 and not (len(n.input) > 3 and n.input[3]):
        return "neither causal nor masked"
    drop, inits = [n, *cache], []
    q3 = _three_d(n.input[0], heads, d, producer, consumers, shapes, drop, inits, n.output[0] + "q")
    k3 = _three_d(cache[0].input[1], kv, d, producer, consumers, shapes, drop, inits,
                  n.output[0] + "k")
    v3 = _three_d(cache[1].input[1], kv, d, producer, consumers, shapes, drop, inits,
                  n.output[0] + "v")
    out, post = _out_3d(n.output[0], heads, d, consumers, shapes, drop, inits)
    return {"q": q3, "k": k3, "v": v3, "out": out, "post": post, "heads": heads, "kv": kv,
            "scale": a.get("scale"), "softcap": a.get("softcap", 0.0), "drop": drop,
            "inits": inits, "past": [c.input[0] for c in cache],
            "present": [c.output[0] for c in cache]}


def _integer_built(name, producer, inputs, floats: set[str]) -> bool:
    """Whether ``name`` depends on graph inputs and integer / bool constants only.

    ``floats``: the names of the graph's float initializers.
    """
    seen, todo = set(), [name]
    while todo:
        x = todo.pop()
        if x in seen or not x or x in inputs:
            continue
        seen.add(x)
        if x in floats:
            return False
        p = producer.get(x)
        if p is None:
            continue
        if p.op_type == "Constant" and any(a.t.data_type in FLOAT_TYPES for a in p.attribute
                                           if a.type == 4):  # a tensor attribute
            return False
        if p.op_type in ("Shape", "Size"):
            continue  # reads a shape only
        todo.extend(p.input)
    return True


def _three_d(x4, heads, d, producer, consumers, shapes, drop, inits, base) -> tuple[str, list]:
    """``(name, nodes)``: ``x4 (B, heads, T, D)`` as ``(B, T, heads*D)``.

    A ``RotaryEmbedding`` of ``Transpose(Reshape(x3))`` becomes the 3-D rotary of ``x3``, a
    ``Transpose(Reshape(x3))`` becomes ``x3`` (the traced views dropped); anything else is
    transposed and reshaped.
    """
    from onnx import helper

    rot = producer.get(x4)
    src = rot.input[0] if rot is not None and rot.op_type == "RotaryEmbedding" else x4
    t = producer.get(src)
    r = producer.get(t.input[0]) if t is not None and t.op_type == "Transpose" else None
    x3 = r.input[0] if r is not None and r.op_type == "Reshape" else None
    ok = (x3 is not None and _attrs(t).get("perm") == [0, 2, 1, 3]
          and len(shapes.get(x3) or []) == 3 and shapes[x3][2] == heads * d
          and all(len(consumers.get(o, [])) == 1 for o in (t.output[0], r.output[0]))
          and (rot is None or rot.op_type != "RotaryEmbedding"
               or len(consumers.get(src, [])) == 1))
    if ok and src is not x4:  # rotary: its 3-D form on x3
        ra = _attrs(rot)
        drop += [rot, t, r]
        kw = {k: ra[k] for k in ("interleaved", "rotary_embedding_dim") if k in ra}
        node = helper.make_node("RotaryEmbedding", [x3, *rot.input[1:]], [f"{base}_3d"],
                                name=f"{base}_rotary3d", num_heads=heads, **kw)
        return f"{base}_3d", [node]
    if ok:
        drop += [t, r]
        return x3, []
    shape = _const(inits, f"{_P}_{base}_shape3", [0, 0, heads * d])
    return f"{base}_3d", [
        helper.make_node("Transpose", [x4], [f"{base}_bthd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{base}_bthd", shape], [f"{base}_3d"])]


def _out_3d(y4, heads, d, consumers, shapes, drop, inits) -> tuple[str, list]:
    """``(name, nodes)``: where the op's ``(B, T, heads*D)`` output goes.

    ``Transpose -> Reshape`` back to 3-D after the Attention is replaced by the op's output
    itself; otherwise its output is viewed as ``(B, heads, T, D)`` under the old name.
    """
    from onnx import helper

    c = consumers.get(y4, [])
    t = c[0] if len(c) == 1 and c[0].op_type == "Transpose" else None
    c2 = consumers.get(t.output[0], []) if t is not None else []
    r = c2[0] if len(c2) == 1 and c2[0].op_type == "Reshape" else None
    if (r is not None and _attrs(t).get("perm") == [0, 2, 1, 3]
            and len(shapes.get(r.output[0]) or []) == 3 and shapes[r.output[0]][2] == heads * d):
        drop += [t, r]
        return r.output[0], []
    shape = _const(inits, f"{_P}_{y4}_shape4", [0, 0, heads, d])
    return f"{y4}_3d", [helper.make_node("Reshape", [f"{y4}_3d", shape], [f"{y4}_bthd"]),
                        helper.make_node("Transpose", [f"{y4}_bthd"], [y4], perm=[0, 2, 1, 3])]


def _const(inits, name, values, dtype=np.int64) -> str:
    from onnx import numpy_helper

    inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
    return name


def _layer(n, plan, helper) -> list:
    """The nodes replacing one Attention (and its cache Concats)."""
    (q, qn), (k, kn), (v, vn) = plan["q"], plan["k"], plan["v"]
    kw = {"scale": plan["scale"]} if plan["scale"] is not None else {}
    if plan["softcap"]:
        kw["softcap"] = plan["softcap"]
    gqa = helper.make_node(
        "GroupQueryAttention",
        [q, k, v, *plan["past"], f"{_P}_seqlens_k", f"{_P}_total", "", "", "", f"{_P}_bias",
         "", "", "", "", "", f"{_P}_query_lens"],
        [plan["out"], *plan["present"]], name=f"{n.name or n.output[0]}_gqa", domain=DOMAIN,
        num_heads=plan["heads"], kv_num_heads=plan["kv"], do_rotary=0, **kw)
    return [*qn, *kn, *vn, gqa, *plan["post"]]


def _shared_inputs(g, helper) -> list:
    """``seqlens_k``, ``query_lens`` (B,) and ``total`` (scalar) int32, ``bias (B, 1, T, P + T)``.

    ``total`` is the mask's width (past + new); every row's cache holds that many positions (its
    ``seqlens_k`` is one less), the masked ones given the float minimum as bias (as the traced
    mask did); ``query_lens``: all ``T`` new tokens of every row are real (which lets a batch of
    several rows take several tokens after a past).
    """
    from onnx import TensorProto

    inits = []
    c = {name: _const(inits, f"{_P}_{name}", val, dt) for name, val, dt in (
        ("scalar", [], np.int64), ("one32", 1, np.int32), ("zero64", 0, np.int64),
        ("one64", [1], np.int64), ("axes12", [1, 2], np.int64),
        ("neg", np.finfo(np.float32).min, np.float32), ("zero", 0.0, np.float32))}
    g.initializer.extend(inits)
    mk = helper.make_node
    return [
        mk("Shape", ["attention_mask"], [f"{_P}_b"], start=0, end=1),
        mk("Shape", ["attention_mask"], [f"{_P}_width"], start=1, end=2),
        mk("Shape", ["input_ids"], [f"{_P}_t"], start=1, end=2),
        mk("Cast", [f"{_P}_width"], [f"{_P}_width32"], to=TensorProto.INT32),
        mk("Reshape", [f"{_P}_width32", c["scalar"]], [f"{_P}_total"]),
        mk("Expand", [f"{_P}_width32", f"{_P}_b"], [f"{_P}_widths"]),
        mk("Sub", [f"{_P}_widths", c["one32"]], [f"{_P}_seqlens_k"]),
        mk("Cast", [f"{_P}_t"], [f"{_P}_t32"], to=TensorProto.INT32),
        mk("Expand", [f"{_P}_t32", f"{_P}_b"], [f"{_P}_query_lens"]),
        mk("Equal", ["attention_mask", c["zero64"]], [f"{_P}_pad"]),
        mk("Where", [f"{_P}_pad", c["neg"], c["zero"]], [f"{_P}_bias2"]),
        mk("Unsqueeze", [f"{_P}_bias2", c["axes12"]], [f"{_P}_bias4"]),
        mk("Concat", [f"{_P}_b", c["one64"], f"{_P}_t", f"{_P}_width"], [f"{_P}_bshape"], axis=0),
        mk("Expand", [f"{_P}_bias4", f"{_P}_bshape"], [f"{_P}_bias"]),
    ]
