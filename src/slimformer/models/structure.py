"""Structure discovery: norms feeding Linears, attention sites and MLPs, found from the data flow.

``discover(model, inputs)`` records one forward pass (:mod:`slimformer.models.trace`) and reads
the structure off the op graph. Nothing here looks at module or parameter *names*: a Linear is any
op that multiplies an activation by a 2-D parameter (``F.linear``, ``addmm`` as in GPT-2's
Conv1D, ``x @ W``), a norm is any module whose output is its input normalized over the last axis,
attention is a softmax between two activation-activation matmuls, a fused
``scaled_dot_product_attention``, or ``multi_head_attention_forward``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from slimformer.errors import UnsupportedModelError
from slimformer.models.dataflow import (  # noqa: F401 - PASS_THROUGH, _linear_of used elsewhere
    ACTIVATIONS,
    CONV_OPS,
    PASS_THROUGH,
    SPLITS,
    Analyzer,
    _linear_of,
    head_mixers,
    stream,
)
from slimformer.models.norms import NormForm, norm_form
from slimformer.models.trace import Graph, detach_caches, record
from slimformer.models.weights import BatchedRef, batched_weights


@dataclass(frozen=True)
class LinearRef:
    """A linear map of an activation by a 2-D parameter.

    Attributes:
        weight: Full name of the weight parameter (e.g. ``encoder.layer.0.attention.self.query.weight``).
        module: Path of the module owning the weight.
        op: Op that applied it (``linear``, ``addmm``, ``matmul`` ...).
        in_features / out_features: Sizes of the contracted and produced axes.
        calls: Executions per forward (more than 1 for a layer shared across depth or towers).
        output: Its output is returned by the model (through shape-only ops): a head, e.g. an
            LM's vocabulary projection or a classifier.
    """

    weight: str
    module: str
    op: str
    in_features: int
    out_features: int
    calls: int = 1
    output: bool = False


@dataclass(frozen=True)
class NormSite:
    """A LayerNorm/RMSNorm and every consumer of its output.

    ``foldable`` is True when all consumers are Linears (pre-norm), so per-channel scales can be
    folded exactly into the norm affine; False when the output also feeds e.g. a residual add.
    ``weight`` / ``bias`` name the module's gain and shift parameters (found by behaviour, ``""``
    when absent); the effective gain is ``gain_offset + weight`` (1.0 where it is stored as
    ``1 + w``), which a fold into the gain must respect.
    """

    module: str
    kind: str  # "layernorm" | "rmsnorm"
    dim: int
    linears: tuple[str, ...]  # weight names of Linear consumers
    other_consumers: tuple[str, ...]  # op names of non-Linear consumers
    foldable: bool
    weight: str = ""
    bias: str = ""
    gain_offset: float = 0.0


@dataclass(frozen=True)
class AttentionSite:
    """One attention computation: producers of q, k, v, the scores softmax, P@V, the output Linear."""

    module: str  # innermost module in which the scores were computed
    kind: str  # "softmax" (explicit) | "sdpa" | "mha" (torch.nn.MultiheadAttention)
    q: tuple[str, ...]
    k: tuple[str, ...]
    v: tuple[str, ...]
    out: tuple[str, ...]
    heads: int
    head_dim: int
    fused_qkv: bool
    cross: bool  # k/v come from another sequence than q (not a selected/pooled copy of q's)
    mixers: tuple[str, ...] = ()  # Linears across the heads axis of the scores (talking heads)


@dataclass(frozen=True)
class MlpSite:
    """fc1 -> activation -> fc2 (fc1 has two Linears for gated MLPs).

    ``fc1_parts`` is 2 when gate and up are one Linear whose output is split in two halves
    (``gate, up = fc1(x).chunk(2, -1)``): hidden unit ``j`` owns rows ``j`` and ``hidden + j``.
    ``channelwise`` are the weights of depthwise convolutions between fc1 and fc2 (a Mix-FFN:
    fc1 -> depthwise conv -> activation -> fc2); hidden unit ``j`` owns their channel ``j`` (and
    ``hidden + j`` where a conv runs over both halves of a fused fc1).
    """

    fc1: tuple[str, ...]
    fc2: str
    activation: tuple[str, ...]
    hidden: int
    gated: bool
    fc1_parts: int = 1
    channelwise: tuple[str, ...] = ()


@dataclass
class StructureMap:
    """Everything discovered about one model; every later stage reads it."""

    norms: list[NormSite] = field(default_factory=list)
    attention: list[AttentionSite] = field(default_factory=list)
    mlps: list[MlpSite] = field(default_factory=list)
    linears: list[LinearRef] = field(default_factory=list)
    convs: list[str] = field(default_factory=list)
    batched: list[BatchedRef] = field(default_factory=list)  # 3+-axis matmul weights (experts)
    executions: dict[str, int] = field(default_factory=dict)  # module path -> calls per forward
    # Linear weight -> modules normalizing its output per channel (a BatchNorm after a Linear):
    # cutting the Linear's outputs cuts their channels too
    followers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    params: int = 0
    macs: int = 0  # per forward of the example inputs
    batch: int = 1

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @property
    def shared(self) -> dict[str, int]:
        """Modules that own parameters and run more than once per forward, with their calls."""
        return {m: n for m, n in self.executions.items() if n > 1}

    @property
    def norm_linear_pairs(self) -> int:
        """Number of (norm, Linear) pairs."""
        return sum(len(n.linears) for n in self.norms)


def _norm_kind(call, cache: dict) -> str | None:
    """'layernorm' / 'rmsnorm' if the call's module normalizes over the last axis, else None.

    See :func:`~slimformer.models.norms.norm_form` (which also says how the gain is stored).
    """
    form = norm_form(call, cache)
    return form.kind if form else None


def _norms(a: Analyzer) -> list[NormSite]:
    by_out: dict[int, tuple[str, NormForm, int]] = {}
    cache: dict[int, NormForm | None] = {}
    for call in a.g.calls:
        if call.output_node is None or call.output_node < 0:
            continue
        form = norm_form(call, cache)
        if form is None:
            continue
        prev = by_out.get(call.output_node)
        if prev is None or len(call.path) > len(prev[0]):  # the innermost module wins
            by_out[call.output_node] = (call.path, form, call.output.shape[-1])
            if call.input_node is not None:
                a.norm_in[call.output_node] = call.input_node
    # a norm run several times (shared across depth or towers) is one site over all its calls
    merged: dict[str, tuple[NormForm, int, list[str], list[str]]] = {}
    for out_node, (path, form, dim) in by_out.items():
        a.norm_out[out_node] = path
        _, _, linears, others = merged.setdefault(path, (form, int(dim), [], []))
        scaled: list[int] = []
        consumers = a.pass_consumers(out_node, scaled)
        if scaled:  # exact only with the affine kept on the quantized branch (not folded)
            others.append("per-token multiply (mask)")
        for c in consumers:
            if c == -1:
                others.append("model output")
                continue
            n = a.nodes[c]
            if c in a.lin:
                linears.append(a.lin[c][1])
            elif n.op == "mha":
                w = next((p for p in n.params if p is not None), None)
                linears.append(w) if w else others.append(n.op)
            else:
                others.append(n.op)
    sites = []
    for path, (form, dim, linears, others) in merged.items():
        linears = list(dict.fromkeys(linears))
        if linears:
            pre = f"{path}." if path else ""
            sites.append(NormSite(path, form.kind, dim, tuple(linears),
                                  tuple(dict.fromkeys(others)), not others,
                                  pre + form.weight if form.weight else "",
                                  pre + form.bias if form.bias else "", form.gain_offset))
    return sorted(sites, key=lambda s: s.module)


def _linear_ref(a: Analyzer, idx: int) -> LinearRef:
    _, w, fin, fout = a.lin[idx]
    calls = sum(1 for v in a.lin.values() if v[1] == w)
    output = any(-1 in a.pass_consumers(i) for i, v in a.lin.items() if v[1] == w)
    return LinearRef(w, a.owner.get(w, ""), a.nodes[idx].op, fin, fout, calls, output)


def _producers(a: Analyzer, idx: int) -> tuple[str, ...]:
    found, _ = a.back(idx)
    return tuple(dict.fromkeys(a.lin[i][1] for i in found))


def _attention(a: Analyzer) -> list[AttentionSite]:
    sites: list[AttentionSite] = []
    mixers = head_mixers(a)
    for n in a.nodes:
        if n.op == "softmax":
            qk = _score_matmul(a, n.inputs[0], mixers)
            pv = a.forward_to(n.idx, lambda m: a.is_act_matmul(m), through=mixers)
            if qk is None or pv is None:
                continue
            mm = a.nodes[qk]
            q_src, k_src = mm.inputs[0], mm.inputs[1]
            v_src = next(p for p in a.nodes[pv].inputs[1:] if p >= -1)
            mixed = _mixers_between(a, qk, pv, mixers)
            # heads from the scores (B, heads, Tq, Tk): q may be laid out (B, T, heads, d)
            sites.append(_site(a, n, "softmax", q_src, k_src, v_src, pv, n.in_shapes[0],
                               mm.in_shapes[0][-1], mixed))
        elif n.op == "sdpa":
            qshape = n.in_shapes[0]
            sites.append(_site(a, n, "sdpa", n.inputs[0], n.inputs[1], n.inputs[2], n.idx,
                               qshape, qshape[-1]))
        elif n.op == "mha":
            # 2-D parameters in argument order: (in_proj, out_proj) when packed, else
            # (out_proj, q_proj, k_proj, v_proj) since the separate ones are keyword arguments
            ws = [p for p, sh in zip(n.params, n.in_shapes, strict=True) if p and len(sh) == 2]
            heads = int(n.meta.get("num_heads") or 1)
            if len(ws) == 2:
                q = k = v = (ws[0],)
                out = (ws[1],)
            elif len(ws) == 4:
                out, q, k, v = ((w,) for w in ws)
            else:
                continue
            embed = n.in_shapes[0][-1]
            q_in, kv_in = n.inputs[0], n.inputs[1:3]
            cross = any(i != q_in and not (stream(a, i) & stream(a, q_in)) for i in kv_in)
            sites.append(AttentionSite(n.module, "mha", q, k, v, out, heads, embed // heads,
                                       len(ws) == 2, cross))
    return sites


def _mixers_between(a: Analyzer, qk: int, pv: int, mixers: set[int]) -> tuple[str, ...]:
    """Weights of the head-mixing Linears that lie between the scores matmul and P@V."""
    if not mixers:
        return ()
    ahead, todo = set(), [qk]
    while todo:
        i = todo.pop()
        for c in a.cons.get(i, []):
            if c not in ahead and c < pv:
                ahead.add(c)
                todo.append(c)
    return tuple(dict.fromkeys(a.lin[i][1] for i in sorted(mixers & ahead)))


def _score_matmul(a: Analyzer, start: int, mixers: set[int] = frozenset()) -> int | None:
    """The activation-activation matmul that produced the attention scores behind ``start``.

    Linears mixing the heads of the scores (``mixers``) are crossed to their input.
    """
    seen, todo = set(), [start]
    while todo and len(seen) < 32:
        i = todo.pop(0)
        if i < 0 or i in seen:
            continue
        seen.add(i)
        n = a.nodes[i]
        if a.is_act_matmul(n):
            return i
        if i in mixers:
            todo.append(n.inputs[a.lin[i][0]])
            continue
        if i in a.lin or n.op in {"softmax", "sdpa", "mha", "layer_norm", "embedding"}:
            continue
        todo.extend(p for p, w in zip(n.inputs, n.params, strict=True) if w is None)
    return None


def _heads(shape: tuple[int, ...], width: int | None, head_dim: int, parts: int) -> int:
    """Heads of a site from the q projection's width and the scores' (or q's) shape.

    ``parts``: how many of q, k, v the q projection also produces (3 when fused). The projection
    says ``heads = width / (parts * head_dim)``; the scores' axis 1 (``(B, heads, Tq, Tk)``) is
    taken where it agrees, or where a fused projection holds fewer key/value heads
    (grouped-query: ``width / head_dim = heads + 2 kv_heads``). A layout whose axis 1 is no head
    axis (chunks of a sliding window: ``(B * heads, chunks, w, w)``) is read from the width.
    """
    axis = shape[1] if len(shape) == 4 else None
    if not width or width % head_dim:
        return max(1, axis or 1)
    n = width // head_dim
    if axis and n == axis * parts:
        return axis
    if axis and parts == 3 and n > axis and (n - axis) % 2 == 0 and (n - axis) // 2 < axis \
            and axis % ((n - axis) // 2) == 0:
        return axis
    return max(1, n // parts)


def _site(a, n, kind, q_src, k_src, v_src, out_from, shape4, head_dim,
          mixers: tuple[str, ...] = ()) -> AttentionSite:
    """Build a site; ``shape4`` is (B, heads, T, *) when 4-D, else heads come from q's width."""
    q, k, v = (_producers(a, s) if s >= 0 else () for s in (q_src, k_src, v_src))
    o = a.forward_to(out_from, lambda m: m.idx in a.lin)
    out = (a.lin[o][1],) if o is not None else ()
    fused = bool(q) and q == k == v
    q_lin = a.back(q_src)[0] if q else []
    width = a.lin[q_lin[0]][3] if q_lin else None
    heads = _heads(tuple(shape4), width, head_dim, 1 + (q == k) + (q == v) if q else 1)
    q_in = {a.nodes[i].inputs[a.lin[i][0]] for i in q_lin}
    kv_in = {a.nodes[i].inputs[a.lin[i][0]] for i in a.back(k_src)[0]} if k else set()
    q_stream = set().union(*(stream(a, i) for i in q_in)) if q_in else set()
    cross = bool(q_in and kv_in and q_in != kv_in and
                 not any(stream(a, i) & q_stream for i in kv_in))
    return AttentionSite(n.module, kind, q, k, v, out, int(heads), int(head_dim), fused, cross,
                         mixers)


def _mlps(a: Analyzer, attn: list[AttentionSite]) -> list[MlpSite]:
    attn_w = {w for s in attn for w in (*s.q, *s.k, *s.v, *s.out)}
    sites = []
    seen_fc2 = set()
    for idx, (apos, w2, fin2, fout2) in sorted(a.lin.items()):
        if w2 in attn_w or w2 in seen_fc2:
            continue
        src = a.nodes[idx].inputs[apos]
        if src < 0:
            continue
        convs: list[int] = []
        found, crossed = a.back(src, stop_at_norm=True, convs=convs)
        acts = tuple(dict.fromkeys(op for op in crossed if op in ACTIVATIONS))
        fc1 = [i for i in found if a.lin[i][1] not in attn_w]
        if not fc1 or not acts or len(fc1) != len(found):
            continue
        ins = {a.lin[i][2] for i in fc1}
        if ins != {fout2}:
            continue
        parts = 1
        if any(a.lin[i][3] != fin2 for i in fc1):
            # one Linear holding gate and up, split in two halves before the gating multiply
            fused = len(fc1) == 1 and a.lin[fc1[0]][3] == 2 * fin2 and "mul" in crossed and \
                any(op in SPLITS for op in crossed)
            if not fused:
                continue
            parts = 2
        dw = tuple(dict.fromkeys(a.depthwise(a.nodes[i]) for i in sorted(convs)))
        if any(a.nodes[i].in_shapes[0][1] not in (fin2, fin2 * parts) for i in convs):
            continue  # a conv over other channels than the hidden units
        seen_fc2.add(w2)
        sites.append(MlpSite(tuple(dict.fromkeys(a.lin[i][1] for i in fc1)), w2, acts, fin2,
                             len(fc1) > 1 or parts > 1, parts, dw))
    return sites


def _followers(a: Analyzer) -> dict[str, tuple[str, ...]]:
    """Per Linear weight, the BatchNorm modules applied to its output over the same channels."""
    out: dict[str, list[str]] = {}
    for idx, (_, w, _, fout) in a.lin.items():
        for c in a.pass_consumers(idx):
            n = a.nodes[c] if c >= 0 else None
            if n is None or n.op != "batch_norm" or len(n.in_shapes[0]) < 2 or \
                    n.in_shapes[0][1] != fout:
                continue
            bn = next((p for p in n.params[1:] if p), None)  # its weight or bias
            if bn is not None:
                out.setdefault(w, []).append(a.owner[bn])
    return {w: tuple(dict.fromkeys(m)) for w, m in out.items()}


def discover(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
             require_attention: bool = True) -> StructureMap:
    """Find norms, attention sites and MLPs of ``model`` from one forward pass on ``inputs``.

    Args:
        model: Any ``nn.Module``; it is run once in eval mode, its weights are not changed.
        inputs: Keyword arguments of ``model.forward`` (e.g. ``{"pixel_values": (B, C, H, W)}``).
        require_attention: Raise :class:`UnsupportedModelError` when no attention is found.
    """
    from torch.utils.flop_counter import FlopCounterMode

    graph, _ = record(model, inputs)
    a = Analyzer(graph, model)
    smap = StructureMap()
    smap.norms = _norms(a)
    smap.attention = _dedupe(_attention(a))
    smap.mlps = _mlps(a, smap.attention)
    smap.linears = list({r.weight: r for r in (_linear_ref(a, i) for i in sorted(a.lin))}.values())
    smap.followers = _followers(a)
    smap.batched = batched_weights(graph, {n: tuple(p.shape) for n, p in model.named_parameters()},
                                   a.owner)
    smap.convs = list(dict.fromkeys(
        a.owner.get(next(p for p in n.params if p), "") for n in graph.nodes
        if n.op in CONV_OPS and any(n.params)))
    for c in graph.calls:  # modules owning parameters, in order of first call
        if next(c.module.parameters(recurse=False), None) is not None:
            smap.executions[c.path] = smap.executions.get(c.path, 0) + 1
    smap.params = sum(p.numel() for p in model.parameters())
    batch = next((t.shape[0] for t in inputs.values() if isinstance(t, torch.Tensor)
                  and t.dim() > 0), 1)
    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        model(**inputs)  # grad mode keeps fused inference fast paths (uncounted) off
    detach_caches(model)
    smap.macs, smap.batch = int(fc.get_total_flops() // 2 // max(batch, 1)), 1
    if require_attention and not smap.attention:
        raise UnsupportedModelError(_missing(smap, graph))
    return smap


def _dedupe(sites: list[AttentionSite]) -> list[AttentionSite]:
    out = {}
    for s in sites:
        out.setdefault((s.q, s.k, s.v, s.out, s.module), s)
    return list(out.values())


def _missing(smap: StructureMap, graph: Graph) -> str:
    ops = sorted({n.op for n in graph.nodes})
    return (
        f"no attention found: looked for softmax between two activation matmuls, "
        f"scaled_dot_product_attention and multi_head_attention_forward. Found "
        f"{len(smap.linears)} Linear(s), {len(smap.norms)} norm(s) feeding Linears, "
        f"{len(smap.mlps)} MLP(s), {len(smap.convs)} conv(s); ops seen: {', '.join(ops[:40])}"
    )
