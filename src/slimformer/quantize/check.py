"""No silent collapse: every quantizer checked against its data after calibration.

Each site (activation, attention input, attention probabilities, weight) is fake-quantized as
in quant mode on its calibration sample and compared with float: SQNR in dB, and its range
against its resolution (the spread of the data in quantization steps). A site is *weak* when
its SQNR is below :func:`weak_floor_db` for its bit-width or its data spread is under one step
(values collapse onto one or two codes). The model output's SQNR vs float on the calibration
data is measured too; :func:`quantize` raises when it is below the config's floor at W8A8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten

from slimformer.quantize.quantizers import dynamic_params, fake_uniform

# values per float32 chunk of the output check (16 MB): each chunk's sums are added in float64
CHUNK = 1 << 22


@dataclass(frozen=True)
class WeakSite:
    """A quantizer whose calibration data it represents badly.

    Attributes:
        name: The quantizer (``norm:<module>:<bits>``, ``in:<weight>``, ``<module>:q`` ...,
            ``<module>:probs`` or a weight name).
        kind: ``activation`` / ``probabilities`` / ``weight``.
        bits: Its bit-width.
        sqnr_db: Its SQNR vs float on the calibration sample (dB).
        steps: Spread (standard deviation) of the data in quantization steps.
        reason: Why it is weak, in words.
    """

    name: str
    kind: str
    bits: int
    sqnr_db: float
    steps: float
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}, {self.bits} bits): {self.reason}"


def weak_floor_db(bits: int) -> float:
    """SQNR under which a ``bits``-bit site is weak: 6.02 dB per bit less 30 dB, at least 3 dB.

    A uniform grid over a well-used range gives about 6.02 b + 1.8 dB (minus the crest factor of
    the data); 30 dB of margin keeps outlier-heavy but healthy sites off the list (8 bits: 18 dB,
    6 bits: 6 dB, 4 bits and below: 3 dB, where half the signal power is lost).
    """
    return max(3.0, 6.02 * bits - 30.0)


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    """``10 log10(sum ref^2 / sum (got - ref)^2)`` in float64 (inf when equal, -inf for 0 ref).

    Summed over chunks of ``CHUNK`` elements: no float64 copy of a whole tensor (an LM head's
    weight is 0.1-1 GB in float32).
    """
    sig, err = power_sums(ref, got)
    if err == 0:
        return math.inf
    return 10 * math.log10(sig / err) if sig > 0 else -math.inf


def power_sums(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """``(sum ref^2, sum (got - ref)^2)`` in float64, over chunks of ``CHUNK`` elements."""
    ref, got = ref.reshape(-1), got.reshape(-1)
    sig = err = 0.0
    for i in range(0, ref.numel(), CHUNK):
        r = ref[i:i + CHUNK].double()
        sig += float((r**2).sum())
        err += float(((got[i:i + CHUNK].double() - r) ** 2).sum())
    return sig, err


def _judge(name: str, kind: str, bits: int, ref: torch.Tensor, got: torch.Tensor,
           step: torch.Tensor | None) -> WeakSite | None:
    if not ref.numel() or float(ref.abs().max()) == 0:
        return None  # all-zero data: any grid represents it exactly
    db = sqnr_db(ref, got)
    steps = math.inf
    if step is not None:
        # per channel (column): one outlier channel must not hide that the others collapse
        ref = ref.float()  # float32 spreads: a float64 copy of an LM head's weight is 0.2-2 GB
        spread = (ref.std(0, unbiased=False) if ref.dim() == 2 else ref.std().reshape(1)).double()
        steps = float((spread / step.double().reshape(-1)).median())
    reasons = []
    if steps < 1:
        reasons.append(f"the data spread is {steps:.2g} quantization steps (its values collapse "
                       "onto few codes)")
    if db < weak_floor_db(bits):
        reasons.append(f"SQNR {db:.1f} dB vs float, below {weak_floor_db(bits):.0f} dB")
    if not reasons:
        return None
    return WeakSite(name, kind, bits, db, steps, "; ".join(reasons))


@torch.no_grad()
def site_errors(state) -> tuple[list[WeakSite], dict[str, float]]:
    """Check every quantizer on its calibration sample; returns (weak sites, SQNR per site).

    Weak sites come worst first: collapsed ones (spread under one step, fewest steps first),
    then by SQNR.

    Call while the activation quantizers still hold their sampled rows (before they are freed).
    """
    weak: list[WeakSite] = []
    db: dict[str, float] = {}

    def act_check(act, kind="activation"):
        if act.keep_float:  # kept float: nothing quantized there
            return
        if not act.observed:  # freed after its block: what remember_sites found then
            _recall(act, weak, db)
            return
        # float32 as the quantized model computes it (sums in float64: sqnr_db); a float64 copy
        # of every site's sample was the check's peak (MiniLM-L6: +0.33 GB)
        x = act.affine(act.samples()).float()  # (n, C)
        keep = act.keep_mask(x.shape[-1])  # outlier channels kept float: 0 (None: none)
        xq = x if keep is None else x * keep.float()
        s, z = act.scale_zero()
        if act.dynamic is not None:  # run-time ranges: per sampled row (token), or the sample
            s, z = dynamic_params(xq, act.bits, act.dynamic == "token")
        got = fake_uniform(xq, s.float(), z.float(), act.bits)
        if keep is not None:  # exact there
            got = got + x * (1 - keep.float())
        site = _judge(act.name, kind, act.bits, x, got, s.reshape(-1).median().reshape(1)
                      if act.dynamic is not None else s)  # the typical row's step
        db[act.name] = sqnr_db(x, got)
        if site:
            weak.append(site)

    for act in state.acts.values():
        act_check(act)
    for a in state.attention.values():
        for act in (a.q_in, a.k_in, a.v_in):
            act_check(act)
        if not a.probs_float and not a.probs.observed:
            _recall(a.probs, weak, db)
        elif not a.probs_float:
            p = a.probs.samples()
            got = a.probs.quant(p)
            site = _judge(a.probs.name, "probabilities", a.probs.bits, p, got, None)
            db[a.probs.name] = sqnr_db(p, got)
            if site:
                weak.append(site)
    for lq in state.linears.values():
        w = lq.matrix().detach()
        wq = lq.quantized_matrix().detach()
        db[lq.name] = sqnr_db(w, wq)
        step = lq.wq.scale.reshape(-1)
        site = _judge(lq.name, "weight", lq.wq.bits, w.t(), wq.t(), step)
        if site:
            weak.append(site)
    return sorted(weak, key=lambda s: (min(s.steps, 1.0), s.sqnr_db)), db


def remember_sites(state) -> None:
    """Keep each activation / probability quantizer's check on itself before its rows are freed.

    :func:`site_errors` reports it for quantizers without observations (block-wise calibration
    frees each block's rows once the block is done).
    """
    weak, db = site_errors(state)
    by_name = {w.name: w for w in weak}
    for m in state.modules():
        name = getattr(m, "name", None)
        if hasattr(m, "observed") and m.observed and name in db:
            m.checked = (db[name], by_name.get(name))


def _recall(q, weak: list[WeakSite], db: dict[str, float]) -> None:
    got = getattr(q, "checked", None)
    if got is not None:
        db[q.name] = got[0]
        if got[1] is not None:
            weak.append(got[1])


def float_leaves(out) -> list[torch.Tensor]:
    """The floating-point tensor leaves of a model output (tensor, tuple, dict, ModelOutput)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and
            t.is_floating_point()]


@torch.no_grad()
def output_sqnr(qmodel, batches) -> float | None:
    """SQNR (dB) of all floating outputs of ``qmodel`` in quant mode vs float, over ``batches``.

    Both forwards of a batch draw the same random numbers (forked, seeded RNG), so a model that
    samples in ``forward`` is compared like with like; the caller's RNG state is untouched.
    Padded positions (of the inputs' attention mask) are left out
    (:func:`~slimformer.quantize.capture.real_positions`).
    """
    from slimformer.quantize.capture import real_positions

    state, sig, err = qmodel.quant, 0.0, 0.0
    for i, inputs in enumerate(batches):
        outs = []
        for mode in ("float", "quant"):
            state.set_mode(mode)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(i)
                outs.append([real_positions(t, inputs) for t in float_leaves(qmodel(**inputs))])
        ref, got = outs
        for r, g in zip(ref, got, strict=True):
            r, g = r.reshape(-1), g.reshape(-1)
            for i in range(0, r.numel(), CHUNK):  # float32 chunks: no float64 copy of the logits
                rc = r[i:i + CHUNK].float()
                sig += float((rc**2).sum())
                err += float(((g[i:i + CHUNK].float() - rc) ** 2).sum())
        del outs, ref, got
    if sig == 0:
        return None
    return math.inf if err == 0 else 10 * math.log10(sig / err)
