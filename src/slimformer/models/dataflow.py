"""Walking the recorded op graph: Linears, activation matmuls, pass-through ops, norm outputs.

:class:`Analyzer` wraps a :class:`~slimformer.models.trace.Graph` with what the structure passes
(:mod:`slimformer.models.structure`) ask of it: which op is a Linear (an activation times a 2-D
parameter), the nearest Linear producers behind a value, the first op of a kind after one, the
consumers of a value through ops that only move it. Nothing here reads a module or parameter name.
"""

from __future__ import annotations

import torch

from slimformer.models.trace import Graph, OpNode

SPLITS = {"chunk", "split", "split_with_sizes", "tensor_split", "unbind", "getitem", "narrow"}
LINEAR_OPS = {"linear", "addmm", "matmul", "mm", "bmm", "einsum", "baddbmm"}
MATMUL_OPS = {"matmul", "bmm", "einsum", "mm", "baddbmm"}
CONV_OPS = {"conv1d", "conv2d", "conv3d"}
ACTIVATIONS = {"relu", "gelu", "silu", "sigmoid", "tanh", "erf", "softplus", "hardswish", "mish",
               "elu", "leaky_relu", "relu6", "hardtanh", "celu", "selu", "glu", "hardsigmoid"}
# Ops that move, pad or re-type values without mixing channels (window partition and merge
# included): followed when pairing producers, and from a norm to its Linears while they keep the
# last (channel) axis.
PASS_THROUGH = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten",
                "squeeze", "unsqueeze", "t", "expand", "split", "chunk", "unbind", "getitem",
                "narrow", "select", "to", "float", "half", "type_as", "clone", "dropout",
                "alpha_dropout", "detach", "type", "split_with_sizes", "tensor_split", "movedim",
                "swapaxes", "expand_as", "repeat_interleave", "pad", "constant_pad_nd", "roll",
                "flip", "repeat", "tile", "unfold", "as_strided"}


def _linear_of(node: OpNode) -> tuple[int, str, int, int] | None:
    """(activation input position, weight name, in, out) if ``node`` is activation x 2-D param."""
    if node.op not in LINEAR_OPS or node.op == "einsum":
        return None
    wpos = [i for i, p in enumerate(node.params) if p is not None and len(node.in_shapes[i]) == 2]
    # activations: not parameters, or computed from one with a batch axis (a learned probe)
    apos = [i for i, p in enumerate(node.params) if p is None or len(node.in_shapes[i]) > 2]
    if not wpos or not apos:
        return None
    if node.op == "linear":
        w = wpos[0]
        return apos[0], node.params[w], node.in_shapes[w][1], node.in_shapes[w][0]
    # addmm(bias, x, W) / matmul(x, W): the weight is the right operand, (in, out)
    w = max(wpos)
    if w < apos[0]:
        return None
    return apos[0], node.params[w], node.in_shapes[w][0], node.in_shapes[w][1]


class Analyzer:
    """The recorded graph with the indices later passes walk: consumers, Linears, norm outputs."""

    def __init__(self, graph: Graph, model: torch.nn.Module):
        self.g = graph
        self.nodes = graph.nodes
        self.cons = graph.consumers()
        self.lin = {n.idx: _linear_of(n) for n in self.nodes}
        self.lin = {k: v for k, v in self.lin.items() if v}
        self.owner = {}
        for name, _ in model.named_parameters(remove_duplicate=False):
            self.owner[name] = name.rpartition(".")[0]
        self.norm_out: dict[int, str] = {}  # output node of a norm call -> its module
        self.norm_in: dict[int, int] = {}  # output node of a norm call -> its input's producer

    def is_act_matmul(self, n: OpNode) -> bool:
        """Whether ``n`` multiplies two activations (scores ``q @ k^T``, ``P @ V``)."""
        acts = [i for i, p in enumerate(n.params) if p is None and n.inputs[i] != -2]
        return n.op in MATMUL_OPS and n.idx not in self.lin and len(acts) >= 2

    def back(self, start: int, stop_at_norm: bool = False, limit: int = 64,
             convs: list[int] | None = None):
        """Nearest Linear producers behind node ``start`` and the ops crossed on the way.

        Depthwise convolutions (:meth:`depthwise`) are crossed; with ``convs`` (a list) the
        ones crossed are appended to it.
        """
        found, crossed, seen, todo = [], [], set(), [start]
        while todo and len(seen) < limit:
            i = todo.pop()
            if i in seen or i < 0:
                continue
            seen.add(i)
            n = self.nodes[i]
            if i in self.lin:
                found.append(i)
                continue
            if n.param_only or self.is_act_matmul(n) or n.op in {"softmax", "sdpa", "mha",
                                                                  "embedding", "layer_norm"}:
                continue
            if n.op in CONV_OPS:  # a conv mixes channels like a Linear: no path crosses it,
                if self.depthwise(n) is None:  # unless it filters each channel on its own
                    continue
                if convs is not None:
                    convs.append(i)
            if stop_at_norm and i in self.norm_out:
                continue
            crossed.append(n.op)
            todo.extend(p for p, w in zip(n.inputs, n.params, strict=True) if w is None)
        return sorted(found), crossed

    def depthwise(self, n: OpNode) -> str | None:
        """Weight name of conv ``n`` if it is depthwise (one filter per channel, channels kept).

        Input ``(B, C, *spatial)``, weight ``(C, 1, *kernel)``: each output channel reads only
        its own input channel, so a per-channel unit passes through it.
        """
        if n.op not in CONV_OPS or len(n.in_shapes) < 2 or len(n.params) < 2 or \
                n.params[1] is None or not n.out_shapes:
            return None
        x, w, y = n.in_shapes[0], n.in_shapes[1], n.out_shapes[0]
        if len(x) < 3 or len(w) != len(x) or w[1] != 1 or w[0] != x[1] or y[1] != x[1]:
            return None
        return n.params[1]

    def forward_to(self, start: int, want, limit: int = 32,
                   through: set[int] = frozenset()) -> int | None:
        """First node after ``start`` (through pass-through/elementwise ops) that satisfies ``want``.

        Nodes in ``through`` (e.g. Linears mixing the heads of attention scores) are crossed too.
        """
        seen, todo = set(), list(self.cons.get(start, []))
        while todo and len(seen) < limit:
            i = todo.pop(0)
            if i in seen:
                continue
            seen.add(i)
            n = self.nodes[i]
            if want(n):
                return i
            if n.op in PASS_THROUGH or n.op in {"mul", "div", "to", "masked_fill", "where",
                                                 "add"} or i in through:
                todo.extend(self.cons.get(i, []))
        return None

    def pass_consumers(self, start: int, scaled: list[int] | None = None) -> list[int]:
        """Consumers of node ``start``'s output, looking through pass-through ops.

        ``-1`` stands for "returned from the model" (the value is also a model output). With
        ``scaled`` (a list), per-token multiplies (:func:`_per_token_mul`: an attention mask
        applied to a norm's output) are looked through too and appended to it.
        """
        out, todo, seen = [], [start], set()
        while todo:
            i = todo.pop(0)
            if i in seen:
                continue
            seen.add(i)
            if i in self.g.outputs:
                out.append(-1)
            for c in self.cons.get(i, []):
                n = self.nodes[c]
                if n.op in PASS_THROUGH and _keeps_channels(n):
                    todo.append(c)
                elif scaled is not None and _per_token_mul(n, i):
                    scaled.append(c)
                    todo.append(c)
                else:
                    out.append(c)
        return list(dict.fromkeys(out))


def _per_token_mul(n: OpNode, src: int) -> bool:
    """Whether ``n`` multiplies the value of node ``src`` by something constant along channels.

    E.g. ``hidden * mask.unsqueeze(-1)``: every other factor broadcasts over the last axis (its
    last size is 1, or it is a scalar) and is no parameter, and the output keeps ``src``'s shape.
    Per-channel scales commute with it; a shift (zero point) folded into the norm does not.
    """
    if n.op != "mul" or src not in n.inputs or not n.out_shapes:
        return False
    j = n.inputs.index(src)
    if j >= len(n.in_shapes) or tuple(n.out_shapes[0]) != tuple(n.in_shapes[j]):
        return False
    others = [k for k in range(len(n.inputs)) if k != j]
    return all(k < len(n.in_shapes) and (len(n.in_shapes[k]) == 0 or n.in_shapes[k][-1] == 1)
               and (k >= len(n.params) or n.params[k] is None) for k in others)


def _keeps_channels(n: OpNode) -> bool:
    """Whether a shape op keeps the last (channel) axis of its first input as the output's."""
    return bool(n.in_shapes and n.out_shapes and n.in_shapes[0] and n.out_shapes[0]) and \
        n.in_shapes[0][-1] == n.out_shapes[0][-1]


# Ops along which a value stays a copy of one token stream: moved, selected, pooled, filtered
# (strided or depthwise convs), normalized or activated per element; never a residual add, a
# Linear or an attention
_POOLS = {f"{k}_pool{d}d" for k in ("avg", "max", "adaptive_avg", "adaptive_max")
          for d in (1, 2, 3)}
STREAM_OPS = PASS_THROUGH | CONV_OPS | _POOLS | ACTIVATIONS | {
    "layer_norm", "group_norm", "batch_norm", "rms_norm", "instance_norm"}


def stream(a: Analyzer, start: int, limit: int = 64) -> set[int]:
    """Nodes whose value the value of node ``start`` is a (selected, pooled, normed) copy of.

    Walks back through :data:`STREAM_OPS` and across norm modules (from a norm's output to its
    input). Two values whose streams meet come from one sequence: attention whose query is one
    token of it (class attention) or whose keys/values are a pooled or strided-conv copy of it
    (spatial-reduction attention) is self-attention; cross-attention reads another sequence.
    Model inputs are not in the set (the graph does not tell one input from another).
    """
    seen, todo = set(), [start]
    while todo and len(seen) < limit:
        i = todo.pop()
        if i in seen or i < 0:
            continue
        seen.add(i)
        if i in a.norm_in:
            todo.append(a.norm_in[i])
            continue
        n = a.nodes[i]
        if i in a.lin or n.op not in STREAM_OPS:
            continue
        todo.extend(p for p, w in zip(n.inputs, n.params, strict=True) if w is None)
    return seen


_SCORE_OPS = PASS_THROUGH | {"softmax", "mul", "div", "add", "sub", "masked_fill", "where"}


def head_mixers(a: Analyzer) -> set[int]:
    """Linear nodes applied across the heads axis of attention scores (talking-heads attention).

    A Linear with ``in == out == heads`` whose activation is a permuted copy of the output of an
    activation-activation matmul laid out ``(B, heads, Tq, Tk)`` (followed back through moves,
    scaling, masking, softmax and earlier head mixers), its features on that heads axis.
    """
    mixers: set[int] = set()
    for i in sorted(a.lin):
        apos, _, fin, fout = a.lin[i]
        n = a.nodes[i]
        shape = n.in_shapes[apos]
        if fin != fout or len(shape) < 4 or shape[-1] != fin:
            continue
        seen, todo = set(), [n.inputs[apos]]
        while todo and len(seen) < 32:
            j = todo.pop(0)
            if j < 0 or j in seen:
                continue
            seen.add(j)
            m = a.nodes[j]
            if a.is_act_matmul(m):
                out = m.out_shapes[0] if m.out_shapes else ()
                if len(out) == len(shape) and sorted(out) == sorted(shape) and out[1] == fin:
                    mixers.add(i)
                break
            if j in mixers:
                todo.append(m.inputs[a.lin[j][0]])
            elif j not in a.lin and m.op in _SCORE_OPS:
                todo.extend(p for p, w in zip(m.inputs, m.params, strict=True) if w is None)
    return mixers
