"""A model folder's own image processor (``preprocessor_config.json``) as a function of images.

Used for the user's image folders (:mod:`slimformer.data.images`) and for built-in image sets
prepared for a Hugging Face model (:mod:`slimformer.data.datasets`): transformers'
``AutoImageProcessor`` read from the local folder only, its sizes bounded by
:data:`slimformer.store.limits.MAX_IMAGE_SIZE`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from slimformer.errors import DataError
from slimformer.store import limits

CONFIG = "preprocessor_config.json"


def check_size(where, key: str, side: int) -> None:
    """Refuse an image side over :data:`~slimformer.store.limits.MAX_IMAGE_SIZE` pixels."""
    if side > limits.MAX_IMAGE_SIZE:
        raise DataError(f"{where}: {key} {side} pixels a side is over the limit of "
                        f"{limits.MAX_IMAGE_SIZE} (slimformer.store.limits.MAX_IMAGE_SIZE)")


def has_processor(folder) -> bool:
    """Whether ``folder`` holds an image processor config."""
    return folder is not None and (Path(folder) / CONFIG).is_file()


def image_processor(folder: str | Path) -> Callable[[list], torch.Tensor]:
    """The image processor of ``folder``: PIL images -> ``(N, C, H, W)`` float32 pixel values.

    Raises:
        DataError: The config cannot be loaded, asks for sides over the limit, or the processor
            fails on the images given to it.
    """
    from transformers import AutoImageProcessor

    folder = Path(folder)
    try:
        proc = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{folder}: cannot load its image processor config ({exc})") from None
    for key in ("size", "crop_size"):  # an int, a dict or a SizeDict of sides (and pixel counts)
        value = getattr(proc, key, None)
        items = value.items() if isinstance(value, dict) else vars(value).items() \
            if hasattr(value, "__dict__") else [("", value)]
        for name, side in items:
            if isinstance(side, int) and not name.endswith("pixels"):
                check_size(folder / CONFIG, key, side)

    def run(images: list) -> torch.Tensor:
        try:
            return proc(images=images, return_tensors="pt")["pixel_values"].float()
        except (ValueError, RuntimeError, TypeError) as exc:
            raise DataError(f"the image processor of {folder} failed on these images ({exc}); give "
                            f"channels / size / mean / std explicitly") from None

    return run
