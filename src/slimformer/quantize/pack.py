"""Integer weight codes packed at their bit-width: ``ceil(n * bits / 8)`` bytes for ``n`` codes.

Codes are unsigned (``[0, 2^bits - 1]``). 8-bit codes are the bytes themselves; 4-bit codes go
two to a byte (the first code in the low nibble); any other width is bit-packed
least-significant bit first (code ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the
little-endian bit stream).
"""

from __future__ import annotations

import numpy as np
import torch

from slimformer.errors import ModelLoadError


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` writes for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, values in ``[0, 2^bits - 1]``) into a flat uint8 tensor.

    Args:
        codes: Integer codes, any integer or integral float dtype.
        bits: Bit-width, 1 to 8.

    Returns:
        ``(packed_bytes(codes.numel(), bits),)`` uint8.

    Raises:
        ValueError: ``bits`` outside 1..8 or a code outside ``[0, 2^bits - 1]``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1 to 8, got {bits}")
    flat = codes.detach().reshape(-1).cpu()
    if flat.numel() and (flat.min() < 0 or flat.max() > 2**bits - 1):
        raise ValueError(f"codes outside [0, {2**bits - 1}] cannot be packed at {bits} bits")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if bits == 4:
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        pairs = flat.reshape(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)
    bitplanes = np.unpackbits(flat.numpy().reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(bitplanes.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...],
                 where: str = "packed codes") -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the uint8 codes of ``shape``.

    Args:
        packed: ``(packed_bytes(prod(shape), bits),)`` uint8.
        bits: Bit-width the codes were packed at, 1 to 8.
        shape: Shape of the codes.
        where: Names the tensor in errors.

    Raises:
        ModelLoadError: ``packed`` is not uint8, not 1-D or not the size the shape needs.
    """
    numel = int(np.prod(shape)) if len(shape) else 1
    want = packed_bytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != want:
        raise ModelLoadError(f"{where}: {str(packed.dtype).removeprefix('torch.')} "
                             f"{list(packed.shape)}, uint8 [{want}] expected for {numel} "
                             f"{bits}-bit codes")
    flat = packed.cpu()
    if bits == 8:
        out = flat.clone()
    elif bits == 4:
        out = torch.stack([flat & 0x0F, flat >> 4], dim=1).reshape(-1)[:numel]
    else:
        stream = np.unpackbits(flat.numpy(), count=numel * bits, bitorder="little")
        planes = np.zeros((numel, 8), dtype=np.uint8)
        planes[:, :bits] = stream.reshape(numel, bits)
        out = torch.from_numpy(np.packbits(planes, axis=1, bitorder="little").reshape(-1))
    return out.reshape(shape)
