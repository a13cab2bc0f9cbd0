"""Typed configuration of quantization-aware fine-tuning (also the recipe's ``qat`` stage)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

LOSSES = ("auto", "kl", "mse")
METRICS = ("auto", "pt", "agree", "ppl", "db")
SCHEDULES = ("constant", "cosine")


class QatConfig(BaseModel):
    """How to fine-tune a post-training quantized model with its quantizers in the loop.

    Attributes:
        steps: Optimizer steps at most (one batch each); fewer when early stopping or the
            wall-clock budget ends the run.
        batch_size: Rows per step.
        weight_lr: Adam learning rate of the quantized Linears' float weights and biases, or
            None (default): ``1e-4`` for weights of <= 4 bits, halved per bit above (8 bits:
            ``6.25e-6``), each Linear by its own bit-width
            (:func:`~slimformer.qat.train.weight_rate`).
        scale_lr: Adam learning rate of the learned scales and zero points, relative to each
            quantizer's initial scale threshold (``1e-3``: a thousandth of it per step at most).
        lr_schedule: ``constant`` rates, or ``cosine``: every rate decays from its value at step
            1 towards 0 after step ``steps`` (half a cosine, as LSQ trains), so the last steps settle
            the weights on their grid instead of hopping between codes.
        loss: ``kl`` (KL divergence of the class scores / next-token logits, softmax over the
            last axis, padded positions left out), ``mse`` (mean squared error of every float
            output, each divided by its float mean square), or ``auto``: ``mse`` for embedding
            and feature models (task ``base``, ``sentence-embedding``, ``image-features``) and
            for models without class scores, ``kl`` otherwise.
        temperature: Softmax temperature of ``kl`` (on teacher and student alike).
        metric: What early stopping judges on the held-out rows (as the quantize budget does,
            :class:`~slimformer.quantize.judge.Judge`): ``pt`` accuracy points lost vs float
            (top-1 agreement points without labels), ``agree`` points of top-1 disagreement
            with the float model even where labels exist (when the float model is the
            reference: agreement targets), ``ppl`` perplexity increase, ``db`` output SQNR, or
            ``auto``: ``ppl`` for causal LMs, ``pt`` with class scores, else ``db``.
            Ties go to the higher output SQNR.
        rows: Training rows drawn (seeded) from the data's train split (a user's own data:
            its calibration rows); ``held_out`` of them are set aside.
        held_out: Fraction of ``rows`` no step trains on, judged for early stopping.
        eval_every: Steps between judgements of the held-out rows (also after the last step).
        patience: Judgements without improvement before stopping (0: never stop early).
        max_minutes: Wall-clock budget of the fine-tuning (judgements included); None: none.
        seed: Seed of the held-out split and of the batch order.
        learn_attention: Also learn the ranges of the attention matmuls' input quantizers (our
            own: q, k and v, and the probabilities' ``delta`` where their grid is uniform), with
            straight-through (LSQ-style) gradients at ``scale_lr``; False: frozen as the PTQ
            model has them.
        block_loss: Weight of the layer-wise term of the loss: the normalized MSE of every
            transformer block's hidden-state output (blocks found from the model's structure,
            their float outputs checked equal to the teacher's), averaged over blocks, added to
            the output loss (TernaryBERT / KDLSQ-BERT distil low-bit encoders this way); 0: the
            output alone.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: Annotated[int, Field(ge=0, le=10_000_000)] = 300
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    weight_lr: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    scale_lr: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-3
    lr_schedule: Literal[SCHEDULES] = "cosine"  # type: ignore[valid-type]
    loss: Literal[LOSSES] = "auto"  # type: ignore[valid-type]
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    metric: Literal[METRICS] = "auto"  # type: ignore[valid-type]
    rows: Annotated[int, Field(ge=8, le=10_000_000)] = 4096
    held_out: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    eval_every: Annotated[int, Field(ge=1, le=1_000_000)] = 50
    patience: Annotated[int, Field(ge=0, le=1_000_000)] = 4
    max_minutes: Annotated[float, Field(gt=0.0)] | None = None
    seed: Annotated[int, Field(ge=0)] = 0
    learn_attention: bool = True
    block_loss: Annotated[float, Field(ge=0.0, le=1000.0)] = 1.0
