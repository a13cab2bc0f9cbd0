"""Exact rewrites of a traced graph into forms hls4ml computes directly.

Each pass matches a pattern and transforms it in place, as hls4ml's optimizer passes do;
:data:`slimformer.hardware.lowering.PASSES` runs them in order.
"""

from __future__ import annotations

from slimformer.hardware.graph import GELU_SIGMOID, HlsGraph, Op


def expand_gelu(graph: HlsGraph) -> None:
    """``gelu(x)`` -> ``x * sigmoid(1.702 x)``: scale, sigmoid lookup table, multiply."""
    for i in reversed(range(len(graph.ops))):
        op = graph.ops[i]
        if op.kind == "gelu":
            name, x, shape, where = op.name, op.inputs[0], op.shape, op.module
            graph.ops[i:i + 1] = [
                Op(f"{name}_scale", "scale", [x], shape, where, {"value": GELU_SIGMOID}),
                Op(f"{name}_sigmoid", "sigmoid", [f"{name}_scale"], shape, where),
                Op(name, "mul", [x, f"{name}_sigmoid"], shape, where, {"gelu": True})]


def matmul_to_einsum(graph: HlsGraph) -> None:
    """``a @ b`` of two rank-r activations -> einsum ``...ij,...jk->...ik`` (batch axis first)."""
    for op in graph.ops:
        if op.kind == "matmul":
            lead = "abcdefgh"[:len(op.shape) - 1]  # the batch and the other leading axes
            op.kind = "einsum"
            op.attrs = {"equation": f"{lead}ij,{lead}jk->{lead}ik"}


def fuse_scale_into_softmax(graph: HlsGraph) -> None:
    """``softmax(c * x)`` -> softmax with ``exp_scale = c`` (the exp table absorbs it)."""
    for op in list(graph.ops):
        if op.kind != "scale":
            continue
        users = graph.consumers(op.name)
        if len(users) == 1 and users[0].kind == "softmax" and op.attrs["value"] > 0 \
                and op.name not in graph.outputs:
            sm = users[0]
            sm.attrs["exp_scale"] *= op.attrs["value"]
            sm.inputs = [op.inputs[0]]
            graph.ops.remove(op)


def fold_transposes_into_einsums(graph: HlsGraph) -> None:
    """Permute einsum subscripts instead of moving data (exact; no Transpose layer).

    ``k.transpose(-2, -1)`` goes into ``q @ k^T``; ``(p @ v).transpose(1, 2)`` into the einsum's
    output order.
    """
    while any(_fold_one(graph, t) for t in [o for o in graph.ops if o.kind == "transpose"]):
        pass


def _fold_one(graph: HlsGraph, t: Op) -> bool:
    """Fold one transpose into its einsum readers or producer; whether it did."""
    perm = t.attrs["perm"]
    users = graph.consumers(t.name)
    if users and all(u.kind == "einsum" for u in users) and t.name not in graph.outputs:
        for u in users:
            ins, out = u.attrs["equation"].split("->")
            subs = ins.split(",")
            for i, name in enumerate(u.inputs):
                if name == t.name and "." not in subs[i]:
                    letters = list(subs[i])
                    src = [letters[0]] + [""] * len(perm)
                    for a, p in enumerate(perm):
                        src[p + 1] = letters[a + 1]
                    subs[i] = "".join(src)
                    u.inputs[i] = t.inputs[0]
            u.attrs["equation"] = ",".join(subs) + "->" + out
        graph.ops.remove(t)
        return True
    prod = graph.op(t.inputs[0])
    if prod.kind == "einsum" and len(graph.consumers(prod.name)) == 1 \
            and prod.name not in graph.outputs:
        ins, out = prod.attrs["equation"].split("->")
        if "." in out:
            return False
        new = out[0] + "".join(out[p + 1] for p in perm)
        prod.attrs["equation"] = ins + "->" + new
        prod.shape = t.shape
        for u in graph.consumers(t.name):
            u.inputs = [prod.name if i == t.name else i for i in u.inputs]
        graph.outputs = [prod.name if o == t.name else o for o in graph.outputs]
        graph.ops.remove(t)
        return True
    return False
