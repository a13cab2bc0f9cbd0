"""Which parameters a quantized model quantizes, and why each other one stays float.

Every parameter of the model is counted once (a tied weight under its first name): quantized
(a matmul weight with its :class:`~slimformer.quantize.state.LinearQuant`, or an embedding table
under ``embedding_bits``) or left float with a reason. The quantize result, its notes and the
stage record carry the counts, e.g. ``weights quantized: 27,648 of 28,384 parameters; left float:
embedding tables 640 (lookups, not matmuls; embedding_bits not set), vectors 96 (...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

EMBEDDINGS = "embedding tables (lookups, not matmuls; embedding_bits not set)"
VECTORS = "vectors: norm scales, biases, 1-D parameters (elementwise, not matmul weights)"
UNUSED = "no matmul in the traced forward reads them (e.g. position tables, learned tokens)"
KEEP_FLOAT = "keep_float patterns"


@dataclass
class WeightCoverage:
    """Parameter counts of a quantized model.

    Attributes:
        quantized: Parameters (elements) whose weights are quantized.
        total: All parameters of the model (each tensor once).
        left_float: Reason -> parameters left float for it.
        float_weights: ``(name, parameters, reason)`` of every 2+-axis parameter left float.
    """

    quantized: int
    total: int
    left_float: dict[str, int] = field(default_factory=dict)
    float_weights: list[tuple[str, int, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``weights quantized: Q of T parameters; left float: reason N, ...``."""
        rest = "; left float: " + ", ".join(f"{r} {n:,}" for r, n in self.left_float.items()) \
            if self.left_float else "; none left float"
        return f"weights quantized: {self.quantized:,} of {self.total:,} parameters{rest}"

    def to_dict(self) -> dict:
        """JSON-ready form (for the stage record)."""
        return {"quantized": self.quantized, "total": self.total,
                "left_float": dict(self.left_float),
                "float_weights": [list(w) for w in self.float_weights]}


def weight_coverage(model: nn.Module, state, reasons: dict[str, str]) -> WeightCoverage:
    """Count ``model``'s parameters as quantized by ``state`` or float with a reason.

    Args:
        model: The wrapped model.
        state: Its :class:`~slimformer.quantize.state.QuantState`.
        reasons: Parameter name -> why build() left this found matmul weight float.
    """
    quantized_ids = {id(lq.param[0]) for lq in state.linears.values()}
    quantized_ids |= {id(e.param[0]) for e in state.embeddings.values()}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    cov = WeightCoverage(0, 0)
    for name, p in model.named_parameters():  # each tensor once
        n = p.numel()
        cov.total += n
        if id(p) in quantized_ids:
            cov.quantized += n
            continue
        if name in reasons:
            why = reasons[name]
        elif id(p) in tables:
            why = EMBEDDINGS
        elif p.dim() < 2:
            why = VECTORS
        else:
            why = UNUSED
        cov.left_float[why] = cov.left_float.get(why, 0) + n
        if p.dim() >= 2:
            cov.float_weights.append((name, n, why))
    return cov
