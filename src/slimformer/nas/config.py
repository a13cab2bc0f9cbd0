"""Typed configuration of the multi-objective search (also the recipe's ``search`` stage)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimformer.quantize.config import QuantConfig

OBJECTIVES = ("accuracy", "latency", "size", "macs")
PREDICTORS = ("auto", "ridge", "svr", "mlp")
BitChoice = Literal[2, 3, 4, 5, 6, 7, 8, "float"]


class SpaceConfig(BaseModel):
    """The user's restrictions of the search space (per layer, found from the structure map).

    Attributes:
        heads: Fractions of each attention site's heads that may be kept (rounded up, >= 1 head).
        mlp: Fractions of each MLP's hidden units that may be kept (rounded up, >= 1 unit).
        skip_blocks: Whether whole residual blocks may be dropped (elastic depth).
        min_blocks: Fewest residual blocks a sub-network keeps.
        fixed_blocks: Indices of blocks that are never dropped.
        weight_bits: Per-layer choices; ``float`` leaves the layer unquantized.
        act_bits: Per-layer activation bit choices (2..8).
        embedding_bits: Choices for the model's embedding tables (``nn.Embedding``), one per
            sub-network: per-row weight-only quantization at 2..8 bits, ``float`` keeps them.
            Large vocabularies dominate the size of small text models. Ignored (``float``) for
            models without embedding tables.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    heads: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.5, 0.75, 1.0])
    mlp: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    skip_blocks: bool = True
    min_blocks: Annotated[int, Field(ge=1)] = 1
    fixed_blocks: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    weight_bits: list[BitChoice] = Field(default_factory=lambda: [4, 8])
    act_bits: list[Annotated[int, Field(ge=2, le=8)]] = Field(default_factory=lambda: [8])
    embedding_bits: list[BitChoice] = Field(default_factory=lambda: [4, 8, "float"])


class SearchConfig(BaseModel):
    """How to train the super-network and search it.

    Attributes:
        objectives: ``accuracy`` (maximized) plus any of ``latency`` (ONNX Runtime, ms),
            ``size`` (bytes as deployed, weights at their bit-width) and ``macs`` (per sample).
        space: Restrictions of the search space.
        train_steps: Super-network fine-tuning steps (sandwich rule); 0 uses the model as is.
        sandwich: Sub-networks per step: the largest, the smallest and ``sandwich - 2`` random.
        batch_size / lr: Fine-tuning batch size and AdamW learning rate.
        distill: Weight of the distillation loss from the largest sub-network (in-place KD).
        importance_batches: Batches used to rank heads and MLP units before fine-tuning.
        samples: Sub-networks measured (randomly drawn) to fit the predictors.
        holdout: Fraction of the measured sample kept out of the fit to report rank correlation.
        predictor: ``ridge``, ``svr``, ``mlp`` or ``auto`` (best held-out rank correlation).
        nsga_trials / population: NSGA-II budget on the predictors.
        front_max: Most predicted-Pareto sub-networks measured for real.
        eval_limit: Rows of the evaluation data used to measure a sub-network.
        quant: How each sub-network is quantized (:class:`~slimformer.quantize.QuantConfig`;
            its bit-widths are the sub-network's, per layer group, and its embedding bits).
            With ``repquant``, ``recon_steps`` (learned weight rounding) is what keeps 4-bit
            weights close to the float sub-network and most of the measuring time; a
            ``uniform`` softmax is the fast form in ONNX Runtime on CPUs.
        latency_batch / latency_repeats: ONNX Runtime latency measurement.
        storage: Optuna storage: a journal file path (default, ``{study}`` is filled in) or a
            database URL (``sqlite:///f.db``, ``postgresql://user@host/db``) shared by workers.
        study: Study name; a study resumes when it exists with the same settings.
        supernet_path: Where the fine-tuned super-network is saved (``{study}`` filled in).
        choose: Front point exported: best accuracy within ``max_drop`` of the full model's
            measured accuracy with the smallest value of the first non-accuracy objective.
        max_drop: Accuracy drop (fraction, 0.01 = 1 point) allowed for the chosen point.
        seed: Seed of sampling, training and NSGA-II.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    objectives: list[str] = Field(default_factory=lambda: ["accuracy", "size"])
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    train_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 200
    sandwich: Annotated[int, Field(ge=1, le=16)] = 3
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 5e-5
    distill: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    importance_batches: Annotated[int, Field(ge=0, le=1000)] = 4
    samples: Annotated[int, Field(ge=4, le=100_000)] = 30
    holdout: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    predictor: Literal[PREDICTORS] = "auto"  # type: ignore[valid-type]
    nsga_trials: Annotated[int, Field(ge=1, le=1_000_000)] = 2000
    population: Annotated[int, Field(ge=2, le=10_000)] = 50
    front_max: Annotated[int, Field(ge=1, le=1000)] = 8
    eval_limit: Annotated[int, Field(ge=1)] | None = 1000
    quant: QuantConfig = Field(default_factory=QuantConfig)
    latency_batch: Annotated[int, Field(ge=1, le=1024)] = 1
    latency_repeats: Annotated[int, Field(ge=1, le=1000)] = 20
    storage: str = "nas-studies/{study}.journal"
    study: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "search"
    supernet_path: str = "nas-studies/{study}.supernet.pt"
    max_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    seed: int = 0

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in OBJECTIVES]
        if bad:
            raise ValueError(f"unknown objective(s) {', '.join(map(repr, bad))}; allowed: "
                             f"{', '.join(OBJECTIVES)}")
        if "accuracy" not in v:
            raise ValueError("objectives must include 'accuracy' (the task metric) and at least "
                             f"one of {', '.join(OBJECTIVES[1:])}")
        if len(v) < 2 or len(set(v)) != len(v):
            raise ValueError("objectives: give 'accuracy' plus at least one other objective, "
                             "each once")
        return v

    @field_validator("storage", "supernet_path")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        import string

        try:
            names = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as exc:
            raise ValueError(f"{exc}; the only placeholder is {{study}} (write "
                             "{{ and }} for literal braces)") from None
        bad = [n for n in names if n != "study"]
        if bad:
            raise ValueError("unknown placeholder(s) "
                             f"{', '.join('{' + n + '}' for n in bad)}; the only placeholder is "
                             "{study}")
        return v

    def storage_url(self) -> str:
        """The storage with ``{study}`` filled in."""
        return self.storage.format(study=self.study)

    def supernet_file(self) -> str:
        """The super-network checkpoint path with ``{study}`` filled in."""
        return self.supernet_path.format(study=self.study)

    def fingerprint(self, model_id: str = "") -> str:
        """Hash of the model and the settings that change what a measured trial means."""
        import hashlib
        import json

        keep = self.model_dump(mode="json", include={
            "objectives", "space", "train_steps", "sandwich", "batch_size", "lr", "distill",
            "importance_batches", "eval_limit", "quant", "latency_batch", "seed"})
        text = json.dumps(keep, sort_keys=True) + model_id
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def supernet_fingerprint(self) -> str:
        """Hash of the settings that change the fine-tuned super-network (not its measuring)."""
        import hashlib
        import json

        keep = self.model_dump(mode="json", include={
            "space", "train_steps", "sandwich", "batch_size", "lr", "distill",
            "importance_batches", "seed"})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
