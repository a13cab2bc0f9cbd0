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
from slimformer.models.trace import Graph, OpNode, detach_caches, record

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


@dataclass(frozen=True)
class LinearRef:
    """A linear map of an activation by a 2-D parameter.

    Attributes:
        weight: Full name of the weight parameter (e.g. ``encoder.layer.0.attention.self.query.weight``).
        module: Path of the module owning the weight.
        op: Op that applied it (``linear``, ``addmm``, ``matmul`` ...).
        in_features / out_features: Sizes of the contracted and produced axes.
        calls: Executions per forward (more than 1 for a layer shared across depth or towers).
    """

    weight: str
    module: str
    op: str
    in_features: int
    out_features: int
    calls: int = 1


@dataclass(frozen=True)
class NormSite:
    """A LayerNorm/RMSNorm and every consumer of its output.

    ``foldable`` is True when all consumers are Linears (pre-norm), so per-channel scales can be
    folded exactly into the norm affine; False when the output also feeds e.g. a residual add.
    """

    module: str
    kind: str  # "layernorm" | "rmsnorm"
    dim: int
    linears: tuple[str, ...]  # weight names of Linear consumers
    other_consumers: tuple[str, ...]  # op names of non-Linear consumers
    foldable: bool


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
    cross: bool  # k/v come from another sequence than q (different producer inputs)


@dataclass(frozen=True)
class MlpSite:
    """fc1 -> activation -> fc2 (fc1 has two Linears for gated MLPs).

    ``fc1_parts`` is 2 when gate and up are one Linear whose output is split in two halves
    (``gate, up = fc1(x).chunk(2, -1)``): hidden unit ``j`` owns rows ``j`` and ``hidden + j``.
    """

    fc1: tuple[str, ...]
    fc2: str
    activation: tuple[str, ...]
    hidden: int
    gated: bool
    fc1_parts: int = 1


@dataclass
class StructureMap:
    """Everything discovered about one model; every later stage reads it."""

    norms: list[NormSite] = field(default_factory=list)
    attention: list[AttentionSite] = field(default_factory=list)
    mlps: list[MlpSite] = field(default_factory=list)
    linears: list[LinearRef] = field(default_factory=list)
    convs: list[str] = field(default_factory=list)
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


class _Analyzer:
    def __init__(self, graph: Graph, model: torch.nn.Module):
        self.g = graph
        self.nodes = graph.nodes
        self.cons = graph.consumers()
        self.lin = {n.idx: _linear_of(n) for n in self.nodes}
        self.lin = {k: v for k, v in self.lin.items() if v}
        self.owner = {}
        for name, _ in model.named_parameters(remove_duplicate=False):
            self.owner[name] = name.rpartition(".")[0]
        self.norm_out: dict[int, str] = {}

    def linear_ref(self, idx: int) -> LinearRef:
        _, w, fin, fout = self.lin[idx]
        calls = sum(1 for v in self.lin.values() if v[1] == w)
        return LinearRef(w, self.owner.get(w, ""), self.nodes[idx].op, fin, fout, calls)

    def is_act_matmul(self, n: OpNode) -> bool:
        acts = [i for i, p in enumerate(n.params) if p is None and n.inputs[i] != -2]
        return n.op in MATMUL_OPS and n.idx not in self.lin and len(acts) >= 2

    def back(self, start: int, stop_at_norm: bool = False, limit: int = 64):
        """Nearest Linear producers behind node ``start`` and the ops crossed on the way."""
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
            if n.op in CONV_OPS:  # a conv mixes channels like a Linear: no path crosses it
                continue
            if stop_at_norm and i in self.norm_out:
                continue
            crossed.append(n.op)
            todo.extend(p for p, w in zip(n.inputs, n.params, strict=True) if w is None)
        return sorted(found), crossed

    def forward_to(self, start: int, want, limit: int = 32) -> int | None:
        """First node after ``start`` (through pass-through/elementwise ops) that satisfies ``want``."""
        seen, todo = set(), list(self.cons.get(start, []))
        while todo and len(seen) < limit:
            i = todo.pop(0)
            if i in seen:
                continue
            seen.add(i)
            n = self.nodes[i]
            if want(n):
                return i
            if n.op in PASS_THROUGH or n.op in {"mul", "div", "to", "masked_fill", "where", "add"}:
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


def _norm_kind(call, cache: dict[int, str | None]) -> str | None:
    """'layernorm' / 'rmsnorm' if the call's module normalizes over the last axis, else None.

    Scale-invariant: the module is probed on a synthetic input of the recorded shape (unit scale,
    non-zero mean) and on 16 times that input; a norm gives the same output for both, equal to the
    normalized probe times the module's own 1-D parameters (weight, optional bias), or the bare
    normalized probe for a module without parameters. The activations the model actually saw
    (however tiny or large) do not enter the decision, so an activation function (not
    scale-invariant) or an attention module (it owns Linears) is never taken for a norm.
    ``cache`` holds the decision per module object (a shared module is probed once).
    """
    x, y = call.input, call.output
    if x is None or y is None or x is y or x.shape != y.shape or not x.is_floating_point():
        return None
    mod = call.module
    if id(mod) in cache:
        return cache[id(mod)]
    cache[id(mod)] = None
    dim = x.shape[-1]
    own = [p.detach().double() for p in mod.parameters(recurse=False)]
    if dim < 2 or len(own) > 2 or any(p.shape != (dim,) for p in own) or \
            len(list(mod.parameters())) != len(own):
        return None
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(x.shape, generator=gen) * 2 + 0.5).to(x.dtype)
    try:
        with torch.no_grad():
            y1, y2 = mod(probe), mod(probe * 16)
    except Exception:  # noqa: BLE001 - a module that cannot run on one tensor is not a norm
        return None
    if not all(isinstance(t, torch.Tensor) and t.shape == probe.shape for t in (y1, y2)):
        return None
    y1, y2, z0 = y1.detach().double(), y2.detach().double(), probe.double()
    size = y1.norm()
    if not torch.isfinite(size) or size == 0 or (y1 - y2).norm() > 1e-3 * size:
        return None  # not scale-invariant
    affines = [(own[0], own[1]), (own[1], own[0])] if len(own) == 2 else [
        (own[0] if own else torch.ones(dim, dtype=z0.dtype), torch.zeros(dim, dtype=z0.dtype))]
    mu = z0.mean(-1, keepdim=True)
    var, ms = z0.var(-1, unbiased=False, keepdim=True), (z0 * z0).mean(-1, keepdim=True)
    for kind, z in (("layernorm", (z0 - mu) / torch.sqrt(var)), ("rmsnorm", z0 / torch.sqrt(ms))):
        for w, b in affines:
            if (z * w + b - y1).norm() < 1e-3 * size:
                cache[id(mod)] = kind
                return kind
    return None


def _norms(a: _Analyzer) -> list[NormSite]:
    by_out: dict[int, tuple[str, str, int]] = {}
    cache: dict[int, str | None] = {}
    for call in a.g.calls:
        if call.output_node is None or call.output_node < 0:
            continue
        kind = _norm_kind(call, cache)
        if kind is None:
            continue
        prev = by_out.get(call.output_node)
        if prev is None or len(call.path) > len(prev[0]):  # the innermost module wins
            by_out[call.output_node] = (call.path, kind, call.output.shape[-1])
    # a norm run several times (shared across depth or towers) is one site over all its calls
    merged: dict[str, tuple[str, int, list[str], list[str]]] = {}
    for out_node, (path, kind, dim) in by_out.items():
        a.norm_out[out_node] = path
        _, _, linears, others = merged.setdefault(path, (kind, int(dim), [], []))
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
    for path, (kind, dim, linears, others) in merged.items():
        linears = list(dict.fromkeys(linears))
        if linears:
            sites.append(NormSite(path, kind, dim, tuple(linears),
                                  tuple(dict.fromkeys(others)), not others))
    return sorted(sites, key=lambda s: s.module)


def _producers(a: _Analyzer, idx: int) -> tuple[str, ...]:
    found, _ = a.back(idx)
    return tuple(dict.fromkeys(a.lin[i][1] for i in found))


def _attention(a: _Analyzer) -> list[AttentionSite]:
    sites: list[AttentionSite] = []
    for n in a.nodes:
        if n.op == "softmax":
            qk = _score_matmul(a, n.inputs[0])
            pv = a.forward_to(n.idx, lambda m: a.is_act_matmul(m))
            if qk is None or pv is None:
                continue
            mm = a.nodes[qk]
            q_src, k_src = mm.inputs[0], mm.inputs[1]
            v_src = next(p for p in a.nodes[pv].inputs[1:] if p >= -1)
            # heads from the scores (B, heads, Tq, Tk): q may be laid out (B, T, heads, d)
            sites.append(_site(a, n, "softmax", q_src, k_src, v_src, pv, n.in_shapes[0],
                               mm.in_shapes[0][-1]))
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
            cross = len({p for p in n.inputs[:3]}) > 1
            sites.append(AttentionSite(n.module, "mha", q, k, v, out, heads, embed // heads,
                                       len(ws) == 2, cross))
    return sites


def _score_matmul(a: _Analyzer, start: int) -> int | None:
    """The activation-activation matmul that produced the attention scores behind ``start``."""
    seen, todo = set(), [start]
    while todo and len(seen) < 32:
        i = todo.pop(0)
        if i < 0 or i in seen:
            continue
        seen.add(i)
        n = a.nodes[i]
        if a.is_act_matmul(n):
            return i
        if i in a.lin or n.op in {"softmax", "sdpa", "mha", "layer_norm", "embedding"}:
            continue
        todo.extend(p for p, w in zip(n.inputs, n.params, strict=True) if w is None)
    return None


def _site(a, n, kind, q_src, k_src, v_src, out_from, shape4, head_dim) -> AttentionSite:
    """Build a site; ``shape4`` is (B, heads, T, *) when 4-D, else heads come from q's width."""
    q, k, v = (_producers(a, s) if s >= 0 else () for s in (q_src, k_src, v_src))
    o = a.forward_to(out_from, lambda m: m.idx in a.lin)
    out = (a.lin[o][1],) if o is not None else ()
    fused = bool(q) and q == k == v
    q_lin = a.back(q_src)[0] if q else []
    if len(shape4) == 4:
        heads = shape4[1]
    else:
        width = a.lin[q_lin[0]][3] if q_lin else head_dim
        heads = max(1, width // (3 * head_dim if fused else head_dim))
    q_in = {a.nodes[i].inputs[a.lin[i][0]] for i in q_lin}
    kv_in = {a.nodes[i].inputs[a.lin[i][0]] for i in a.back(k_src)[0]} if k else set()
    return AttentionSite(n.module, kind, q, k, v, out, int(heads), int(head_dim), fused,
                         bool(q_in and kv_in and q_in != kv_in))


def _mlps(a: _Analyzer, attn: list[AttentionSite]) -> list[MlpSite]:
    attn_w = {w for s in attn for w in (*s.q, *s.k, *s.v, *s.out)}
    sites = []
    seen_fc2 = set()
    for idx, (apos, w2, fin2, fout2) in sorted(a.lin.items()):
        if w2 in attn_w or w2 in seen_fc2:
            continue
        src = a.nodes[idx].inputs[apos]
        if src < 0:
            continue
        found, crossed = a.back(src, stop_at_norm=True)
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
        seen_fc2.add(w2)
        sites.append(MlpSite(tuple(dict.fromkeys(a.lin[i][1] for i in fc1)), w2, acts, fin2,
                             len(fc1) > 1 or parts > 1, parts))
    return sites


def _followers(a: _Analyzer) -> dict[str, tuple[str, ...]]:
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
    a = _Analyzer(graph, model)
    smap = StructureMap()
    smap.norms = _norms(a)
    smap.attention = _dedupe(_attention(a))
    smap.mlps = _mlps(a, smap.attention)
    smap.linears = list({r.weight: r for r in map(a.linear_ref, sorted(a.lin))}.values())
    smap.followers = _followers(a)
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
