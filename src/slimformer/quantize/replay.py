"""Model forwards that start at a block: the blocks before it replayed from recorded outputs.

Judging a site's choice at the model output (:func:`~slimformer.quantize.validate.validate_sites`)
runs the held-out rows through the whole model once per site, yet a site changes nothing before
the first block that reads it. :class:`Replay` records every block's output (per call) in a forward
under the choices in force, and a later forward that starts at block ``j`` of a container returns
those recordings from the blocks before ``j`` instead of running them: the model output, hence the
decision, is the same bit for bit, at the cost of the blocks from ``j`` on.

The blocks are those of :func:`~slimformer.quantize.blockwise.containers`. Replay holds only where
each forward calls every block of a container once per batch, in order; :meth:`Replay.check`
verifies it on the first (full) forward, and where it does not hold every forward runs whole.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn


def _copy(out):
    """``out`` with its tensors copied (a tuple or list of them, or one); other objects as they are."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if type(out) in (tuple, list):
        return type(out)(_copy(x) for x in out)
    return out


class Replay:
    """Block outputs recorded under the current choices, replayed by forwards that start later.

    Args:
        model: The float model (the quantizers sit inside it).
        containers: Module paths of the blocks, one list per container, in execution order.
    """

    def __init__(self, model: nn.Module, containers: list[list[str]]):
        self.model = model
        self.containers = [list(c) for c in containers]
        self.kept: dict[str, list] = {}  # block -> its outputs per call, under the current choices
        self.fresh: dict[str, list] = {}  # recorded by the last forward
        self.calls: list[str] = []  # blocks in the order the last forward called them
        self.ok = bool(self.containers)

    def start_of(self, modules: list[str]) -> tuple[int, int] | None:
        """``(container, block)`` of the first block holding one of ``modules``.

        None (a whole forward) when one of them is outside every block, or blocks of several
        containers hold them.
        """
        found = set()
        for m in modules:
            at = next(((c, j) for c, blocks in enumerate(self.containers)
                       for j, b in enumerate(blocks) if m == b or m.startswith(b + ".")), None)
            if at is None:
                return None
            found.add(at)
        if not found or len({c for c, _ in found}) > 1:
            return None
        return min(found)

    @contextmanager
    def forward(self, start: tuple[int, int] | None = None):
        """Inside: forwards record every block's outputs; blocks before ``start`` are replayed.

        ``start`` None (or replay off): every block runs.
        """
        self.fresh, self.calls = {}, []
        skip = set() if start is None or not self.ok else set(self.containers[start[0]][: start[1]])
        saved = []
        for blocks in self.containers:
            for b in blocks:
                mod = self.model.get_submodule(b)
                saved.append((mod, mod.__dict__.get("forward")))
                mod.forward = self._replayed(b) if b in skip else self._recorded(b, mod.forward)
        try:
            yield
        finally:
            for mod, f in saved:
                if f is None:
                    del mod.forward
                else:
                    mod.forward = f

    def _recorded(self, block: str, f: Callable) -> Callable:
        def run(*args, **kwargs):
            out = f(*args, **kwargs)
            self.fresh.setdefault(block, []).append(_copy(out))
            self.calls.append(block)
            return out

        return run

    def _replayed(self, block: str) -> Callable:
        def run(*args, **kwargs):
            got = self.fresh.setdefault(block, [])
            got.append(self.kept[block][len(got)])
            self.calls.append(block)
            return _copy(got[-1])

        return run

    def check(self) -> bool:
        """After a whole forward: whether each container's blocks ran once per batch, in order."""
        order = [b for b in self.calls if any(b in c for c in self.containers)]
        for blocks in self.containers:
            mine = [b for b in order if b in blocks]
            if not mine or len(mine) % len(blocks) or mine != blocks * (len(mine) // len(blocks)):
                self.ok = False
        return self.ok

    def adopt(self) -> None:
        """The last forward's recordings become the current ones (its choices are kept)."""
        self.kept = self.fresh
