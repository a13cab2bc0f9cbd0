"""Online rotation of Linear inputs before their activation quantizer (QuaRot's online Hadamard).

Ashkboos et al., "QuaRot" (2024) rotate each Linear's input at run time: ``y = (x R)(W R)^T``
equals ``x W^T`` for an orthogonal ``R``, and ``x R`` spreads the few channels of a trained
model's input that dwarf the rest (a [CLS] token's massive activations, post-GELU spikes) over
all channels, so one per-tensor or per-token grid loses less to them. Unlike the residual
rotation (:mod:`~slimformer.quantize.rotate`), it needs no particular norm: any activation
quantizer feeding plain Linears can take it (post-norm BERT-family encoders included).

``R = diag(s) (A kron B)`` (:mod:`~slimformer.quantize.hadamard`): random signs, then two
orthogonal factors of about ``sqrt(C)`` each, Walsh-Hadamard on the power-of-two part of their
sizes. ``x R`` costs ``C (a + b)`` multiply-adds per row (``1,536 x 80`` for a BERT MLP
down-projection, 21% of its own matmul) where a dense ``R`` costs ``C^2``; a single spike
``e_i R`` has every entry of size about ``1 / sqrt(C)``. The factors are buffers of the
:class:`~slimformer.quantize.act.ActQuantizer` (``rot_signs, rot_a, rot_b``), applied before
everything else it does; the consumers' weights become ``W R`` in place (rows rotated by the
same map), so the float model is unchanged up to rounding and every later calibration step,
the integer codes and the exports see the rotated Linear as an ordinary one.
"""

from __future__ import annotations

import torch

from slimformer.quantize.hadamard import factors
from slimformer.quantize.state import shared_params


def rotate_inputs(qmodel, structure, seed: int) -> list[str]:
    """Give every eligible activation quantizer of ``qmodel`` a rotation, its consumers ``W R``.

    Eligible: a per-tensor quantizer (no RepQ per-channel ranges) whose every
    consumer is a plain 2-D Linear found in ``structure`` (no convolution, batched experts or
    packed attention) with a weight of its own (not tied to another op). Call it on a freshly
    built model, before anything is observed. Returns the notes (how many sites, which not).
    """
    from slimformer.quantize.act import ActQuantizer

    state, model = qmodel.quant, qmodel.model
    plain = {r.weight for r in structure.linears} - {f"{c}.weight" for c in structure.convs}
    shared = shared_params(model)
    users: dict[int, list] = {}
    for lq in state.linears.values():
        users.setdefault(id(lq.act), []).append(lq)
    done, skipped = [], []
    for i, act in enumerate(m for m in state.acts.values() if isinstance(m, ActQuantizer)):
        lqs = users.get(id(act), [])
        why = ("per-channel ranges" if act.per_channel else
               "no Linear reads it" if not lqs else None)
        why = why or next((f"{lq.name} is not a plain Linear weight" for lq in lqs
                           if lq.name not in plain or lq.axis is not None
                           or lq.param[0].dim() != 2), None)
        why = why or next((f"{lq.name} is shared with another op" for lq in lqs
                           if id(lq.param[0]) in shared), None)
        if why:
            skipped.append(f"{act.name} ({why})")
            continue
        width = lqs[0].full_matrix().shape[1]
        signs, a, b = factors(width, seed * 1000 + 7 * i)
        act.rot_signs, act.rot_a, act.rot_b = signs, a, b
        with torch.no_grad():
            for lq in lqs:
                w = lq.param[0]
                w.copy_(act.rotate(w.t()).t() if lq.transposed else act.rotate(w))
                lq._cache = None
        done.append(act)
    notes = [f"rotate_inputs: {len(done)} Linear input quantizer(s) rotate their input online "
             f"(x R, Kronecker Hadamard / orthogonal factors; weights W R)"]
    if skipped:
        notes.append(f"rotate_inputs: {len(skipped)} left unrotated: " + "; ".join(skipped[:4]) +
                     (" ..." if len(skipped) > 4 else ""))
    return notes
