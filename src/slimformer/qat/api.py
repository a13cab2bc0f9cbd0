"""``qat(qmodel, teacher, config, data) -> QatResult``: fine-tune a PTQ result with its quantizers.

The post-training quantized model becomes a Brevitas student whose step 0 reproduces it
(:func:`~slimformer.qat.convert.to_brevitas`), learns the float teacher's outputs on the
training rows (:func:`~slimformer.qat.train.fine_tune`: learned weights, scales and zero points,
early stopping on held-out rows) and is written back into a copy of the PTQ model
(:func:`~slimformer.qat.writeback.to_quantized`): an ordinary quantized model, in the form the
PTQ model was (simulated or inference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.errors import CalibrationError, DataError, UnsupportedModelError
from slimformer.qat.config import QatConfig
from slimformer.qat.train import Progress, TrainLog
from slimformer.quantize.state import QuantizedModel

EMBEDDING_TASKS = ("base", "sentence-embedding", "image-features")
# the written-back model must give the student's outputs, far closer than either is to float: its
# error power under 1/100 of the quantization error's. Measured: vit-digits-seq W4A4 identical
# (inf dB); vit-fmnist W4A4 44-48 dB (quantization error: 17 dB), W3A3 38.6 dB, as step 0 vs
# PTQ: a few activation codes in 10^4 move by one step where the float sums of a Linear round
# differently (Brevitas's integer-times-scale weights, our dequantized ones), and spread
WRITEBACK_MARGIN_DB = 20.0


@dataclass
class QatResult:
    """A fine-tuned quantized model and what the fine-tuning did.

    Attributes:
        model: Our quantized model holding the learned values (the PTQ model's form).
        student: The Brevitas model at the step kept.
        log: Every held-out judgement, the step kept, why it stopped, seconds and CPU seconds.
        loss: ``kl`` or ``mse``; metric: ``pt``, ``agree``, ``ppl`` or ``db`` (what early
            stopping judged).
        fit_rows / held_rows: Rows trained on / judged.
        writeback_db: Output SQNR of ``model`` vs ``student`` on the held-out rows (dB).
        notes: What the report should say, in words.
    """

    model: QuantizedModel
    student: QuantizedModel
    log: TrainLog
    loss: str
    metric: str
    fit_rows: int
    held_rows: int
    writeback_db: float
    notes: list[str] = field(default_factory=list)


def choose(config: QatConfig, teacher: nn.Module, inputs: dict, task: str | None) -> tuple[str, str]:
    """``(loss, metric)``: the config's, or for ``auto`` by the task and the teacher's outputs.

    Embedding / feature tasks and outputs without class scores: ``mse`` / ``db``; causal LMs:
    ``kl`` / ``ppl``; class scores: ``kl`` / ``pt``.
    """
    from slimformer.models.outputs import class_scores

    with torch.no_grad():
        scores = class_scores(teacher(**inputs))
    has_scores = scores is not None and scores.dim() >= 2 and task not in EMBEDDING_TASKS
    loss = config.loss if config.loss != "auto" else ("kl" if has_scores else "mse")
    if loss == "kl" and scores is None:
        raise UnsupportedModelError("loss kl needs class scores (the output, its 'logits' or "
                                    "the first element of a returned tuple): this model has "
                                    "none; use loss mse")
    metric = config.metric
    if metric in ("pt", "agree") and not has_scores:
        raise UnsupportedModelError(f"metric {metric} needs class scores (the output, its "
                                    "'logits' or the first element of a returned tuple) of a "
                                    f"task that is not an embedding one (task {task}): use "
                                    "metric db")
    if metric == "auto":
        metric = "ppl" if task == "causal-lm" else "pt" if has_scores else "db"
    return loss, metric


def split_rows(data, config: QatConfig):
    """``(fit, held)`` rows of the first ``config.rows`` rows of ``data`` (seeded, disjoint).

    Raises:
        DataError: Fewer than 2 rows.
    """
    from slimformer.quantize.holdout import Rows

    n = min(config.rows, len(data))
    if n < 2:
        raise DataError(f"quantization-aware fine-tuning needs at least 2 rows (training and "
                        f"held-out ones); the data has {len(data)}")
    k = min(n - 1, max(1, round(n * config.held_out)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    return Rows(data, sorted(perm[k:])), Rows(data, sorted(perm[:k]))


def qat(qmodel: QuantizedModel, teacher: nn.Module, config: QatConfig, data,
        task: str | None = None, progress: Progress = None) -> QatResult:
    """Fine-tune ``qmodel`` (left as it is) by distillation from ``teacher``; see module doc.

    Args:
        qmodel: The post-training quantized model (:func:`~slimformer.quantize.api.quantize`'s,
            or restored from a quantized artifact).
        teacher: The float model it was quantized from.
        config: The fine-tuning settings.
        data: Training rows, ``({name: tensor}, label)`` items; ``config.held_out`` of the first
            ``config.rows`` are judged, never trained on.
        task: The model's task (``causal-lm``, ``sentence-embedding``, ...), for ``auto``.
        progress: ``progress(description, step, steps)``.

    Raises:
        UnsupportedModelError: ``qmodel`` is not a quantized model, or has sites Brevitas
            layers do not cover yet (:func:`~slimformer.qat.convert.to_brevitas`).
        DataError: Fewer than 2 rows.
    """
    from slimformer.data.datasets import trim_padding
    from slimformer.qat.convert import to_brevitas
    from slimformer.qat.train import fine_tune
    from slimformer.qat.writeback import snap_input_scales, to_quantized

    if not isinstance(qmodel, QuantizedModel):
        raise UnsupportedModelError(f"quantization-aware fine-tuning starts from a quantized "
                                    f"model; got a float {type(qmodel).__name__}: quantize it "
                                    "first (slimformer quantize, or a quantize stage before qat)")
    fit, held = split_rows(data, config)
    loss, metric = choose(config, teacher, trim_padding([fit[0], fit[min(1, len(fit) - 1)]])[0],
                          task)
    blocks, block_note = matching_blocks(qmodel, teacher, trim_padding([fit[0]])[0]) \
        if config.block_loss else ([], None)
    student = to_brevitas(qmodel)
    log = fine_tune(student, teacher, fit, held, config, loss, metric, progress, blocks)
    snapped = snap_input_scales(student)
    model = to_quantized(student, qmodel)
    db = _writeback_db(model, student, held, config.batch_size)
    b0, b1 = log.judgements[0].metrics, log.best.metrics
    if db < b1["db"] + WRITEBACK_MARGIN_DB:
        raise CalibrationError(f"the written-back model's outputs are {db:.1f} dB from the "
                               f"fine-tuned Brevitas model's, its output SQNR vs float "
                               f"{b1['db']:.1f} dB (at least {WRITEBACK_MARGIN_DB:g} dB more "
                               "expected): a learned value did not carry over")
    notes = [f"QAT: {log.steps} steps of {config.steps} ({log.stopped}), kept step "
             f"{log.best_step}; {len(fit)} training rows, {len(held)} held out; loss {loss}; "
             f"held-out {metric} {b0[metric]:.4g} -> {b1[metric]:.4g}, output SQNR vs float "
             f"{b0['db']:.2f} -> {b1['db']:.2f} dB; {log.cpu_seconds / max(log.steps, 1):.2f} "
             "CPU-s per step"]
    notes += ([block_note] if block_note else []) + log.notes
    notes += [n for n in student.quant.notes if n.startswith("QAT:")]
    if snapped:
        notes.append(f"QAT: {snapped} learned input scale(s) moved by an ulp to one the "
                     "quantizer's range gives (written back exactly)")
    return QatResult(model, student, log, loss, metric, len(fit), len(held), db, notes)


# a block's output in the quantized model with its quantizers off must match the teacher's this
# closely (SQNR) to be distilled: a fold that changed it (a migration into a norm whose output the
# block returns, which the folds refuse) would teach the student a wrong target there. Float32
# rounding of the folds stays far above it (reparameterized models are exact in float)
BLOCK_MATCH_DB = 40.0


@torch.no_grad()
def matching_blocks(qmodel: QuantizedModel, teacher: nn.Module,
                    inputs: dict) -> tuple[list[str], str | None]:
    """Module paths of ``qmodel``'s blocks to distil (their outputs are the teacher's), a note.

    Blocks: :func:`~slimformer.quantize.blockwise.containers` (the repeated children holding the
    quantized Linears, found from the structure). Each is compared on ``inputs`` with ``qmodel``
    in float mode (folds in place, quantizers off) and kept within :data:`BLOCK_MATCH_DB`. A
    restored folder's float weights are its dequantized codes (weight rounding alone puts its
    blocks at 6-13 dB, minilm-vader W4): there every block is kept, as the folds leave block
    outputs alone by construction (the check above on models with their float weights).
    """
    from slimformer.qat.train import BlockTaps
    from slimformer.quantize.blockwise import containers

    lqs = list(qmodel.quant.linears.values())
    paths = [p for c in containers(qmodel.model, {lq.name.rpartition(".")[0] for lq in lqs})
             for p in c]
    paths = [p for p in paths if _has(teacher, p)]
    if not paths:
        return [], "QAT: no repeated blocks found: the output loss alone"
    if all(torch.equal(lq.param[0], lq._unmatrix(lq.quantized_matrix())) for lq in lqs):
        return paths, (f"QAT: layer-wise distillation on the hidden states of all {len(paths)} "
                       "blocks (not compared with the teacher's: the folder's float weights are "
                       "its dequantized codes)")
    taps = BlockTaps(teacher, qmodel.model, paths)
    try:
        qmodel.quant.set_mode("float")
        teacher(**inputs)
        qmodel(**inputs)
        kept = [p for p in paths if _close(taps.got.get(("t", p)), taps.got.get(("s", p)))]
    finally:  # a quantized model is in quant mode (as check.output_sqnr leaves it)
        qmodel.quant.set_mode("quant")
        taps.remove()
    note = (f"QAT: layer-wise distillation on the hidden states of {len(kept)} of {len(paths)} "
            "blocks" + ("" if len(kept) == len(paths) else " (the others' float outputs differ "
                        "from the teacher's after the folds)"))
    return kept, note


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _close(t, s) -> bool:
    from slimformer.quantize.check import sqnr_db

    return (isinstance(t, torch.Tensor) and isinstance(s, torch.Tensor) and t.shape == s.shape
            and sqnr_db(t, s) >= BLOCK_MATCH_DB)


@torch.no_grad()
def _writeback_db(model: QuantizedModel, student: QuantizedModel, rows, batch_size: int) -> float:
    """Output SQNR (dB) of ``model`` vs ``student`` on ``rows`` (padded positions left out)."""
    from slimformer.data.datasets import trim_padding
    from slimformer.quantize.capture import real_positions
    from slimformer.quantize.check import float_leaves

    sig = err = 0.0
    for i in range(0, len(rows), batch_size):
        inputs, _ = trim_padding([rows[j] for j in range(i, min(len(rows), i + batch_size))])
        for a, b in zip(float_leaves(student(**inputs)), float_leaves(model(**inputs)),
                        strict=True):
            a, b = real_positions(a, inputs).double(), real_positions(b, inputs).double()
            sig += float((a**2).sum())
            err += float(((a - b) ** 2).sum())
    return math.inf if err == 0 else 10 * math.log10(sig / err) if sig else -math.inf
