"""ONNX Runtime's ``MultiHeadAttention`` in place of the opset-23 ``Attention`` of encoders.

torch.onnx writes ``scaled_dot_product_attention`` at opset 23 as::

    Q4 = Transpose(Reshape(Q3 (B, S, H*D)))   (B, H, S, D)      # same for K, V
    Y4 = Attention(Q4, K4, V4, mask)           (B, H, S, D)
    Y3 = Reshape(Transpose(Y4))                (B, S, H*D)

:func:`to_ort_mha` rewrites each such layer as one ``com.microsoft::MultiHeadAttention(Q3, K3,
V3, bias, attention_bias)`` (3-D inputs and output: the views go, the op reads the heads itself;
the Q/K/V projections' bias ``Add``s are its ``bias`` input, which it adds itself), the mask
turned once into an additive bias ``(B, 1, S, T)`` (0 where a boolean mask keeps a key, the
float minimum where it drops one; a float mask is the bias itself). The outputs are the same
(the kernels underneath are ONNX Runtime's; measured equal to the bit on MiniLM).

Why: ONNX Runtime's ``quantize_dynamic`` with its defaults quantizes every node whose op type is
``Attention`` as its own contrib ``Attention`` (packed QKV weight) into a ``QAttention`` that
ONNX Runtime then refuses to load; ``MultiHeadAttention`` it leaves alone, so the float export
of the ``ort-cpu`` target is one a user can hand to the runtime's own quantizer. OpenVINO
2026.4 reads the op too.

Per node, never half a node: an ``Attention`` with a causal flag, a soft cap, extra outputs or
past inputs, different head counts or head sizes for Q / K / V, a mask of rank other than 4, or
inputs that are not float32 is left as it is.
"""

from __future__ import annotations

import numpy as np

from slimformer.export.ortgqa import DOMAIN, _attrs, _const, _out_3d, _three_d, splice

_P = "ort_mha"  # prefix of the names this rewrite adds
FLOAT32 = 1  # TensorProto.FLOAT
BOOL = 9  # TensorProto.BOOL


def to_ort_mha(proto) -> int:
    """Rewrite ``proto``'s plain opset-23 ``Attention`` nodes in place; how many were rewritten."""
    from onnx import helper

    from slimformer.export.gqa import _shapes

    g = proto.graph
    shapes = _shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    floats = {t.name: t for t in g.initializer if t.data_type == FLOAT32}
    drop, replace, inits, biases = set(), {}, [], {}
    for n in g.node:
        if n.op_type != "Attention" or n.domain not in ("", "ai.onnx"):
            continue
        heads = _plain(n, shapes, types)
        if heads is None:
            continue
        h, d = heads
        gone = [n]
        q, qn = _three_d(n.input[0], h, d, producer, consumers, shapes, gone, inits, f"{_P}_{n.output[0]}q")
        k, kn = _three_d(n.input[1], h, d, producer, consumers, shapes, gone, inits, f"{_P}_{n.output[0]}k")
        v, vn = _three_d(n.input[2], h, d, producer, consumers, shapes, gone, inits, f"{_P}_{n.output[0]}v")
        out, post = _out_3d(n.output[0], h, d, consumers, shapes, gone, inits)
        q, k, v, bias = _fold_bias([q, k, v], h * d, producer, consumers, floats, gone, inits,
                                   f"{_P}_{n.output[0]}")
        pre = []
        mask = n.input[3] if len(n.input) > 3 else ""
        if mask and mask not in biases:
            biases[mask], pre = _bias(mask, types[mask] == BOOL, q, k, len(biases), inits,
                                      helper)
        a = _attrs(n)
        kw = {"scale": a["scale"]} if a.get("scale") else {}
        mha = helper.make_node("MultiHeadAttention", [q, k, v, bias, "", biases.get(mask, "")],
                               [out], name=f"{n.name or n.output[0]}_mha", domain=DOMAIN,
                               num_heads=h, **kw)
        replace[id(n)] = [*qn, *kn, *vn, *pre, mha, *post]
        drop.update(id(x) for x in gone)
    if replace:
        splice(proto, replace, drop, inits)
    return len(replace)


def _plain(n, shapes: dict, types: dict) -> tuple[int, int] | None:
    """``(heads, head size)`` of an Attention the contrib op computes alike, else None."""
    a = _attrs(n)
    if (a.get("is_causal", 0) or a.get("softcap", 0.0) or a.get("qk_matmul_output_mode", 0)
            or "q_num_heads" in a or len(n.input) > 4 or len(n.input) < 3
            or any(n.output[1:])):
        return None
    qkv = [shapes.get(x) for x in n.input[:3]]
    if any(s is None or len(s) != 4 for s in qkv) or any(types.get(x) != FLOAT32
                                                         for x in n.input[:3]):
        return None
    h, d = qkv[0][1], qkv[0][3]
    if not (isinstance(h, int) and isinstance(d, int)) or any(s[1] != h or s[3] != d for s in qkv):
        return None
    mask = n.input[3] if len(n.input) > 3 else ""
    if mask and (len(shapes.get(mask) or []) != 4 or types.get(mask) not in (BOOL, FLOAT32)):
        return None
    return h, d


def _fold_bias(qkv: list[str], width: int, producer, consumers, floats: dict, gone: list,
               inits: list, base: str) -> tuple[str, str, str, str]:
    """``(q, k, v, bias)``: the projections' bias ``Add``s folded into the op's ``bias`` input.

    Where each of Q3, K3, V3 is ``Add(x, b)`` of a float ``(H*D,)`` initializer read by that
    attention alone, the op takes the ``x``s and ``Concat(bq, bk, bv)`` (it adds them itself);
    otherwise the inputs are kept and no bias is given.
    """
    from onnx import numpy_helper

    parts = []
    for x in qkv:
        add = producer.get(x)
        if add is None or add.op_type != "Add" or len(consumers.get(x, [])) != 1:
            return (*qkv, "")
        b = [i for i in add.input if i in floats and tuple(floats[i].dims) == (width,)]
        rest = [i for i in add.input if i not in b]
        if len(b) != 1 or len(rest) != 1:
            return (*qkv, "")
        parts.append((add, rest[0], numpy_helper.to_array(floats[b[0]])))
    gone += [p[0] for p in parts]
    name = _const(inits, f"{base}_qkv_bias", np.concatenate([p[2] for p in parts]), np.float32)
    return (*(p[1] for p in parts), name)


def _bias(mask: str, boolean: bool, q3: str, k3: str, i: int, inits: list, helper
          ) -> tuple[str, list]:
    """``(name, nodes)``: the mask as an additive float bias ``(B|1, H|1, S, T)``.

    MultiHeadAttention broadcasts the bias over batch and heads only, so its last two axes are
    expanded to the lengths of the query and key ``(B, S, H*D)`` / ``(B, T, H*D)``.
    """
    base = f"{_P}_bias{i}"
    nodes = []
    src = mask
    if boolean:
        zero = _const(inits, f"{base}_zero", 0.0, np.float32)
        neg = _const(inits, f"{base}_neg", np.finfo(np.float32).min, np.float32)
        nodes.append(helper.make_node("Where", [mask, zero, neg], [f"{base}_f"]))
        src = f"{base}_f"
    nodes += [
        helper.make_node("Shape", [src], [f"{base}_bh"], start=0, end=2),
        helper.make_node("Shape", [q3], [f"{base}_s"], start=1, end=2),
        helper.make_node("Shape", [k3], [f"{base}_t"], start=1, end=2),
        helper.make_node("Concat", [f"{base}_bh", f"{base}_s", f"{base}_t"], [f"{base}_shape"],
                         axis=0),
        helper.make_node("Expand", [src, f"{base}_shape"], [base])]
    return base, nodes
