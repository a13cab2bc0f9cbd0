"""Multi-objective search over sub-networks and per-layer bit-widths (SimQ-NAS / InstaTune).

Public API (loaded lazily, so importing the package stays cheap)::

    from slimformer.nas import SearchConfig, search
    result = search(model, SearchConfig(objectives=["accuracy", "latency"]), train, val)
    result.front        # the measured Pareto front
    result.model        # the chosen sub-network, quantized
"""

from __future__ import annotations

from slimformer.lazy import lazy_getattr
from slimformer.nas.config import SearchConfig, SpaceConfig

_LAZY = {
    "search": "slimformer.nas.api",
    "SearchResult": "slimformer.nas.api",
}

__all__ = ["SearchConfig", "SpaceConfig", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
