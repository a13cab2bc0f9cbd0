"""Typed configuration of structured pruning (also the recipe's ``prune`` stage)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

STRUCTURES = ("heads", "dims", "mlp")
METHODS = ("upop", "magnitude")


class PruneConfig(BaseModel):
    """How to prune.

    Attributes:
        ratio: Fraction of the prunable cost to remove, in (0, 1): ``0.5`` halves the parameters
            (or MACs, see ``target``) of the attention heads and MLP units that can be cut;
            embeddings, norms and heads of the model are not prunable and are not counted.
            ``1 - 1/x`` gives an x-fold reduction of the prunable part.
        target: ``params`` or ``macs`` (per sample, measured on the example inputs).
        structures: What may be cut: attention ``heads`` (whole heads; whole key/value groups
            under grouped-query attention), head ``dims`` (dim j of every head of a layer; q/k
            share theirs, v is cut apart where the model allows) and ``mlp`` hidden units.
        method: ``upop`` (progressive search with learnable masks, all units of all layers and
            towers ranked together) or ``magnitude`` (baseline: every site cut by the same
            fraction, units of smallest weight norm first).
        search_steps: Training steps of the UPop search (T); unused by ``magnitude``.
        interval: Mask update every ``interval`` search steps.
        sparsity_weight: Weight of the L1 loss on the masks during the search.
        score: How the search ranks units at each mask update. ``gradient`` (UPop): the mask
            gradients of the last interval, standardized per kind; the largest are cut.
            ``taylor``: the squared mask gradient of every step summed over the interval (a
            Fisher / first-order Taylor estimate of the loss a unit's removal costs, in loss
            units, so kinds compare without standardizing), per unit of cost; the smallest are
            cut. The signed gradient averages to ~0 near a minimum, its square does not.
        score_momentum: 0 ranks units by the mask gradients of the last interval (UPop); m > 0
            by ``sum_k m^k g_(t-k)`` over past intervals (less noise from small batches).
        finetune_steps: Training steps of the sliced model (0: none).
        batch_size / lr / search_lr / weight_decay / warmup: Optimizer settings (AdamW, cosine).
        distill: Weight in [0, 1] of knowledge distillation from the unpruned model (KL of
            temperature-softened outputs); the rest is cross-entropy on the labels.
        temperature: Distillation temperature.
        checkpoint_every: Fine-tuning steps between checkpoints when a checkpoint folder is given.
        seed: Seed of data order and initial state.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    target: Literal["params", "macs"] = "params"
    structures: list[str] = Field(default_factory=lambda: ["heads", "mlp"])
    method: Literal[METHODS] = "upop"  # type: ignore[valid-type]
    search_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 200
    interval: Annotated[int, Field(ge=1, le=10_000)] = 10
    sparsity_weight: Annotated[float, Field(ge=0.0)] = 1e-4
    score: Literal["gradient", "taylor"] = "taylor"  # the README results use it
    score_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    finetune_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 500
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 3e-4
    search_lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    warmup: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    distill: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 2.0
    checkpoint_every: Annotated[int, Field(ge=1)] = 100
    seed: int = 0

    @field_validator("structures")
    @classmethod
    def _structures(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in STRUCTURES]
        if bad or not v:
            raise ValueError(f"unknown structure(s) {bad}; allowed: {', '.join(STRUCTURES)} "
                             "(at least one)" if bad else "give at least one of: "
                             + ", ".join(STRUCTURES))
        return list(dict.fromkeys(v))

    @property
    def needs_training(self) -> bool:
        """Whether the run trains (and so needs training data)."""
        return self.method == "upop" or self.finetune_steps > 0
