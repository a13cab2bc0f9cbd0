"""Kronecker-factored orthogonal rotations ``R = diag(s) (A kron B)`` and ``x R`` (math only).

Used by the online input rotation (:mod:`~slimformer.quantize.inrotate`): ``A (a, a)`` and
``B (b, b)`` with ``a * b = C`` as close to ``sqrt(C)`` as the divisors of ``C`` allow, each a
normalized Walsh-Hadamard matrix of its size's power-of-two part Kronecker a seeded random
orthogonal one of its odd part; ``s (C,)`` random signs. ``x R`` costs ``C (a + b)`` multiply-adds per row.
"""

from __future__ import annotations

import math

import torch

from slimformer.quantize.rotate import orthogonal


def factors(width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``signs (C,), A (a, a), B (b, b)`` (float32) of the rotation of ``width = C = a * b``."""
    a = max(i for i in range(1, math.isqrt(width) + 1) if width % i == 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (width,), generator=g).float() * 2 - 1
    return signs, _part(a, seed + 1), _part(width // a, seed + 2)


def _part(n: int, seed: int) -> torch.Tensor:
    """``H_k kron Q_m`` for ``n = k m``, ``k`` a power of two and ``m`` odd.

    ``H_k`` normalized Walsh-Hadamard (all entries ``1 / sqrt(k)``), ``Q_m`` seeded random
    orthogonal (none for ``m = 1``): the largest entry is ``max |Q_m| / sqrt(k)``.
    """
    k = n & -n
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(k)
    if n > k:
        h = torch.kron(h, orthogonal(n // k, seed).contiguous())
    return h.float().contiguous()


def apply(x: torch.Tensor, signs: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x R`` for ``x (..., C)``: ``(x * s)`` viewed ``(..., a, b)``, then ``A^T X B``."""
    dt = x.dtype
    y = (x * signs.to(dt)).reshape(*x.shape[:-1], a.shape[0], b.shape[0])
    y = torch.matmul(torch.matmul(a.to(dt).t(), y), b.to(dt))
    return y.reshape(x.shape)
