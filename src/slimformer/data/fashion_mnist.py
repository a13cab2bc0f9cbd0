"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, no download).

Splits: ``train`` (60,000 images), ``test`` (10,000), and ``calib``: 1,024 images drawn with a
fixed seed from the train split, so calibration never sees a test image.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from slimformer.errors import DataError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MEAN, STD = 0.2860, 0.3530
CALIB_SIZE, CALIB_SEED = 1024, 1234

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_root() -> Path:
    """Folder of the IDX files; ``SLIMFORMER_FASHION_MNIST`` overrides the Debian location."""
    return Path(os.environ.get("SLIMFORMER_FASHION_MNIST", DEFAULT_ROOT))


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file into a uint8 array of its declared shape."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def load_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28) uint8`` and labels ``(N,) int64`` of a split (train, test, calib)."""
    if split not in ("train", "test", "calib"):
        raise DataError(f"unknown Fashion-MNIST split {split!r}; allowed: train, test, calib")
    root = data_root()
    src = "train" if split == "calib" else split
    paths = [root / name for name in _FILES[src]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. They come from the Debian "
            f"package dataset-fashion-mnist: run `{INSTALL_HINT}` (or set "
            "SLIMFORMER_FASHION_MNIST to a folder holding the four IDX .gz files)."
        )
    images, labels = _read_idx(paths[0]), _read_idx(paths[1]).astype(np.int64)
    if split == "calib":
        idx = np.random.default_rng(CALIB_SEED).choice(len(images), CALIB_SIZE, replace=False)
        images, labels = images[np.sort(idx)], labels[np.sort(idx)]
    return images, labels


def normalize(images: np.ndarray):
    """``(N, 28, 28) uint8`` -> normalized ``torch.FloatTensor (N, 1, 28, 28)``."""
    import torch

    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255.0)
    return x.sub_(MEAN).div_(STD).unsqueeze(1)


def prepare(images: np.ndarray, processor, channels: int = 3, batch: int = 64):
    """``(N, 28, 28) uint8`` -> ``(N, C, H, W)`` float32 by an image processor.

    Args:
        images: Grey images.
        processor: PIL images -> pixel values, e.g.
            :func:`slimformer.data.processor.image_processor` of a model folder.
        channels: 3 (grey copied to RGB, as the processor then expects) or 1.
        batch: Images per processor call.
    """
    import torch
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    chunks = [processor([Image.fromarray(a).convert(mode) for a in images[i:i + batch]])
              for i in range(0, len(images), batch)]
    return torch.cat(chunks) if chunks else torch.zeros(0, channels, 28, 28)
