"""Per-site choices of repq / repquant judged at the model output on held-out rows.

A choice that wins at its layer's output (:mod:`~slimformer.quantize.select`) does not always
lower the model output error, so each one other than min/max is set back to min/max in turn and
kept only if the model output error on the held-out rows is lower by :data:`MARGIN`
(:func:`validate_sites` for activation ranges, :func:`validate_weights` for searched weight
ranges).

Each judgement is a forward of the held-out rows, but a choice changes nothing before the first
block that reads it: given the model's blocks, those forwards start there, the blocks before it
replayed from the outputs recorded under the choices in force (:mod:`~slimformer.quantize.replay`);
the errors, hence the decisions, are those of whole forwards, bit for bit.
"""

from __future__ import annotations

import torch

from slimformer.quantize.blockwise import containers
from slimformer.quantize.holdout import MARGIN, SiteChoice, decide
from slimformer.quantize.replay import Replay
from slimformer.quantize.repq import _bias_of
from slimformer.quantize.select import LABEL, _quantized
from slimformer.quantize.state import EmbeddingQuant, LinearQuant


def _replay(qmodel, blocks: bool) -> Replay:
    """The :class:`Replay` of ``qmodel``'s blocks (none: every forward whole)."""
    found = []
    if blocks:
        found = containers(qmodel.model, {lq.name.rpartition(".")[0]
                                          for lq in qmodel.quant.linears.values()})
    return Replay(qmodel.model, found)


def _judge(replay: Replay, error, starts: list) -> float:
    """``error(start)`` of the choices as set by a whole forward, replay checked; recorded."""
    current = error(None)
    if replay.check():
        replay.adopt()
        late = max((s for s in starts if s is not None), default=None)
        if late is not None and error(late) != current:  # e.g. state a block keeps across calls
            replay.ok = False
    replay.fresh = {}
    return current


@torch.no_grad()
def validate_sites(qmodel, held, output_error, record: list[SiteChoice],
                   progress=None, blocks: bool = True) -> list[str]:
    """Keep a site's RepQ or clipped range only where it lowers the model output error on ``held``.

    The per-site choice of :func:`~slimformer.quantize.select.select_sites` judges a site by its
    consumer Linears' output; a gain there does not always carry to the model output (measured, a
    post-norm model's embedding norm: -89% layer error, +160% model error; 4-bit MSE-searched
    clips: the same). So, before reparameterization, the model is run in quant mode on the
    held-out rows with every choice in place, RepQ emulated exactly (per-channel activation
    codes; consumer weights quantized as ``Q(W diag(r)) diag(1/r)`` with ``r = s / mean(s)``),
    and each site whose choice is not per-tensor min/max is set back to it in turn; the choice
    stays only if its model output error is lower by :data:`MARGIN`.

    Args:
        qmodel: The :class:`~slimformer.quantize.state.QuantizedModel` (ranges set, not yet
            reparameterized).
        held: The held-out calibration rows.
        output_error: ``output_error(qmodel, held) -> float`` with the quantizers as set.
        record: The choices of :func:`~slimformer.quantize.select.select_sites`; receives one
            :class:`~slimformer.quantize.holdout.SiteChoice` per site validated.
        progress: ``progress(step, done, total)``, once per site validated.
        blocks: Start each forward at the first block that reads the site (the same errors);
            False: whole forwards (and so when ``qmodel`` runs one block, not the model).

    Returns:
        Notes.
    """
    state = qmodel.quant
    users: dict[int, list] = {}
    for lq in state.linears.values():
        users.setdefault(id(lq.act), []).append(lq)
    acts = {a.name: a for a in state.acts.values()}
    places = {a.name: [lq.name.rpartition(".")[0] for lq in users.get(id(a), [])]
              for a in state.acts.values()}
    for a in state.attention.values():
        acts.update({q.name: q for q in (a.q_in, a.k_in, a.v_in)})
        places.update({q.name: [a.module] for q in (a.q_in, a.k_in, a.v_in)})
    simple = LABEL[("minmax", False)]
    sites = [(acts[c.site], c.kept) for c in record
             if c.what == "activation range" and c.kept != simple and c.site in acts]
    if not sites:
        return []
    for lq in state.linears.values():
        lq.wq.calibrate(lq.matrix().detach(), search=False)

    biases = {}  # the emulation adds RepQ's bias error; the model's own biases come back after
    for lq in state.linears.values():
        b = _bias_of(qmodel.model, lq)
        if b is not None:
            biases[lq.name] = (b, b.detach().clone())
    replay = _replay(qmodel, blocks)
    starts = [replay.start_of(places[act.name]) if places[act.name] else None
              for act, _ in sites]
    plain: dict = {}  # every quantized weight as no choice here changes it, computed once
    emulated: dict = {}  # id(act) -> (s, z, [(consumer, its weight, its bias change)])

    def error(start) -> float:
        state.set_mode("quant")
        if not plain:
            plain.update((m, m.weight()) for m in state.modules()
                         if isinstance(m, (LinearQuant, EmbeddingQuant)))
        for m, w in plain.items():
            m._cache = w
        for b, b0 in biases.values():
            b.copy_(b0)
        for act in state.acts.values():
            if not (act.per_channel and users.get(id(act))):
                continue
            s, z = (v.detach() for v in act.scale_zero())
            hit = emulated.get(id(act))
            if hit is None or not (torch.equal(hit[0], s) and torch.equal(hit[1], z)):
                hit = emulated[id(act)] = (s.clone(), z.clone(), _emulate(act, s, z,
                                                                          users[id(act)], biases))
            for lq, w_eff, delta in hit[2]:
                lq._cache = w_eff
                if delta is not None:
                    biases[lq.name][0].add_(delta)
        with replay.forward(start):
            return float(output_error(qmodel, held))

    try:
        return _drop_sites(sites, starts, error, replay, record, simple,
                           progress or (lambda *a: None))
    finally:
        for b, b0 in biases.values():
            b.copy_(b0)
        state.set_mode("observe")
        for lq in state.linears.values():
            lq._cache = None


def _emulate(act, s: torch.Tensor, z: torch.Tensor, consumers, biases) -> list:
    """RepQ of ``act`` (scales ``s``, zero points ``z`` ``(C,)``) on its consumers, emulated.

    Returns ``[(consumer, its weight as the model holds it, its bias change or None)]``.
    """
    r = s / s.mean()  # (C,)
    # zero points move to round(mean(z)): the float bias fix -W shift meets Q(W r) / r
    shift = torch.zeros_like(s) if act.symmetric else s * (z - z.mean().round())
    out = []
    for lq in consumers:
        w = lq.matrix().detach()
        w_eff = _quantized(w * r, lq.wq, search=False) / r
        out.append((lq, lq._unmatrix(w_eff), (w_eff - w) @ shift if lq.name in biases else None))
    return out


def _drop_sites(sites, starts, error, replay: Replay, record: list[SiteChoice], simple: str,
                tick) -> list[str]:
    """Set each site back to per-tensor min/max unless that raises ``error(start)``; notes."""
    tick("site choice at the model output", 0, len(sites))
    current = _judge(replay, error, starts)
    out, dropped = [], []
    for i, (act, kept) in enumerate(sites):
        chosen = (act.per_channel, act.lo.detach().clone(), act.hi.detach().clone())
        act.per_channel = False
        act.calibrate("minmax")
        without = error(starts[i])
        choice = decide(act.name, "at the model output", {simple: without, kept: current},
                        MARGIN)
        out.append(choice)
        if choice.kept == simple:
            current = without
            dropped.append(act.name)
            replay.adopt()
        else:
            act.per_channel = chosen[0]
            act.set_range(chosen[1], chosen[2])
        tick("site choice at the model output", i + 1, len(sites))
    record += out
    notes = [f"site choice: {c}" for c in out]
    if dropped:
        notes.append(f"per-tensor min/max restored at {len(dropped)} of {len(sites)} site(s): "
                     "their choice did not lower the model output error on held-out calibration "
                     "rows")
    return notes


@torch.no_grad()
def validate_weights(qmodel, held, output_error, record: list[SiteChoice],
                     progress=None, blocks: bool = True) -> list[str]:
    """Keep a layer's MSE-searched weight range only where it lowers the model output error.

    Run after :func:`~slimformer.quantize.select.calibrate_weights` (reparameterized, final
    ranges); each layer whose search won on its own output is set back to min/max in turn and
    keeps the search only if the model output error on the held-out rows is lower by
    :data:`MARGIN`.

    Args:
        qmodel: The :class:`~slimformer.quantize.state.QuantizedModel`.
        held: The held-out calibration rows.
        output_error: ``output_error(qmodel, held) -> float`` (every quantizer in quant mode).
        record: The choices of :func:`~slimformer.quantize.select.calibrate_weights`; receives
            one choice per layer validated.
        progress: ``progress(step, done, total)``, once per layer validated.
        blocks: As for :func:`validate_sites`.

    Returns:
        Notes.
    """
    by_name = {lq.name: lq for lq in qmodel.quant.linears.values()}
    layers = [by_name[c.site] for c in record
              if c.what == "weight range" and c.kept == "MSE search" and c.site in by_name]
    if not layers:
        return []
    replay = _replay(qmodel, blocks)
    starts = [replay.start_of([lq.name.rpartition(".")[0]]) for lq in layers]

    def error(start) -> float:
        with replay.forward(start):
            return float(output_error(qmodel, held))

    tick = progress or (lambda *a: None)
    tick("weight range at the model output", 0, len(layers))
    current = _judge(replay, error, starts)
    out = []
    for i, lq in enumerate(layers):
        searched = (lq.wq.scale.clone(), lq.wq.zero.clone())
        lq.wq.calibrate(lq.matrix().detach(), search=False)
        without = error(starts[i])
        choice = decide(lq.name, "weight range at the model output",
                        {"min/max": without, "MSE search": current}, MARGIN)
        out.append(choice)
        if choice.kept == "min/max":
            current = without
            replay.adopt()
        else:
            lq.wq.scale, lq.wq.zero = searched
        tick("weight range at the model output", i + 1, len(layers))
    record += out
    back = sum(c.kept == "min/max" for c in out)
    notes = [f"site choice: {c}" for c in out]
    if back:
        notes.append(f"min/max weight range restored at {back} of {len(out)} layer(s): the "
                     "searched range did not lower the model output error on held-out rows")
    return notes
