"""Seeded work that leaves the caller's random number generators as they were.

A library call seeds torch where its results must be reproducible (a model built from a seed,
pruning, super-network training); :func:`keeps_rng` runs it on a forked generator, so the seeds
it sets stay inside the call and the results are the same as with the global seed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def keeps_rng(fn: F) -> F:
    """``fn`` run inside ``torch.random.fork_rng()``: torch's global RNG state is restored after."""

    @functools.wraps(fn)
    def forked(*args, **kwargs):
        import torch

        with torch.random.fork_rng():
            return fn(*args, **kwargs)

    return forked  # type: ignore[return-value]
