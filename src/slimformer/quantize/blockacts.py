"""Activation calibration one block at a time (minmax, percentile, repq): memory bounded by a block.

The blocks and their inputs are those of :class:`~slimformer.quantize.blockwise.Blockwise` (found
from the module tree, fed by a stopping pre-hook). For each block in order, on the calibration
rows (and repq's held-out rows):

1. its quantizers (the Linears inside it whose input quantizer serves only this block, their
   input quantizers, its attention sites) observe one float run of the block on its inputs;
2. the method's phases run on that block alone (:class:`Calibration` on a view of its quantizers;
   per-site choices are validated by the block's output error on the held-out rows);
3. its quantizers are checked (:func:`~slimformer.quantize.check.remember_sites`), their
   observations freed, and the block's *quantized* outputs become the next block's inputs, so
   later blocks are calibrated on (and choose against) earlier blocks' error.

Quantizers outside every block (a head, a patch embedding) are calibrated last the same way on
whole-model forwards with every block quantized. Only one block's inputs and outputs are held.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.blockwise import Blockwise, _first
from slimformer.quantize.capture import batches as _batches
from slimformer.quantize.capture import real_positions
from slimformer.quantize.check import remember_sites
from slimformer.quantize.spill import Spill, budget_of
from slimformer.quantize.state import QuantState


class BlockRunner:
    """Runs one block for the phases (``Calibration.runner``).

    Its data: a list of ``(args, kwargs, mask)`` per batch, ``mask`` the batch's ``(B, T)``
    attention mask (padded positions left out of every error) or None.
    """

    def __init__(self, module, mode, state: QuantState):
        self.module, self.mode, self.state = module, mode, state

    def batches(self, data):
        """Input dicts of the view's ``__call__``."""
        return ({"args": a, "kwargs": k, "mask": m} for a, k, m in data)

    def __call__(self, args, kwargs, mask=None) -> torch.Tensor:
        """The block's hidden-state output ``(B, T, C)``, quantizers as set."""
        with self.mode:
            return _first(self.module(*args, **kwargs))

    @torch.no_grad()
    def float_outputs(self, data) -> list[torch.Tensor]:
        """The block's float outputs per batch, real positions only ``(n, C)``."""
        self.state.set_mode("float")
        return [_real(self(a, k), m) for a, k, m in data]

    @torch.no_grad()
    def output_error(self, data, refs: list, as_set: bool = False) -> float:
        """Mean over batches of ``||out - ref||^2 / ||ref||^2`` (quant mode unless ``as_set``)."""
        if not as_set:
            self.state.set_mode("quant")
        total = 0.0
        for (a, k, m), ref in zip(data, refs, strict=True):
            got = _real(self(a, k), m).float()
            total += float(((got - ref.float()) ** 2).sum() / (ref.float() ** 2).sum().clamp_min(
                1e-30))
        return total / max(len(refs), 1)


class _View:
    """What the phases read as ``run.qmodel``: one part's quantizers, the whole model's params."""

    def __init__(self, qmodel, state: QuantState, call):
        self.quant, self.model, self.config = state, qmodel.model, qmodel.config
        self._mode, self._call = qmodel._mode, call

    def __call__(self, **inputs):
        return self._call(**inputs)


def calibrate_blocks(run, phases) -> bool:
    """Calibrate ``run`` (a :class:`~.phases.Calibration`) block by block with ``phases``.

    Returns False (nothing done) when the model has no blocks: the caller then calibrates the
    whole model at once.
    """
    cfg, qmodel = run.config, run.qmodel
    n = min(cfg.calib_samples, len(run.data))
    size = min(cfg.calib_batch_size, max(1, -(-n // 2)))  # >= 2 batches: cross-validated choices
    bw = Blockwise(run, _batches(run.data, size, n))
    containers = bw.containers()
    if not containers:
        return False
    held = bw.no_cache(run.batches(run.held)) if run.held is not None else None
    with Spill(budget_of(qmodel.model, cfg.max_memory), "block-wise calibration") as spill:
        bw.spill = spill
        _blocks(run, phases, bw, containers, held)
        if spill.note():
            run.notes.append(spill.note())
    return True


def _blocks(run, phases, bw: Blockwise, containers: list[list[str]], held) -> None:
    """Every block of ``containers`` in order, then the quantizers outside them."""
    qmodel = run.qmodel
    state = qmodel.quant
    state.set_mode("float")  # every part float until calibrated; embeddings need no data
    for e in state.embeddings.values():
        e.mode, e._cache = "quant", None
    users: dict[int, list[str]] = {}
    for lq in state.linears.values():
        users.setdefault(id(lq.act), []).append(lq.name.rpartition(".")[0])
    inside = [b for c in containers for b in c]
    total, t0, done, parts = len(inside) + 1, time.perf_counter(), [], []
    early = EarlyCheck(run.config)
    run.tick("calibrate", 0, total)
    with torch.no_grad():
        for blocks in containers:
            chained = bw.chains(blocks)
            if chained:
                cur = [_entry(bw.capture(blocks[0], b), b) for b in bw.batches]
                cur_held = None if held is None else [_entry(bw.capture(blocks[0], b), b)
                                                      for b in held]
            for block in blocks:
                if not chained:
                    cur = [_entry(bw.capture(block, b), b) for b in bw.batches]
                    cur_held = None if held is None else [_entry(bw.capture(block, b), b)
                                                          for b in held]
                sub = _part(state, users, lambda m, b=block: m == b or m.startswith(b + "."))
                parts.append(sub)
                runner = BlockRunner(bw.model.get_submodule(block), qmodel._mode, sub)
                ref = runner.float_outputs(cur)
                _run_phases(run, phases, sub, runner, cur, cur_held, block)
                outs = [runner(a, k) for a, k, _ in cur]
                db = _sqnr(ref, [_real(o, m) for o, (_, _, m) in zip(outs, cur, strict=True)])
                if early.breached(sub, db) and early.handle(run, sub, block, db, len(done)):
                    outs = [runner(a, k) for a, k, _ in cur]  # the next block sees the fix
                    db = _sqnr(ref, [_real(o, m) for o, (_, _, m) in zip(outs, cur, strict=True)])
                done.append((block, db))
                if chained:
                    outs_held = [] if cur_held is None else [runner(a, k) for a, k, _ in cur_held]
                    cur = [((bw.keep(o), *a[1:]), k, m) for o, (a, k, m) in
                           zip(outs, cur, strict=True)]
                    if cur_held is not None:
                        cur_held = [((bw.keep(o), *a[1:]), k, m) for o, (a, k, m) in
                                    zip(outs_held, cur_held, strict=True)]
                del ref, outs
                run.tick("calibrate", len(done), total)
        rest = _rest(state, parts)
        if len(rest.linears) or len(rest.attention):
            _run_phases(run, phases, rest, None, bw.batches, run.held, None, inside)
    run.tick("calibrate", total, total)
    state.set_mode("observe")  # as the whole-model path leaves it (calibrating() ends in quant)
    _summary(run, done, sum(_rows(b) for b in bw.batches), time.perf_counter() - t0)


class EarlyCheck:
    """The output floor per block, as calibration goes: a collapse handed to the fallback at once.

    At W8A8 with ``min_output_sqnr_db`` set, a block whose output SQNR vs its float output (on
    its quantized inputs) is under the floor has collapsed (the model output after it cannot be
    over the floor). Right then, before later blocks are calibrated on its outputs, the model
    as it stands (the blocks so far quantized, the rest float) goes to the sensitivity fallback
    (:func:`~slimformer.quantize.fallback.fallback`) with only this block's activation sites as
    candidates and the floor on the model output as its criterion: the fewest of them kept float.
    They are recorded in ``qmodel.config.float_activations``; the model-level check after
    calibration still runs (and falls back further or refuses where the floor is missed).
    """

    def __init__(self, config):
        self.config = config
        self.floor = None if config.weight_only else config.min_output_sqnr_db

    def breached(self, sub: QuantState, db: float) -> bool:
        """Whether the block of ``sub`` (all of it at 8 bits or more) is under the floor."""
        if self.floor is None or db >= self.floor or not len(sub.linears):
            return False
        return min(b for lq in sub.linears.values() for b in (lq.wq.bits, lq.act.bits)) >= 8

    def handle(self, run, sub: QuantState, block: str, db: float, index: int) -> bool:
        """The fallback on ``block``'s sites; whether it changed them (notes in ``run``)."""
        from slimformer.quantize.budget import Budget
        from slimformer.quantize.fallback import fallback

        qmodel = run.qmodel
        head = (f"block {block} (block {index + 1}) output SQNR {db:.1f} dB vs float on its "
                f"inputs, under the {self.floor:g} dB floor: found as it was calibrated")
        view = _View(qmodel, sub, lambda **b: qmodel(**b))
        view.parameters = qmodel.model.parameters
        fb = fallback(view, run.data, self.config, [Budget("db", self.floor)], run.tick)
        sub.set_mode("quant")
        if fb is None:
            run.notes.append(head + "; the model output with the blocks so far quantized holds "
                             "the floor: kept")
            return False
        if not fb.met:
            run.notes.append(head + "; even with every activation site of the block float the "
                             "model output misses the floor: left to the model-level check (" +
                             "; ".join(fb.notes) + ")")
            return False
        qmodel.config = qmodel.config.model_copy(update={
            "overrides": [*qmodel.config.overrides, *fb.overrides],
            "float_activations": [*qmodel.config.float_activations, *fb.patterns()]})
        run.notes.append(head + "; handed to the fallback at once: " + "; ".join(fb.notes))
        return True


def _run_phases(run, phases, sub: QuantState, runner, data, held, block: str | None,
                blocks: list[str] = ()) -> None:
    """Observe ``data`` at ``sub``'s quantizers, run ``phases`` on them, check, free.

    ``data``: the block's ``(args, kwargs, mask)`` per batch, or (the tail, ``runner`` None) the
    model's input dicts.
    """
    if runner is not None:
        view = _View(run.qmodel, sub, runner)
    else:  # the tail: whole-model forwards, every block already quantized
        view = _View(run.qmodel, sub, lambda **b: run.qmodel(**b))

    def local(m: str) -> bool:
        if runner is not None:
            return m.startswith(block + ".")
        return not any(m.startswith(b + ".") for b in blocks)

    norms = [n if local(n.module) else dataclasses.replace(n, foldable=False)
             for n in run.structure.norms]  # never fold into a norm another part already ran
    part = dataclasses.replace(run, qmodel=view, data=run.data if runner is None else data,
                               held=held, runner=runner, notes=[],
                               structure=dataclasses.replace(run.structure, norms=norms))
    acts = [m for m in sub.modules() if isinstance(m, ActQuantizer)]
    sub.set_mode("observe")
    for i, batch in enumerate(data if runner is None else part.batches(data)):
        for act in acts:
            act.group = i
        view(**batch)
    for phase in phases:
        phase(part)
    sub.set_mode("quant")
    remember_sites(sub)
    sub.forget()  # the observations: this part is done
    run.notes += [n for n in part.notes if n not in run.notes]


def _part(state: QuantState, users: dict[int, list[str]], inside) -> QuantState:
    """A view of ``state``: the Linears whose input quantizer serves only modules ``inside``.

    With those input quantizers and the attention sites ``inside`` accepts.
    """
    sub = QuantState()
    for k, lq in state.linears.items():
        if all(inside(m) for m in users[id(lq.act)]):
            sub.linears[k] = lq
    ids = {id(lq.act) for lq in sub.linears.values()}
    for k, a in state.acts.items():
        if id(a) in ids:
            sub.acts[k] = a
    for k, a in state.attention.items():
        if inside(a.module):
            sub.attention[k] = a
    sub.has_mha, sub.weight_only = state.has_mha, False
    return sub


def _rest(state: QuantState, parts: list[QuantState]) -> QuantState:
    """A view of the quantizers of ``state`` that no part holds (e.g. inputs shared by blocks)."""
    sub = QuantState()
    taken = {id(m) for p in parts for m in p.modules()}
    for name in ("linears", "acts", "attention"):
        for k, m in getattr(state, name).items():
            if id(m) not in taken:
                getattr(sub, name)[k] = m
    sub.has_mha, sub.weight_only = state.has_mha, False
    return sub


def _entry(captured: tuple, batch: dict) -> tuple:
    """``(args, kwargs, mask)`` of a block's captured call on ``batch``."""
    mask = batch.get("attention_mask")
    return (*captured, mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)


def _real(out: torch.Tensor, mask) -> torch.Tensor:
    return out if mask is None else real_positions(out, {"attention_mask": mask})


def _sqnr(refs: list[torch.Tensor], gots: list[torch.Tensor]) -> float:
    sig = sum(float((r.float() ** 2).sum()) for r in refs)
    err = sum(float(((g.float() - r.float()) ** 2).sum()) for r, g in zip(refs, gots, strict=True))
    return math.inf if err == 0 else 10 * math.log10(sig / err) if sig > 0 else -math.inf


def _rows(batch: dict) -> int:
    return next((len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), 1)


def _summary(run, done: list[tuple[str, float]], rows: int, seconds: float) -> None:
    """One note: the blocks, their output SQNR vs float, the first one that drops."""
    if not done:
        return
    dbs = ", ".join(f"{b.rpartition('.')[2]} {d:.1f}" for b, d in done)
    worst = min(done, key=lambda kv: kv[1])
    drop = next((b for (b, d), (_, p) in zip(done[1:], done, strict=False) if d < p - 6), None)
    run.notes.insert(0, f"{run.config.method}: {len(done)} blocks calibrated one at a time on "
                        f"{rows} rows in {seconds:.1f} s, each fed the quantized outputs of the "
                        f"one before; block output SQNR vs float (dB): {dbs}; lowest "
                        f"{worst[1]:.1f} dB at {worst[0]}" +
                        (f"; first drop of 6 dB or more at {drop}" if drop else ""))
