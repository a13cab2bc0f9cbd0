"""Matmuls whose weight is a parameter of 3 or more axes (batched / mixture-of-experts weights).

Expert weights are often one tensor ``(E, d_out, d_in)`` (or ``(E, d_in, d_out)``) applied with
``torch.bmm``, ``torch.einsum``, a grouped matmul, or indexed per expert (``W[e]``, ``W[ids]``)
and then multiplied. :func:`batched_weights` finds every such use in a recorded forward pass and
the parameter axis the matmul contracts (the input-feature axis), so the weight can be quantized
per output channel: one scale per slice along that axis, e.g. per (expert, output row).
Nothing here looks at names: the weight is any parameter operand of a matmul, or a value indexed,
sliced or transposed from one.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimformer.models.trace import Graph, OpNode

# ops applying a weight operand; the second operand of each is the right factor of a product
MATMULS = {"linear", "matmul", "mm", "bmm", "einsum", "baddbmm", "addmm", "grouped_mm"}
# ops that select experts or rows of a weight, keeping its last two axes (or swapping them)
_VIEWS = {"getitem", "index_select", "select", "narrow", "contiguous", "to", "float", "half",
          "type_as", "clone", "detach", "index", "take_along_dim", "gather"}
_SWAPS = {"transpose", "t", "mT", "swapaxes", "permute", "movedim"}


@dataclass(frozen=True)
class BatchedRef:
    """One parameter of 3+ axes used as a matmul weight.

    Attributes:
        weight: Parameter name.
        module: Path of the module owning it.
        op: The op that applied it (``bmm``, ``einsum``, ``linear`` on an indexed expert ...).
        axis: The parameter axis the matmul contracts (input features), or None when it cannot be
            told (then ``reason`` says why and the weight stays float).
        reason: Why ``axis`` is None ('' otherwise).
    """

    weight: str
    module: str
    op: str
    axis: int | None
    reason: str = ""


def _source(g: Graph, node: OpNode, pos: int, shapes: dict) -> tuple[str, bool] | None:
    """``(parameter, swapped)`` when operand ``pos`` of ``node`` is a 3+-axis parameter.

    Follows views back to the parameter; ``swapped``: an odd number of last-two-axes swaps.
    """
    name = node.params[pos] if pos < len(node.params) else None
    if name is not None:
        return (name, False) if len(shapes.get(name, ())) >= 3 else None
    i, swapped = node.inputs[pos], False
    for _ in range(8):
        if i < 0:
            return None
        p = g.nodes[i]
        if not p.inputs or not p.out_shapes or not p.in_shapes:
            return None
        if p.op in _SWAPS:
            a, b = p.in_shapes[0], p.out_shapes[0]
            if len(a) != len(b) or a[:-2] != b[:-2] or a[-2:] != b[-2:][::-1]:
                return None
            if a[-1] == a[-2] and p.op in ("permute", "movedim"):
                return None  # square: which axes moved is not recorded
            swapped = not swapped
        elif p.op not in _VIEWS or p.out_shapes[0][-2:] != p.in_shapes[0][-2:]:
            return None
        name = p.params[0]
        if name is not None:
            if len(shapes.get(name, ())) < 3:
                return None
            return name, swapped
        i = p.inputs[0]
    return None


def _einsum_axis(eq: str, pos: int) -> int | str:
    """The contracted axis of operand ``pos`` of an einsum (negative index), or a reason."""
    eq = eq.replace(" ", "")
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if "..." in terms[pos]:
        return "an einsum weight operand with '...'"
    if "->" not in eq:
        letters = "".join(terms)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    contracted = [j for j, c in enumerate(terms[pos]) if c not in out]
    if len(contracted) != 1:
        return f"einsum {eq!r} contracts {len(contracted)} axes of the weight (one expected)"
    return contracted[0] - len(terms[pos])


def _axis(node: OpNode, pos: int) -> int | str:
    """Contracted axis of operand ``pos`` (negative index into the operand), or a reason."""
    first = 1 if node.op in ("baddbmm", "addmm") else 0  # the bias comes first
    if node.op == "einsum":
        eq = node.meta.get("equation")
        return _einsum_axis(eq, pos) if eq else "einsum without a recorded equation"
    if node.op == "linear":
        return -1 if pos == 1 else "a linear whose input is the weight"
    return -2 if pos == first + 1 else -1


def batched_weights(g: Graph, shapes: dict[str, tuple[int, ...]],
                    owner: dict[str, str]) -> list[BatchedRef]:
    """Every 3+-axis parameter applied by a matmul in ``g``, with its contracted axis.

    Args:
        g: The recorded forward pass.
        shapes: Parameter name -> shape.
        owner: Parameter name -> owning module path.

    Returns:
        One :class:`BatchedRef` per parameter (first use in the forward decides; a parameter used
        with two different contracted axes gets ``axis=None`` and a reason).
    """
    found: dict[str, BatchedRef] = {}
    for node in g.nodes:
        if node.op not in MATMULS:
            continue
        for pos in range(len(node.inputs)):
            src = _source(g, node, pos, shapes)
            if src is None:
                continue
            name, swapped = src
            nd = len(shapes[name])
            ax = _axis(node, pos)
            if isinstance(ax, int):
                if ax in (-1, -2):
                    ax = nd + ((-3 - ax) if swapped else ax)
                elif node.params[pos] is not None and len(node.in_shapes[pos]) == nd:
                    ax = nd + ax  # the parameter itself, not a view: same axes
                else:
                    ax = f"{node.op} contracts an axis of a view of the weight that cannot be " \
                         "mapped back to the parameter"
            ref = BatchedRef(name, owner.get(name, ""), node.op, ax if isinstance(ax, int)
                             else None, ax if isinstance(ax, str) else "")
            prev = found.get(name)
            if prev is None:
                found[name] = ref
            elif prev.axis != ref.axis and prev.axis is not None:
                found[name] = BatchedRef(name, prev.module, prev.op, None,
                                         "applied with different contracted axes")
    return list(found.values())
