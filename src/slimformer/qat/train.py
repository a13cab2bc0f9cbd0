"""The distillation loop: the Brevitas student learns the float teacher's outputs.

Trained: the float weights and biases of every :class:`~slimformer.qat.layers.QatLinear` (Adam,
``weight_lr``) and the learned scales and zero points of their Brevitas quantizers (Adam, one
group per quantizer with ``scale_lr`` times its initial threshold, so every quantizer moves by the
same fraction of its own scale) and, with ``learn_attention``, the ranges of our attention
matmuls' input quantizers (:func:`attention_ranges`, the same rule). Everything else (norms,
embeddings, embedding and non-Linear weight quantizers) stays frozen. Loss: KL of the class
scores or normalized MSE of every output (:func:`loss_of`), plus, with ``block_loss``, the
normalized MSE of every transformer block's hidden-state output (:class:`BlockTaps`: layer-wise
distillation as TernaryBERT / KDLSQ-BERT train low-bit encoders; a handful of class scores carry
little signal per row).

Every ``eval_every`` steps (and at step 0) the held-out rows are judged with
:class:`~slimformer.quantize.judge.Judge`'s metrics, the teacher being the reference; the best
judgement's parameters are kept (a copy of the trained tensors), and the run stops after
``patience`` judgements without improvement or past the wall-clock budget. A step whose batch
would not fit half the memory available runs as micro-batches with accumulated gradients
(:func:`micro_batch`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.qat.config import QatConfig
from slimformer.qat.convert import learned_parameters
from slimformer.qat.layers import QatLinear, is_pow2
from slimformer.quantize.judge import Judge
from slimformer.quantize.spill import available_bytes

Progress = Callable[[str, int, int], None] | None
PROGRESS = "fine-tune (QAT)"
WEIGHT_LR = 1e-4  # Adam rate of weights of <= 4 bits when QatConfig.weight_lr is None


class StudentJudge(Judge):
    """:class:`~slimformer.quantize.judge.Judge` with the teacher as the float reference."""

    def __init__(self, teacher: nn.Module, student, rows, batch_size: int, kinds: set[str]):
        self.teacher = teacher
        self.agree = "agree" in kinds  # measured from the points kind's agreement
        super().__init__(student, rows, batch_size,
                         {"pt" if k == "agree" else k for k in kinds})

    def measure(self) -> dict[str, float]:
        """The judge's metrics, and ``agree``: points of top-1 disagreement with the teacher."""
        res = super().measure()
        if self.agree:
            res["agree"] = 100 * (1 - res["agreement"])
        return res

    def _model(self, mode: str):
        """The teacher for ``float``, the student (its own quantizers on) for ``quant``."""
        if mode == "float":
            return self.teacher
        self.qmodel.quant.set_mode("quant")
        return self.qmodel


@dataclass(frozen=True)
class Judgement:
    """The held-out metrics after ``step`` steps (``loss``: mean training loss since the last)."""

    step: int
    metrics: dict[str, float]
    loss: float | None = None


@dataclass
class TrainLog:
    """What the loop did: every judgement, the step kept, why it stopped, its cost."""

    judgements: list[Judgement] = field(default_factory=list)
    best_step: int = 0
    steps: int = 0
    stopped: str = "steps"  # steps | patience | time
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    micro_batch: int | None = None  # rows per backward where a step's batch is split
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Judgement:
        """The judgement of the step kept."""
        return next(j for j in self.judgements if j.step == self.best_step)


def weight_rate(config: QatConfig, bits: int) -> float:
    """Adam rate of a Linear's ``bits``-bit weights: ``weight_lr``, else 1e-4 halved per bit > 4.

    ``weight_lr`` None: :data:`WEIGHT_LR` at <= 4 bits, halved per bit above (8 bits: 1/16).

    Adam moves every weight by about its rate per step, whatever the gradient; the grid step of
    an 8-bit weight is 1/16 of a 4-bit one's, and 1e-4 there hops each weight a code in a few
    steps: W8A8 QAT at 1e-4 fell from 42.9 to 25-28 dB output SQNR (vit-fmnist) and kept
    MiniLM-L6's step 0, where 1e-4 / 16 held or gained (docs/qat.md).
    """
    if config.weight_lr is not None:
        return config.weight_lr
    return WEIGHT_LR * 2.0 ** -max(0, bits - 4)


def param_groups(student: nn.Module, config: QatConfig) -> list[dict]:
    """Adam groups: Linear weights and biases; per quantizer its scale and zero point.

    Rates: :func:`weight_rate` of each Linear's weight bits; ``scale_lr`` times the
    quantizer's threshold (a power-of-two quantizer's log2 threshold: ``scale_lr / ln 2``, the
    same relative step).

    Every parameter of ``student`` not in a group is frozen (``requires_grad`` False).
    """
    for p in student.parameters():
        p.requires_grad_(False)
    by_bits: dict[int, list] = {}
    for m in student.modules():
        if isinstance(m, QatLinear):
            by_bits.setdefault(int(m.weight_quant.bit_width()), []).extend(
                p for p in (m.weight, m.bias) if p is not None)
    groups = [{"params": ps, "lr": weight_rate(config, bits)}
              for bits, ps in sorted(by_bits.items())]
    learned = learned_parameters(student)
    pow2_params = {id(m.value) for m in student.modules() if is_pow2(m)}
    for name, p in learned.items():
        if ".scaling_impl." not in name:
            continue
        zp = learned.get(name.replace(".scaling_impl.", ".zero_point_impl."))
        if id(p) in pow2_params:
            # log2 of a power-of-two threshold: a relative change r of the scale is r / ln 2
            # there (a code-width change needs |r| ~ 0.35 in all, as the rounding moves at 0.5)
            groups.append({"params": [p], "lr": config.scale_lr / math.log(2)})
            if zp is not None:  # the zero point (z s): the rate relative to the threshold
                groups.append({"params": [zp],
                               "lr": config.scale_lr * float(torch.exp2(p.detach()).mean())})
            continue
        base = float(p.detach().abs().mean())
        groups.append({"params": [p] + ([zp] if zp is not None else []),
                       "lr": config.scale_lr * base})
    if config.learn_attention:
        groups += [{"params": params, "lr": config.scale_lr * base}
                   for params, base in attention_ranges(student)]
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def attention_ranges(student) -> list[tuple[list[torch.Tensor], float]]:
    """``(tensors, threshold)`` of every learnable attention quantizer of ``student``.

    Our q / k / v input quantizers (:class:`~slimformer.quantize.act.ActQuantizer`: its range
    ``lo, hi``; static, float scales, quantizing) and the probabilities' ``delta`` where their
    grid is uniform. ``threshold``: the quantizer's scale times its largest code magnitude, as
    Brevitas's learned threshold (the learning rate is relative to it). Gradients reach them
    through the straight-through rounding of
    :func:`~slimformer.quantize.quantizers.fake_uniform` (LSQ-style). Power-of-two grids
    (``power_of_two_scales``) are left as they are: a learned range would leave the powers of two.
    """
    found, seen = [], set()
    pow2 = bool(getattr(getattr(student, "config", None), "power_of_two_scales", False))
    for a in getattr(student.quant, "attention", {}).values():
        for act in (a.q_in, a.k_in, a.v_in):
            if id(act) in seen or act.mode != "quant" or act.keep_float or act.dynamic or act.pow2:
                continue
            seen.add(id(act))
            with torch.no_grad():
                scale, _ = act.scale_zero()
            top = 2 ** (act.bits - 1) if act.symmetric else 2**act.bits - 1
            found.append(([act.lo, act.hi], float(scale.mean()) * top))
        p = a.probs
        if p.kind == "uniform" and p.mode == "quant" and not a.probs_float and id(p) not in seen \
                and not pow2:  # a power-of-two grid (fixed-point targets) stays one
            seen.add(id(p))
            found.append(([p.delta], float(p.delta)))
    return found


def loss_of(kind: str, s_out, t_out, inputs: dict, temperature: float = 1.0) -> torch.Tensor:
    """The distillation loss of one batch (a scalar).

    ``kl``: ``T^2 KL(softmax(t / T) || softmax(s / T))`` of the class scores over their last
    axis, averaged over rows (and real token positions); ``mse``: for every float output,
    ``mean((s - t)^2) / mean(t^2)``, summed.
    """
    from slimformer.models.outputs import class_scores
    from slimformer.quantize.capture import real_positions
    from slimformer.quantize.check import float_leaves

    if kind == "kl":
        s = real_positions(class_scores(s_out), inputs)
        t = real_positions(class_scores(t_out), inputs)
        s, t = s.reshape(-1, s.shape[-1]).float(), t.reshape(-1, t.shape[-1]).float()
        logp_s = torch.log_softmax(s / temperature, -1)
        logp_t = torch.log_softmax(t / temperature, -1)
        kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()
        return kl * temperature**2
    total = None
    for s, t in zip(float_leaves(s_out), float_leaves(t_out), strict=True):
        s, t = real_positions(s, inputs).float(), real_positions(t, inputs).float()
        term = ((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)
        total = term if total is None else total + term
    return total


class BlockTaps:
    """Forward hooks that keep the hidden-state output of the blocks at ``paths`` of two models.

    ``paths``: module paths valid in both the teacher and the student's wrapped model (the
    student is a copy of the teacher with its Linears replaced, so its paths are the teacher's).
    """

    def __init__(self, teacher: nn.Module, student_model: nn.Module, paths: list[str]):
        self.paths = paths
        self.got: dict[tuple[str, str], torch.Tensor] = {}
        self.handles = []
        for side, model in (("t", teacher), ("s", student_model)):
            for path in paths:
                def hook(_m, _i, out, key=(side, path)):
                    self.got[key] = out[0] if isinstance(out, (tuple, list)) else out
                self.handles.append(model.get_submodule(path).register_forward_hook(hook))

    def loss(self, inputs: dict) -> torch.Tensor | None:
        """Mean over blocks of ``mean((s - t)^2) / mean(t^2)`` at real positions (None: none ran)."""
        from slimformer.quantize.capture import real_positions

        terms = []
        for path in self.paths:
            s, t = self.got.get(("s", path)), self.got.get(("t", path))
            if isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor) and s.shape == t.shape:
                s, t = real_positions(s, inputs).float(), real_positions(t, inputs).float()
                terms.append(((s - t) ** 2).mean() / (t.detach() ** 2).mean().clamp_min(1e-12))
        self.got.clear()
        return torch.stack(terms).mean() if terms else None

    def remove(self) -> None:
        """Take the hooks off both models."""
        for h in self.handles:
            h.remove()
        self.got.clear()


def _clamp_zero_points(student: nn.Module) -> None:
    """Keep every learned zero point on its grid (``0 <= z <= 2^b - 1``), as ours must be.

    Zero points are learned on unsigned grids only, stored as ``|z| s`` beside the threshold
    ``(2^b - 1) s``: ``z <= 2^b - 1`` is ``|value| <= |threshold|``. A power-of-two grid keeps
    ``log2`` of its threshold ``2^b s`` (rounded), so there the bound is ``2^round(v) (1 - 2^-b)``.
    Brevitas's quantizers take any value; our activation quantizers (whose range holds 0) cannot.
    """
    from brevitas.core.zero_point import ParameterZeroPoint

    for name, m in student.named_modules():
        if isinstance(m, ParameterZeroPoint):
            quant = student.get_submodule(name.rpartition(".")[0])
            value = quant.scaling_impl.value.detach()
            if is_pow2(quant.scaling_impl):
                bits = float(quant.msb_clamp_bit_width_impl())
                top = torch.exp2(torch.round(value)) * (1 - 2.0**-bits)
            else:
                top = value
            m.value.copy_(torch.minimum(m.value.abs(), top.abs()))


def _clamp_deltas(student) -> None:
    """Keep every uniform probability grid's ``delta`` positive (as its calibration does)."""
    for a in getattr(student.quant, "attention", {}).values():
        a.probs.delta.clamp_(min=1e-6)


def _better(kind: str, a: dict[str, float], b: dict[str, float] | None) -> bool:
    """Whether metrics ``a`` beat ``b`` on ``kind`` (ties: the higher output SQNR)."""
    if b is None:
        return True
    sign = 1 if kind == "db" else -1  # pt / agree / ppl: lower is better
    ka, kb = sign * a[kind], sign * b[kind]
    if ka != kb:
        return ka > kb
    return a.get("db", -math.inf) > b.get("db", -math.inf)


# share of the memory available at the start that one micro-batch's training may take
MEMORY_SHARE = 0.5
# a forward + backward holds this many times its saved activations at its peak (the gradients
# of the activations, the forward's temporaries). Measured: DINOv2-small W4A8 saves 0.30 GB per
# row and its RSS grows 0.67 GB per row through forward and backward (2.2x); at batch 32 without
# this the whole batch seemed to fit half the memory and the process was killed at 24.3 GB
OVERHEAD = 2.5


def saved_bytes(student, inputs: dict) -> int:
    """Bytes of the tensors one forward of ``student`` on ``inputs`` saves for its backward.

    Each storage is counted once (views of one tensor share it); parameters saved by their
    operations are counted too (the same for every batch size, so a difference of two batch
    sizes leaves the activations).
    """
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = student(**inputs)
    del out
    return sum(seen.values())


def micro_batch(student, fit, config: QatConfig, budget: int | None) -> tuple[int, str | None]:
    """Rows per backward so ``OVERHEAD`` x its saved activations stay under ``budget`` bytes.

    Measured on the two longest training rows (text is padded to the longest of a batch): the
    saved bytes of 2 rows less those of 1 are one row's. Returns ``(rows, note)``; ``rows`` is
    ``config.batch_size`` (note None) where the whole batch fits or nothing can be measured.
    """
    from slimformer.data.datasets import trim_padding

    if budget is None or config.batch_size < 2 or len(fit) < 2:
        return config.batch_size, None

    def length(i: int) -> int:
        mask = fit[i][0].get("attention_mask")
        return int(mask.sum()) if torch.is_tensor(mask) else 0

    longest = sorted(range(len(fit)), key=length, reverse=True)[:2]
    one = saved_bytes(student, trim_padding([fit[longest[0]]])[0])
    two = saved_bytes(student, trim_padding([fit[i] for i in longest])[0])
    per_row = max(two - one, 1)
    fixed = max(one - per_row, 0)
    rows = max(1, min(config.batch_size, int((budget - fixed) // (OVERHEAD * per_row))))
    if rows >= config.batch_size:
        return config.batch_size, None
    return rows, (f"QAT: each step's batch of {config.batch_size} rows runs as micro-batches of "
                  f"{rows} (gradients accumulated): one row's saved activations take "
                  f"{per_row / 1e9:.2f} GB ({OVERHEAD:g}x that through the backward), the budget "
                  f"is {budget / 1e9:.1f} GB ({MEMORY_SHARE:.0%} of the memory available)")


def decay(config: QatConfig, done: int) -> float:
    """The factor on every group's rate after ``done`` optimizer steps (``config.lr_schedule``)."""
    if config.lr_schedule == "constant" or config.steps == 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(done, config.steps) / config.steps))


def fine_tune(student, teacher: nn.Module, fit, held, config: QatConfig, loss: str,
              metric: str, progress: Progress = None, blocks: list[str] | None = None) -> TrainLog:
    """Train ``student`` in place (its best judged state at the end, see module doc).

    Args:
        student: The :func:`~slimformer.qat.convert.to_brevitas` model.
        teacher: The float model (frozen).
        fit: Training rows (indexable ``({name: tensor}, label)``).
        held: Held-out rows judged for early stopping.
        config: Steps, learning rates, batch size, patience, budget, seed.
        loss: ``kl`` or ``mse`` (:func:`loss_of`).
        metric: ``pt``, ``ppl`` or ``db`` (:class:`~slimformer.quantize.judge.Judge`).
        progress: ``progress(description, step, steps)``.
        blocks: Module paths of the blocks whose hidden-state outputs the student learns too
            (weighted by ``config.block_loss``; :class:`BlockTaps`).
    """
    from slimformer.data.datasets import trim_padding

    t0, c0 = time.perf_counter(), time.process_time()
    student.eval()
    teacher.eval()
    groups = param_groups(student, config)
    trained = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: decay(config, k))
    judge = StudentJudge(teacher, student, held, config.batch_size, {"db", metric})
    log = TrainLog()
    free = available_bytes()
    micro, note = micro_batch(student, fit, config,
                              None if free is None else int(free * MEMORY_SHARE))
    if note:
        log.micro_batch = micro
        log.notes.append(note)
    best = judge.measure()
    log.judgements.append(Judgement(0, best))
    kept = [p.detach().clone() for p in trained]
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses: list[float] = []
    since = 0
    budget = None if config.max_minutes is None else 60 * config.max_minutes
    taps = BlockTaps(teacher, student.model, blocks) if blocks and config.block_loss else None
    try:
        for step in range(1, config.steps + 1):
            if len(order) < config.batch_size:  # a new epoch of the fit rows, reshuffled
                order += torch.randperm(len(fit), generator=gen).tolist()
            idx, order = order[:config.batch_size], order[config.batch_size:]
            opt.zero_grad(set_to_none=True)
            value = 0.0
            for k in range(0, len(idx), micro):  # one backward per micro-batch, rows-weighted
                part = idx[k:k + micro]
                inputs, _ = trim_padding([fit[i] for i in part])
                with torch.no_grad():
                    t_out = teacher(**inputs)
                term = loss_of(loss, student(**inputs), t_out, inputs, config.temperature)
                hidden = taps.loss(inputs) if taps is not None else None
                if hidden is not None:
                    term = term + config.block_loss * hidden
                term = term * (len(part) / len(idx))
                term.backward()
                value += float(term.detach())
            opt.step()
            sched.step()
            with torch.no_grad():
                _clamp_zero_points(student)
                _clamp_deltas(student)
            losses.append(value)
            log.steps = step
            if progress:
                progress(PROGRESS, step, config.steps)
            out_of_time = budget is not None and time.perf_counter() - t0 > budget
            if step % config.eval_every and step != config.steps and not out_of_time:
                continue
            got = judge.measure()
            log.judgements.append(Judgement(step, got, sum(losses) / len(losses)))
            losses = []
            if _better(metric, got, best):
                best, log.best_step, since = got, step, 0
                kept = [p.detach().clone() for p in trained]
            else:
                since += 1
            if out_of_time:
                log.stopped = "time"
                break
            if config.patience and since >= config.patience:
                log.stopped = "patience"
                break
        with torch.no_grad():
            for p, v in zip(trained, kept, strict=True):
                p.copy_(v)
    finally:  # the hooks are on the caller's teacher too
        if taps is not None:
            taps.remove()
    for p in trained:
        p.requires_grad_(False)
    log.seconds, log.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return log
