"""A memory budget for calibration (``max_memory``): block inputs/outputs past it go to disk.

Block-wise calibration holds one block's inputs and outputs for every calibration row
(``rows x tokens x width`` floats each). :class:`Spill` keeps them in memory while the process
stays under the budget and writes the rest to memory-mapped files in a temporary folder (read
back by the page cache on use, removed when calibration ends).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING

from slimformer.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where used: the config validates sizes without it
    import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"4GB"`` / ``"512MiB"`` / ``"1e9"`` -> bytes.

    Raises:
        ValueError: Not a positive size with one of the units B, KB, MB, GB, TB, KiB, MiB, GiB,
            TiB.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size: a positive number with a unit among "
                         "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 4GB)")
    return int(float(m.group(1)) * _UNITS[unit])


def rss_bytes() -> int:
    """The resident set size of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Spill:
    """Keeps tensors in memory within a budget, the rest in memory-mapped files.

    Use as a context manager: the folder of the files is removed on exit (tensors read from it
    stay valid while mapped). ``budget`` None: everything stays in memory.
    """

    def __init__(self, budget: int | None, what: str = "calibration"):
        self.limit, self.what = budget, what
        self.dir: str | None = None
        self.files = 0
        self.spilled = 0  # bytes written to files

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself while the process is under the budget, else a file-backed copy."""
        import torch

        if self.limit is None or not isinstance(t, torch.Tensor) or rss_bytes() < self.limit:
            return t
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="slimformer-spill-")
        path = os.path.join(self.dir, f"{self.files}.bin")
        self.files += 1
        t = t.detach().contiguous()
        t.numpy().tofile(path)
        self.spilled += t.numel() * t.element_size()
        return torch.from_file(path, shared=False, size=t.numel(), dtype=t.dtype).view(t.shape)

    def note(self) -> str | None:
        """What went to disk, in words (None: nothing did)."""
        if not self.spilled:
            return None
        return (f"max_memory {self.limit / 1e9:.2f} GB: {self.spilled / 1e9:.2f} GB of block "
                f"inputs/outputs in {self.files} memory-mapped file(s) during {self.what}")


def budget_of(model, max_memory: str | None) -> int | None:
    """The byte budget of ``max_memory`` for ``model`` (None: unbounded).

    Raises:
        ConfigError: The budget is below the model's own weights (the least it can hold).
    """
    if max_memory is None:
        return None
    limit = parse_bytes(max_memory)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    if limit < weights:
        raise ConfigError([f"max_memory: {max_memory} is below the model's own weights "
                           f"({weights:,} bytes); give at least {weights:,} bytes "
                           "(and room for one block's activations)"], "quantize config")
    return limit
