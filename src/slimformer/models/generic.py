"""Factories of plain PyTorch transformers for ``package.module:factory`` specs and tests."""

from __future__ import annotations

import torch
from torch import nn


class EncoderClassifier(nn.Module):
    """``torch.nn.TransformerEncoder`` over float token features, mean-pooled, then a Linear.

    ``forward(src (B, T, d_model)) -> logits (B, num_classes)``.
    """

    def __init__(self, d_model: int = 64, nhead: int = 4, layers: int = 2, ffn: int = 128,
                 num_classes: int = 10, norm_first: bool = True):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead, ffn, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        """``src (B, T, d_model) -> logits (B, num_classes)``."""
        return self.head(self.encoder(src).mean(1))


def torch_encoder(**kwargs) -> EncoderClassifier:
    """Build an :class:`EncoderClassifier` (keyword arguments as its constructor)."""
    return EncoderClassifier(**kwargs)


class _Attend(nn.Module):
    """Multi-head self-attention with separate projections: ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ask, self.offer, self.carry = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.merge = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, d) -> (B, T, d)``."""
        b, t, d = x.shape
        h = self.heads

        def split(y):
            return y.view(b, t, h, d // h).transpose(1, 2)  # (B, h, T, d/h)

        q, k, v = split(self.ask(x)), split(self.offer(x)), split(self.carry(x))
        p = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1)  # (B, h, T, T)
        return self.merge((p @ v).transpose(1, 2).reshape(b, t, d))


class _Feed(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.widen, self.spark, self.narrow = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, d) -> (B, T, d)``."""
        return self.narrow(self.spark(self.widen(x)))


class _Stage(nn.Module):
    """Pre-norm block: ``x + attend(tidy(x))``, ``x + feed(polish(x))``."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.tidy, self.polish = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attend, self.feed = _Attend(d, heads), _Feed(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, d) -> (B, T, d)``."""
        x = x + self.attend(self.tidy(x))
        return x + self.feed(self.polish(x))


class TileMixer(nn.Module):
    """Windowed attention on a token grid, with ``F.pad`` and window partition/merge reshapes.

    Each block normalizes the grid ``(B, H, W, d)``, pads it to a multiple of the window (a
    zero-size pad when the grid fits), shifts it with ``torch.roll`` in odd blocks, partitions it
    into windows, attends within each window, merges and crops back.
    ``forward(grid (B, H, W, c_in)) -> scores (B, num_classes)``.
    """

    def __init__(self, c_in: int = 8, d: int = 32, heads: int = 2, window: int = 4,
                 blocks: int = 2, num_classes: int = 5):
        super().__init__()
        self.window = window
        self.lift = nn.Linear(c_in, d)
        self.groom = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.sift = nn.ModuleList(_Attend(d, heads) for _ in range(blocks))
        self.sheen = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.churn = nn.ModuleList(_Feed(d, 2 * d) for _ in range(blocks))
        self.verdict = nn.Linear(d, num_classes)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """``grid (B, H, W, c_in) -> (B, num_classes)``."""
        x = self.lift(grid)  # (B, H, W, d)
        b, h, w, d = x.shape
        win = self.window
        for i, (norm, attn, norm2, mlp) in enumerate(zip(self.groom, self.sift, self.sheen,
                                                          self.churn, strict=True)):
            y = norm(x)
            ph, pw = (-h) % win, (-w) % win
            y = torch.nn.functional.pad(y, (0, 0, 0, pw, 0, ph))  # zero-size when it fits
            if i % 2:
                y = torch.roll(y, shifts=(win // 2, win // 2), dims=(1, 2))
            hp, wp = h + ph, w + pw
            y = y.view(b, hp // win, win, wp // win, win, d).permute(0, 1, 3, 2, 4, 5)
            y = attn(y.contiguous().view(-1, win * win, d))  # (B * windows, win^2, d)
            y = y.view(b, hp // win, wp // win, win, win, d).permute(0, 1, 3, 2, 4, 5)
            y = y.reshape(b, hp, wp, d)
            if i % 2:
                y = torch.roll(y, shifts=(-(win // 2), -(win // 2)), dims=(1, 2))
            x = x + y[:, :h, :w, :].contiguous()
            x = x + mlp(norm2(x))
        return self.verdict(x.mean((1, 2)))


def tile_mixer(**kwargs) -> TileMixer:
    """Build a :class:`TileMixer` (keyword arguments as its constructor)."""
    return TileMixer(**kwargs)


class StemFormer(nn.Module):
    """Conv + BatchNorm stem (no conv bias), then pre-norm attention blocks on the feature map.

    ``forward(image (B, c, S, S)) -> scores (B, num_classes)``.
    """

    def __init__(self, channels: int = 3, d: int = 32, heads: int = 2, blocks: int = 2,
                 num_classes: int = 5):
        super().__init__()
        self.sprout = nn.Sequential(
            nn.Conv2d(channels, d // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(d // 2), nn.GELU(),
            nn.Conv2d(d // 2, d, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(d))
        self.trunk = nn.ModuleList(_Stage(d, heads, 2 * d) for _ in range(blocks))
        self.settle = nn.LayerNorm(d)
        self.judge = nn.Linear(d, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image (B, c, S, S) -> (B, num_classes)``."""
        x = self.sprout(image).flatten(2).transpose(1, 2)  # (B, S*S/16, d)
        for blk in self.trunk:
            x = blk(x)
        return self.judge(self.settle(x).mean(1))


def stem_former(**kwargs) -> StemFormer:
    """Build a :class:`StemFormer` (keyword arguments as its constructor)."""
    return StemFormer(**kwargs)


class LoopedCore(nn.Module):
    """One block applied ``depth`` times (weights shared across depth), as in ALBERT.

    ``forward(tokens (B, T, d)) -> (B, T, d)``.
    """

    def __init__(self, d: int = 32, heads: int = 2, depth: int = 3):
        super().__init__()
        self.depth = depth
        self.cell = _Stage(d, heads, 2 * d)
        self.coda = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, T, d) -> (B, T, d)``."""
        for _ in range(self.depth):
            tokens = self.cell(tokens)
        return self.coda(tokens)


def looped_core(**kwargs) -> LoopedCore:
    """Build a :class:`LoopedCore` (keyword arguments as its constructor)."""
    return LoopedCore(**kwargs)


class TwinTowers(nn.Module):
    """Two towers with their own input Linears and one shared block; two outputs.

    ``forward(left (B, T, a), right (B, T, b)) -> (left (B, d), right (B, d))``.
    """

    def __init__(self, a: int = 12, b: int = 20, d: int = 32, heads: int = 2):
        super().__init__()
        self.port, self.starboard = nn.Linear(a, d), nn.Linear(b, d)
        self.keel = _Stage(d, heads, 2 * d)
        self.mast = nn.LayerNorm(d)

    def forward(self, left: torch.Tensor, right: torch.Tensor):
        """Both towers through the shared block; mean-pooled, normalized features."""
        return (self.mast(self.keel(self.port(left))).mean(1),
                self.mast(self.keel(self.starboard(right))).mean(1))


def twin_towers(**kwargs) -> TwinTowers:
    """Build a :class:`TwinTowers` (keyword arguments as its constructor)."""
    return TwinTowers(**kwargs)


class _Braid(nn.Module):
    """Self-attention with one fused q/k/v Linear; the head width is read from the input.

    ``x (B, T, d) -> (B, T, d)``. Because ``forward`` splits heads by ``x.shape[-1] // heads``
    (as many hand-written models do), its heads cannot be sliced; its MLP units can.
    """

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.loom = nn.Linear(d, 3 * d)
        self.knot = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, d) -> (B, T, d)``."""
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.loom(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (B, h, T, d/h)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.knot(y.transpose(1, 2).reshape(b, t, d))


class BraidNet(nn.Module):
    """Pre-RMSNorm blocks with fused q/k/v attention and a SiLU MLP; two named outputs.

    ``forward(strands (B, T, c_in)) -> {"verdict": (B, num_classes), "trail": (B, T, d)}``.
    """

    def __init__(self, c_in: int = 10, d: int = 32, heads: int = 4, blocks: int = 2,
                 hidden: int = 64, num_classes: int = 6):
        super().__init__()
        self.intake = nn.Linear(c_in, d)
        self.calm = nn.ModuleList(nn.RMSNorm(d) for _ in range(blocks))
        self.weave = nn.ModuleList(_Braid(d, heads) for _ in range(blocks))
        self.hush = nn.ModuleList(nn.RMSNorm(d) for _ in range(blocks))
        self.bloom = nn.ModuleList(nn.Linear(d, hidden) for _ in range(blocks))
        self.wilt = nn.ModuleList(nn.Linear(hidden, d) for _ in range(blocks))
        self.outro = nn.Linear(d, num_classes)

    def forward(self, strands: torch.Tensor) -> dict[str, torch.Tensor]:
        """``strands (B, T, c_in) -> {"verdict": (B, num_classes), "trail": (B, T, d)}``."""
        x = self.intake(strands)
        for calm, weave, hush, bloom, wilt in zip(self.calm, self.weave, self.hush, self.bloom,
                                                  self.wilt, strict=True):
            x = x + weave(calm(x))
            x = x + wilt(torch.nn.functional.silu(bloom(hush(x))))
        return {"verdict": self.outro(x.mean(1)), "trail": x}


def braid_net(**kwargs) -> BraidNet:
    """Build a :class:`BraidNet` (keyword arguments as its constructor)."""
    return BraidNet(**kwargs)
