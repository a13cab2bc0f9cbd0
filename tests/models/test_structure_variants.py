"""Structure discovery on transformer variants, each a tiny model built here for one mechanism.

Offset-gain norms (``x_hat * (1 + w)``), an MLP with a depthwise conv between its Linears
(Mix-FFN), Linears across the heads axis of the scores (talking heads), a query from one token
(class attention), keys/values from a strided-conv copy of the input (spatial reduction), chunked
sliding-window scores laid out ``(B * heads, chunks, w, w)``, and Fourier token mixing (no
attention at all).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimformer.models.structure import discover

D, H = 16, 4  # width, heads (head_dim 4)


class OffsetRMSNorm(nn.Module):
    """RMS norm whose gain is stored as ``1 + w`` (w starts at zero)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.w)


class OffsetLayerNorm(nn.Module):
    """Layer norm with gain ``1 + g`` and a shift; parameters registered shift first."""

    def __init__(self, d):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(d) * 0.1)
        self.g = nn.Parameter(torch.zeros(d))  # zero: the identity gain, as at initialization

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], 1 + self.g, self.shift, 1e-6)


class Mlp(nn.Module):
    def __init__(self, d=D, h=2 * D):
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class MixFfn(nn.Module):
    """up -> depthwise 3x3 conv over the token grid -> GELU -> down."""

    def __init__(self, d=D, h=2 * D, side=4):
        super().__init__()
        self.side = side
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)
        self.filt = nn.Conv2d(h, h, 3, padding=1, groups=h)

    def forward(self, x):
        b = x.shape[0]
        y = self.up(x).transpose(1, 2).reshape(b, -1, self.side, self.side)  # (B, h, S, S)
        return self.down(F.gelu(self.filt(y).flatten(2).transpose(1, 2)))


class DenseConvFfn(MixFfn):
    """As :class:`MixFfn` but the conv mixes channels: no per-unit MLP."""

    def __init__(self):
        super().__init__()
        self.filt = nn.Conv2d(2 * D, 2 * D, 3, padding=1)


class Attn(nn.Module):
    """Fused-qkv attention; ``talking`` adds Linears across heads before and after the softmax."""

    def __init__(self, talking=False):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.pre = nn.Linear(H, H) if talking else None
        self.post = nn.Linear(H, H) if talking else None

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, H, c // H).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) * (c // H) ** -0.5  # (B, H, T, T)
        if self.pre is not None:
            s = self.pre(s.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        p = s.softmax(-1)
        if self.post is not None:
            p = self.post(p.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((p @ v).transpose(1, 2).reshape(b, t, c))


class ClassAttn(nn.Module):
    """The query is the first token only; keys and values are all tokens."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        b, t, c = x.shape
        q = self.q(x[:, 0]).reshape(b, 1, H, -1).transpose(1, 2)
        k = self.k(x).reshape(b, t, H, -1).transpose(1, 2)
        v = self.v(x).reshape(b, t, H, -1).transpose(1, 2)
        p = (q @ k.transpose(-2, -1)).softmax(-1)
        cls = self.proj((p @ v).transpose(1, 2).reshape(b, 1, c))
        return torch.cat([cls, torch.zeros_like(x[:, 1:])], 1)


class SpatialReductionAttn(nn.Module):
    """Keys and values from a stride-2 conv copy of the token grid, normed."""

    def __init__(self, side=4):
        super().__init__()
        self.side = side
        self.q, self.kv, self.proj = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)
        self.reduce = nn.Conv2d(D, D, 2, stride=2)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        b, t, c = x.shape
        q = self.q(x).reshape(b, t, H, -1).transpose(1, 2)
        grid = x.transpose(1, 2).reshape(b, c, self.side, self.side)
        r = self.norm(self.reduce(grid).flatten(2).transpose(1, 2))  # (B, T/4, C)
        k, v = self.kv(r).reshape(b, -1, 2, H, c // H).permute(2, 0, 3, 1, 4)
        p = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((p @ v).transpose(1, 2).reshape(b, t, c))


class ChunkedAttn(nn.Module):
    """Attention within windows of ``w`` tokens, scores laid out (B * heads, chunks, w, w)."""

    def __init__(self, w=2):
        super().__init__()
        self.w = w
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, t, c = x.shape

        def chunks(z):  # (B, T, C) -> (B * H, T / w, w, head_dim)
            return z.reshape(b, t, H, -1).transpose(1, 2).reshape(b * H, t // self.w, self.w, -1)

        q, k, v = (chunks(z) for z in self.qkv(x).chunk(3, -1))
        p = torch.einsum("bcxd,bcyd->bcxy", q, k).softmax(-1)
        o = torch.einsum("bcxy,bcyd->bcxd", p, v).reshape(b, H, t, -1).transpose(1, 2)
        return self.proj(o.reshape(b, t, c))


class CrossAttn(nn.Module):
    """True cross-attention: keys and values from a second input sequence."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(D, D) for _ in range(4))
        self.norm = nn.LayerNorm(D)

    def forward(self, x, memory):
        b, t, c = x.shape
        q = self.q(x).reshape(b, t, H, -1).transpose(1, 2)
        m = self.norm(memory)
        k = self.k(m).reshape(b, -1, H, c // H).transpose(1, 2)
        v = self.v(m).reshape(b, -1, H, c // H).transpose(1, 2)
        p = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((p @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, attn=None, mlp=None, norm=nn.LayerNorm):
        super().__init__()
        self.n1, self.n2 = norm(D), norm(D)
        self.attn, self.mlp = attn or Attn(), mlp or Mlp()

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class Stack(nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def _discover(model, t=16, require_attention=True):
    torch.manual_seed(0)
    return discover(model, {"x": torch.randn(2, t, D)}, require_attention=require_attention)


def test_offset_gain_norms_are_found_with_their_parameters():
    s = _discover(Stack(Block(norm=OffsetRMSNorm), Block(norm=OffsetLayerNorm)))
    by = {n.module: n for n in s.norms}
    assert s.norm_linear_pairs == 4 and all(n.foldable for n in s.norms)
    assert by["blocks.0.n1"].linears == ("blocks.0.attn.qkv.weight",)
    assert by["blocks.1.n2"].linears == ("blocks.1.mlp.up.weight",)
    rms, ln = by["blocks.0.n1"], by["blocks.1.n1"]
    assert (rms.kind, rms.weight, rms.bias, rms.gain_offset) == (
        "rmsnorm", "blocks.0.n1.w", "", 1.0)
    # found by behaviour: the gain is `g` (zeros) although `shift` is registered first
    assert (ln.kind, ln.weight, ln.bias, ln.gain_offset) == (
        "layernorm", "blocks.1.n1.g", "blocks.1.n1.shift", 1.0)
    plain = _discover(Stack(Block())).norms[0]
    assert (plain.weight, plain.bias, plain.gain_offset) == ("blocks.0.n1.weight",
                                                             "blocks.0.n1.bias", 0.0)


def test_mlp_with_depthwise_conv_between_its_linears():
    s = _discover(Stack(Block(mlp=MixFfn()), Block()))
    assert len(s.mlps) == 2
    m = s.mlps[0]
    assert (m.fc1, m.fc2, m.hidden) == (("blocks.0.mlp.up.weight",), "blocks.0.mlp.down.weight",
                                        32)
    assert m.channelwise == ("blocks.0.mlp.filt.weight",) and s.mlps[1].channelwise == ()
    # a conv that mixes the hidden channels is no per-unit MLP
    dense = _discover(Stack(Block(mlp=DenseConvFfn())))
    assert dense.mlps == []


def test_talking_heads_attention_is_found_with_its_mixers():
    s = _discover(Stack(Block(attn=Attn(talking=True)), Block(attn=Attn(talking=True)), Block()))
    assert len(s.attention) == 3
    assert [a.q for a in s.attention] == [(f"blocks.{i}.attn.qkv.weight",) for i in range(3)]
    assert s.attention[0].mixers == ("blocks.0.attn.pre.weight", "blocks.0.attn.post.weight")
    assert s.attention[2].mixers == ()
    assert {(a.heads, a.head_dim) for a in s.attention} == {(H, D // H)}
    assert [a.out for a in s.attention] == [(f"blocks.{i}.attn.proj.weight",) for i in range(3)]
    assert len(s.mlps) == 3  # the mixers are not taken for MLPs


@pytest.mark.parametrize("attn", [ClassAttn, SpatialReductionAttn])
def test_class_and_spatial_reduction_attention_are_self_attention(attn):
    s = _discover(Stack(Block(attn=attn())))
    (a,) = s.attention
    assert not a.cross and (a.heads, a.head_dim) == (H, D // H)


def test_cross_attention_on_a_second_input_is_cross():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.attn = nn.LayerNorm(D), CrossAttn()

        def forward(self, x, memory):
            return x + self.attn(self.n1(x), memory)

    s = discover(Decoder(), {"x": torch.randn(2, 5, D), "memory": torch.randn(2, 7, D)})
    (a,) = s.attention
    assert a.cross


def test_chunked_sliding_window_heads_from_the_projection_not_the_chunk_axis():
    s = _discover(Stack(Block(attn=ChunkedAttn(w=2))), t=24)  # 12 chunks of 2 tokens, 4 heads
    (a,) = s.attention
    assert (a.heads, a.head_dim, a.fused_qkv) == (H, D // H, True)


class FourierBlock(nn.Module):
    """FNet-style block: tokens mixed by a 2-D FFT (no attention), then an MLP."""

    def __init__(self):
        super().__init__()
        self.n1, self.n2, self.mlp = nn.LayerNorm(D), nn.LayerNorm(D), Mlp()

    def forward(self, x):
        x = self.n1(x + torch.fft.fft2(x).real)
        return self.n2(x + self.mlp(x))


def fourier_net(classes: int = 3) -> nn.Module:
    """Factory (also for the CLI tests): two Fourier blocks and a classifier of the mean token."""

    class FourierNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = Stack(FourierBlock(), FourierBlock()), nn.Linear(D, classes)

        def forward(self, x):
            return self.head(self.body(x).mean(1))

    torch.manual_seed(0)
    return FourierNet().eval()


def test_fourier_mixing_model_has_mlps_and_no_attention():
    s = _discover(fourier_net(), require_attention=False)
    assert s.attention == [] and len(s.mlps) == 2
    assert [n.linears for n in s.norms] == [("body.blocks.0.mlp.up.weight",),
                                           ("body.blocks.1.mlp.up.weight",)]
