"""torch -> hls4ml-ready graph: trace the model (:mod:`.trace`), then the rewrite passes.

The passes (:mod:`.rewrite`) run over the graph in order, each a small match/transform step, as
hls4ml's optimizer passes do; the graph module knows nothing of them.
"""

from __future__ import annotations

import torch
from torch import nn

from slimformer.hardware.graph import HlsGraph
from slimformer.hardware.rewrite import (
    expand_gelu,
    fold_transposes_into_einsums,
    fuse_scale_into_softmax,
    matmul_to_einsum,
)
from slimformer.hardware.trace import trace_ops

PASSES = (expand_gelu, matmul_to_einsum, fuse_scale_into_softmax, fold_transposes_into_einsums)


def lower(model: nn.Module, example: dict[str, torch.Tensor], gelu: str = "refuse") -> HlsGraph:
    """Trace ``model`` on ``example`` (batch 1) and lower it to an :class:`HlsGraph`.

    ``gelu="sigmoid"`` substitutes ``x * sigmoid(1.702 x)`` for GELU (explicit, approximate).

    Raises:
        HardwareError: Listing every unsupported operation by module path, and the supported set.
    """
    graph = trace_ops(model, example, gelu)
    for apply in PASSES:
        apply(graph)
    return graph
