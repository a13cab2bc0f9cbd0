"""UPop-style unified, progressive structured pruning, and physical slicing.

Public API (loaded lazily, so importing the package stays cheap)::

    from slimformer.prune import PruneConfig, prune
    result = prune(model, PruneConfig(ratio=0.5), train_data, eval_data)
    result.model        # fewer heads, smaller MLPs: really smaller tensors
    save_pruned(result.model, "out/p", model_spec, result.spec); loaded = load_pruned("out/p")
    slice_model(model, structure, SliceSpec(heads={0: (0, 2)}, mlp={1: (0, 1, 5)}))
"""

from __future__ import annotations

from slimformer.lazy import lazy_getattr
from slimformer.prune.config import PruneConfig

_LAZY = {
    "prune": "slimformer.prune.api",
    "PruneResult": "slimformer.prune.api",
    "SliceSpec": "slimformer.prune.slicing",
    "slice_model": "slimformer.prune.slicing",
    "sliceable": "slimformer.prune.slicing",
    "save_pruned": "slimformer.prune.serialize",
    "load_pruned": "slimformer.prune.serialize",
}

__all__ = ["PruneConfig", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
