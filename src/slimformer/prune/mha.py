"""``nn.MultiheadAttention`` with fewer heads than its embedding width allows.

``F.multi_head_attention_forward`` derives the head size from ``embed_dim // num_heads``, so a
sliced module (``num_heads * head_dim < embed_dim``) needs its own forward; this one keeps the
parameters and state-dict keys of ``nn.MultiheadAttention`` and computes attention explicitly.
"""

from __future__ import annotations

import torch
from torch import nn

from slimformer.errors import UnsupportedModelError


class SlicedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projections carry ``num_heads * head_dim != embed_dim``.

    Same parameters and state-dict keys; the forward computes attention explicitly
    (``scaled_dot_product_attention``), so any head count works and the parts stay visible.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        """Inputs as ``nn.MultiheadAttention``; returns ``(out, weights or None)``."""
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        b, tq, _ = query.shape
        tk = key.shape[1]
        h, d = self.num_heads, self.head_dim
        if self.in_proj_weight is not None and query is key is value:
            q, k, v = nn.functional.linear(query, self.in_proj_weight,
                                           self.in_proj_bias).chunk(3, dim=-1)
        else:
            ws = (self.in_proj_weight.chunk(3) if self.in_proj_weight is not None
                  else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
            bs = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = (nn.functional.linear(x, w, bb)
                       for x, w, bb in zip((query, key, value), ws, bs, strict=True))
        if self.bias_k is not None or self.add_zero_attn:
            raise UnsupportedModelError("sliced nn.MultiheadAttention does not support bias_k/"
                                        "bias_v or add_zero_attn")
        q = q.reshape(b, tq, h, d).transpose(1, 2)  # (B, H, Tq, d)
        k = k.reshape(b, tk, h, d).transpose(1, 2)  # (B, H, Tk, d)
        v = v.reshape(b, tk, h, d).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(
                attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask, -torch.inf)
            mask = mask.reshape(b, h, tq, tk) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            kp = key_padding_mask if key_padding_mask.dtype != torch.bool else torch.zeros(
                key_padding_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                key_padding_mask, -torch.inf)
            kp = kp.reshape(b, 1, 1, tk)
            mask = kp if mask is None else mask + kp
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * d**-0.5  # (B, H, Tq, Tk)
            if is_causal and mask is None:
                mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril().logical_not()
                mask = torch.zeros(tq, tk, dtype=q.dtype).masked_fill(mask, -torch.inf)
            probs = (scores if mask is None else scores + mask).softmax(-1)
            weights = probs.mean(1) if average_attn_weights else probs
            probs = nn.functional.dropout(probs, self.dropout, self.training)
            out = probs @ v
        else:
            out = nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=bool(is_causal and mask is None))
        out = self.out_proj(out.transpose(1, 2).reshape(b, tq, h * d))  # (B, Tq, E)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
