"""Atomic writing: a failed run leaves no half-written report or model file.

``atomic_path`` (one file) and ``atomic_dir`` (a whole folder, see
:func:`slimformer.report.outdir.staged_dir`: it never replaces a folder slimformer did not write).
"""

from __future__ import annotations

import os
from pathlib import Path

from slimformer.report.outdir import atomic_path
from slimformer.report.outdir import staged_dir as atomic_dir

__all__ = ["atomic_dir", "atomic_path", "readable", "write_text_atomic"]


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def readable(path: str | Path) -> None:
    """Give ``path`` the mode a plain new file gets (0666 less the umask).

    safetensors writes through a private temporary file (mode 0600), so a saved model would be
    unreadable to the user's group; artifacts are meant to be shared and deployed.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
