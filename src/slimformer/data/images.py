"""A folder of images as model inputs ``{name: (N, C, H, W)}`` float32, with labels if in class folders.

Layouts: ``root/<class>/**/*.png`` (labels = sorted class folder names, or the spec's ``classes``;
renumbered into the model's class order by :mod:`slimformer.data.labels`) or ``root/*.png`` (no
labels). Preprocessing follows the model's image processor config
(``preprocessor_config.json``, read by transformers' ``AutoImageProcessor``) or explicit
``size`` / ``mean`` / ``std`` (resize bilinear, scale to [0, 1], normalize per channel).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.data.processor import check_size, has_processor, image_processor
from slimformer.errors import DataError
from slimformer.store import limits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BATCH = 64


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    named = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(limits.regular(p, "an image file", DataError) for p in named)


def list_images(root: Path, classes: list[str] | None = None) \
        -> tuple[list[Path], list[int] | None, tuple[str, ...] | None]:
    """Image files, their class indices (None when flat) and the class names, round-robin by class.

    Rows alternate between classes (first image of each class, then the second, ...), so the
    first ``limit`` rows cover all classes.
    """
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of images")
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    flat = _images_in(root, recursive=False)
    if dirs and flat:
        raise DataError(f"{root}: holds both images ({flat[0].name}, ...) and sub-folders "
                        f"({dirs[0].name}, ...); put every image in a class folder, or none")
    if not dirs:
        if not flat:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
        return flat, None, None
    names = [d.name for d in dirs]
    order = tuple(classes) if classes is not None else tuple(names)
    unknown = [n for n in names if n not in order]
    if unknown:
        raise DataError(f"{root}: class folder(s) {', '.join(map(repr, unknown))} not among the "
                        f"classes {', '.join(order)}")
    per_class = []
    for d in dirs:
        files = _images_in(d, recursive=True)
        if not files:
            raise DataError(f"{d}: class folder without images ({', '.join(IMAGE_SUFFIXES)})")
        per_class.append([(f, order.index(d.name)) for f in files])
    rows = [r for k in range(max(map(len, per_class))) for c in per_class if k < len(c) for r in [c[k]]]
    return [f for f, _ in rows], [y for _, y in rows], order


def _open(path: Path, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def _input_name(spec, model_inputs) -> str:
    if spec.input is not None:
        return spec.input
    if model_inputs:
        images = [k for k, s in model_inputs.items() if s.dtype == "float32" and len(s.shape) == 4]
        if len(images) == 1:
            return images[0]
        if not images:
            raise DataError(f"{spec.path}: images need a model input of shape (B, C, H, W); the "
                            f"model's inputs: {', '.join(model_inputs)}")
        raise DataError(f"{spec.path}: which input takes the images? give input: NAME, one of "
                        f"{', '.join(images)}")
    return "pixel_values"


def _explicit(spec, model_shape, channels: int) -> Callable[[list], torch.Tensor]:
    from PIL import Image

    if spec.mean is None or spec.std is None:
        raise DataError(f"{spec.path}: explicit image preprocessing needs both mean and std (one value "
                        f"or one per channel), e.g. mean: [0.5], std: [0.5]")
    size = spec.size or (tuple(model_shape[2:]) if model_shape else None)
    if size is None:
        raise DataError(f"{spec.path}: give size: [height, width]; the model's input size is unknown")
    h, w = (size, size) if isinstance(size, int) else size
    check_size(spec.path, "size", max(h, w))
    stats = []
    for name, v in (("mean", spec.mean), ("std", spec.std)):
        if len(v) not in (1, channels):
            raise DataError(f"{spec.path}: {name} has {len(v)} values; give 1 or {channels} (channels)")
        stats.append(np.asarray(v, np.float32).reshape(-1, 1, 1))

    def run(images: list) -> torch.Tensor:
        arrays = []
        for im in images:
            a = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), np.float32) / 255.0
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
            arrays.append((a - stats[0]) / stats[1])
        return torch.from_numpy(np.stack(arrays))

    return run


def load_image_folder(spec, model_inputs=None, model_dir=None, limit: int | None = None) -> TensorDictDataset:
    """Decode and preprocess the images of an ``ImageFolderData`` spec.

    Returns:
        ``{input: (N, C, H, W)}`` float32 and ``(N,)`` labels for class folders (else none).
    """
    files, labels, classes = list_images(Path(spec.path), spec.classes)
    if limit is not None:
        files, labels = files[:limit], labels[:limit] if labels is not None else None
    name = _input_name(spec, model_inputs)
    model_shape = model_inputs[name].shape if model_inputs and name in model_inputs else None
    channels = spec.channels or (model_shape[1] if model_shape and model_shape[1] in (1, 3) else 3)
    explicit = spec.mean is not None or spec.std is not None or spec.size is not None
    folder = Path(spec.processor) if spec.processor else Path(model_dir) if model_dir else None
    if not explicit and not has_processor(folder):
        where = (f"{folder} has no preprocessor_config.json" if folder
                 else "the model has no image processor config")
        raise DataError(f"{spec.path}: {where}; give the preprocessing: size, mean and std (and "
                        f"channels: 1 for grey)")
    run = _explicit(spec, model_shape, channels) if explicit else image_processor(folder)
    mode = "L" if channels == 1 else "RGB"
    chunks = [run([_open(f, mode) for f in files[i:i + BATCH]]) for i in range(0, len(files), BATCH)]
    y = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    numbered = "given" if spec.classes is not None else "sorted"  # folder names -> indices
    return TensorDictDataset({name: torch.cat(chunks)}, y, classes, numbered)
