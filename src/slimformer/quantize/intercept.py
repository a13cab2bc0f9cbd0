"""Apply quantizers during a forward pass, found by parameter identity and attention module.

:class:`QuantMode` is a :class:`~torch.overrides.TorchFunctionMode`: every ``F.linear``,
``addmm`` or ``x @ W`` whose weight is a quantized parameter gets a quantized input and weight,
wherever it is called from (``nn.Linear``, GPT-2's Conv1D, ``nn.MultiheadAttention``'s packed
projection). Any other op that reads a quantized weight (``W[e]`` of an expert tensor, ``W.t()``,
``index_select``) reads its fake-quantized value, and its result is remembered as a weight view:
a matmul (``linear``, ``matmul``, ``bmm``, ``einsum``, ``baddbmm``, grouped mm) of a weight or a
weight view quantizes its other operands with that weight's input quantizer. Inside an attention
site module, the inputs of the two attention matmuls and the probabilities are quantized; fused
``scaled_dot_product_attention`` and ``multi_head_attention_forward`` are computed explicitly so
their parts can be quantized (under a function mode ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` never take their fused fast paths; a direct call of a fused kernel
on a quantized weight is refused).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode

from slimformer.errors import UnsupportedModelError

_MATMULS = {"matmul", "__matmul__", "bmm", "einsum", "__rmatmul__"}
# products with a weight operand: name -> index of the first factor (the bias comes first)
_PRODUCTS = {"linear": 0, "matmul": 0, "__matmul__": 0, "__rmatmul__": 0, "mm": 0, "bmm": 0,
             "einsum": 0, "_grouped_mm": 0, "baddbmm": 1, "addmm": 1, "addbmm": 1}
_FUSED = {"_native_multi_head_attention", "_transformer_encoder_layer_fwd"}
# ops that select, move or re-type a weight (their result is a weight view); other ops on a weight
# (an embedding lookup of a tied table, a norm of it) read the float weight as before
_VIEW_OPS = {"__getitem__", "index_select", "select", "narrow", "contiguous", "to", "float",
             "half", "bfloat16", "type_as", "clone", "detach", "t", "transpose", "swapaxes",
             "permute", "movedim", "view", "reshape", "expand", "unsqueeze", "squeeze", "chunk",
             "split", "unbind", "take_along_dim", "gather", "index"}


class QuantMode(TorchFunctionMode):
    """Routes linear and attention ops of a model through its quantizers (see module doc)."""

    def __init__(self, qstate):
        super().__init__()
        self.q = qstate
        self.attn = None  # AttentionQuant of the attention module running now
        self.after_softmax = False

    def __enter__(self):
        self.q.views = {}
        return super().__enter__()

    def __exit__(self, *exc):
        self.q.views = {}
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "linear":
            site = self.q.linear_site(args[1] if len(args) > 1 else kwargs.get("weight"))
            if site is not None:  # x (..., in), W (out, in), b (out,) -> (..., out)
                x = args[0] if args else kwargs["input"]
                b = args[2] if len(args) > 2 else kwargs.get("bias")
                return F.linear(site.act_in(x), site.weight(), b)
        elif name == "addmm" and len(args) >= 3:
            site = self.q.linear_site(args[2])
            if site is not None:  # b (out,) + x (n, in) @ W (in, out): GPT-2's Conv1D
                return torch.addmm(args[0], site.act_in(args[1]), site.weight(), **kwargs)
        elif name in ("conv1d", "conv2d", "conv3d") and len(args) >= 2:
            site = self.q.linear_site(args[1])
            if site is not None:  # x (B, C_in, *spatial), W (C_out, C_in / groups, *kernel)
                return func(site.act_in(args[0]), site.weight(), *args[2:], **kwargs)
        elif name == "embedding" and len(args) >= 2:
            site = self.q.embedding_site(args[1])
            if site is not None:  # ids (...), table (num, dim) -> (..., dim)
                return func(args[0], site.weight(), *args[2:], **kwargs)
        elif name in ("matmul", "__matmul__") and len(args) == 2:
            site = self.q.linear_site(args[1])
            if site is not None:  # x (..., in) @ W (in, out) -> (..., out)
                return torch.matmul(site.act_in(args[0]), site.weight())
        if self.attn is not None:
            out = self._attention(func, name, args, kwargs)
            if out is not NotImplemented:
                return out
        if name == "multi_head_attention_forward" and self.q.has_mha:
            raise UnsupportedModelError("multi_head_attention_forward outside a known attention site")
        out = self._weights(func, name, args, kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out

    def _site_of(self, t):
        """The LinearQuant whose weight ``t`` is (or was computed from), and whether a view."""
        if not isinstance(t, torch.Tensor):
            return None, False
        site = self.q.by_id.get(id(t))
        if site is not None:
            return site, False
        view = self.q.views.get(id(t))
        return (view[1], True) if view is not None and view[0] is t else (None, False)

    def _weights(self, func, name, args, kwargs):
        """Ops reading a quantized weight other than the direct forms (see module doc)."""
        eq = args[0] if name == "einsum" and args and isinstance(args[0], str) else None
        ops = list(args[1:] if eq is not None else args)
        nested = eq is not None and len(ops) == 1 and isinstance(ops[0], (list, tuple))
        if nested:
            ops = list(ops[0])
        found = [(j, *self._site_of(t)) for j, t in enumerate(ops)]
        found = [f for f in found if f[1] is not None]
        if not found or name not in _PRODUCTS and name not in _VIEW_OPS and name not in _FUSED:
            return NotImplemented
        if name in _FUSED:
            raise UnsupportedModelError(
                f"{name} (a fused kernel) reads the quantized weight {found[0][1].name}: its "
                "matmul inputs cannot be quantized; run the model without its fused fast path")
        for j, site, is_view in found:
            if not is_view:
                ops[j] = site.weight()
        if name in _PRODUCTS:
            first = _PRODUCTS[name]
            factors = range(len(ops)) if eq is not None else range(first, min(first + 2, len(ops)))
            weights = {j for j, _, _ in found}
            site = found[0][1]
            for j in factors:
                if j not in weights and isinstance(ops[j], torch.Tensor):
                    ops[j] = site.act_in(ops[j])
        new = ([eq, ops] if nested else [eq, *ops]) if eq is not None else ops
        out = func(*new, **kwargs)
        if name not in _PRODUCTS:
            site = found[0][1]
            for o in (out if isinstance(out, (list, tuple)) else (out,)):
                if isinstance(o, torch.Tensor):
                    self.q.views[id(o)] = (o, site)
        return out

    def _attention(self, func, name, args, kwargs):
        a = self.attn
        if name == "softmax":
            self.after_softmax = True
            return a.quant_probs(func(*args, **kwargs))
        if name in _MATMULS:
            eq = args[0] if name == "einsum" else None
            t = list(args[1:] if name == "einsum" else args)
            if len(t) == 1 and isinstance(t[0], (list, tuple)):
                t = list(t[0])
            if len(t) != 2 or not all(isinstance(x, torch.Tensor) for x in t):
                return NotImplemented
            if any(self.q.is_param(x) or self._site_of(x)[0] is not None for x in t):
                return NotImplemented
            if not self.after_softmax:  # q (..., Tq, D) @ k^T (..., D, Tk): the scores
                t = [a.q_in(t[0]), a.k_in(t[1])]
                return func(eq, *t) if eq is not None else func(*t, **kwargs)
            mm = (lambda x, y: func(eq, x, y)) if eq is not None else (lambda x, y: func(x, y))
            return a.pv(t[0], t[1], mm)  # probs (..., Tq, Tk) @ v (..., Tk, D)
        if name == "scaled_dot_product_attention":
            return sdpa(a, *args, **kwargs)
        if name == "multi_head_attention_forward":
            return mha_forward(self.q, a, *args, **kwargs)
        return NotImplemented


def _attend(a, q, k, v, mask, is_causal, scale):
    """``softmax(q k^T * scale + mask) v`` with all parts quantized. q (..., Tq, D)."""
    scores = a.q_in(q) @ a.k_in(k).transpose(-2, -1) * scale  # (..., Tq, Tk)
    if is_causal:
        tq, tk = scores.shape[-2:]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)  # (Tq, Tk)
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    probs = torch.softmax(scores, dim=-1)  # (..., Tq, Tk)
    if mask is not None:  # a query that may see no key (a left pad's) attends to nothing, as in
        # SDPA's own safe softmax: zeros, not NaN
        probs = probs.masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)
    probs = a.quant_probs(probs)
    return a.pv(probs, v, torch.matmul), probs  # (..., Tq, D), (..., Tq, Tk)


def sdpa(a, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False):
    """Explicit, quantized ``scaled_dot_product_attention`` (eval: no dropout).

    ``query (..., H, Tq, D)``, ``key`` and ``value (..., H_kv, Tk, D)``; returns ``(..., H, Tq, D)``.
    """
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]  # query heads per key/value head
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)  # (.., H, Tk, D)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    return _attend(a, query, key, value, attn_mask, is_causal, scale)[0]


def mha_forward(qstate, a, query, key, value, embed_dim_to_check, num_heads, in_proj_weight,
                in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight,
                out_proj_bias, training=True, key_padding_mask=None, need_weights=True,
                attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
                k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                average_attn_weights=True, is_causal=False):
    """Explicit, quantized ``F.multi_head_attention_forward`` (sequence-first, eval mode).

    ``query (Tq, B, E)``, ``key`` and ``value (Tk, B, E)``; returns ``(Tq, B, E)`` and the
    probabilities ``(B, Tq, Tk)`` (averaged over heads) or ``(B, H, Tq, Tk)``, or None.
    """
    if bias_k is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise UnsupportedModelError("nn.MultiheadAttention with bias_k/bias_v, add_zero_attn or "
                                    "static k/v cannot be quantized; supported: the plain form")
    tq, b, e = query.shape
    h, d = num_heads, e // num_heads
    if not use_separate_proj_weight:
        site = qstate.linear_site(in_proj_weight)
        w = site.weight() if site else in_proj_weight  # (3E, E): packed q, k, v projections
        wq, wk, wv = w.chunk(3)  # (E, E) each
        bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None,) * 3
        act = site.act_in if site else (lambda x: x)
        qx = act(query)
        kx = qx if key is query else act(key)
        vx = kx if value is key else act(value)
        q, k, v = F.linear(qx, wq, bq), F.linear(kx, wk, bk), F.linear(vx, wv, bv)  # (T, B, E)
    else:
        bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None,) * 3
        q, k, v = (_proj(qstate, x, w, b) for x, w, b in ((query, q_proj_weight, bq),
                                                          (key, k_proj_weight, bk),
                                                          (value, v_proj_weight, bv)))
    tk = k.shape[0]
    q = q.reshape(tq, b, h, d).permute(1, 2, 0, 3)  # (B, H, Tq, D)
    k = k.reshape(tk, b, h, d).permute(1, 2, 0, 3)  # (B, H, Tk, D)
    v = v.reshape(tk, b, h, d).permute(1, 2, 0, 3)  # (B, H, Tk, D)
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(b, h, tq, tk)  # (Tq, Tk)
        if mask.dtype == torch.bool:
            mask = ~mask  # MHA: True = masked out; ours: True = kept
    if key_padding_mask is not None:
        kp = key_padding_mask.reshape(b, 1, 1, tk)  # (B, 1, 1, Tk)
        kp = ~kp if kp.dtype == torch.bool else kp
        if mask is None:
            mask = kp
        elif mask.dtype == torch.bool and kp.dtype == torch.bool:
            mask = mask & kp
        else:
            to_f = lambda m: m if m.dtype != torch.bool else torch.zeros_like(  # noqa: E731
                m, dtype=q.dtype).masked_fill(~m, float("-inf"))
            mask = to_f(mask) + to_f(kp)
    out, probs = _attend(a, q, k, v, mask, is_causal and attn_mask is None, 1.0 / math.sqrt(d))
    out = out.permute(2, 0, 1, 3).reshape(tq, b, e)  # (B, H, Tq, D) -> (Tq, B, E)
    out = _proj(qstate, out, out_proj_weight, out_proj_bias)
    if need_weights:
        return out, probs.mean(1) if average_attn_weights else probs
    return out, None


def _proj(qstate, x, w, b):
    """``F.linear(x, w, b)`` with ``w``'s quantizers when it is a quantized weight.

    Called inside :meth:`QuantMode.__torch_function__`, where the mode itself is off.
    """
    site = qstate.linear_site(w)
    return F.linear(site.act_in(x), site.weight(), b) if site is not None else F.linear(x, w, b)
