"""The model's classes: how many (the width of its class scores) and their names, if it records any.

Names come from the model, never from module names: the ``id2label`` of a Hugging Face config
found on the model or any sub-module (the generic ``LABEL_0, LABEL_1, ...`` that transformers
fills in count as no names), else the class names of a zoo model's built-in data set.
:func:`check_labels` then numbers and checks a data set's labels against them
(:func:`slimformer.data.labels.align_labels`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from slimformer.data.datasets import DATASETS, TensorDictDataset
from slimformer.data.labels import align_labels
from slimformer.errors import DataError
from slimformer.models import outputs as O
from slimformer.models.evaluate import run_batch

_GENERIC = re.compile(r"LABEL_\d+")


@dataclass(frozen=True)
class ModelClasses:
    """The model's classes: ``count`` (class-score width), ``names`` in index order (or None)."""

    count: int
    names: tuple[str, ...] | None = None
    source: str = ""  # where the names come from, for messages


def config_names(module: torch.nn.Module) -> tuple[str, ...] | None:
    """Class names of the first ``config.id2label`` on ``module`` or a sub-module, if meaningful.

    Returns ``None`` for no config, generic ``LABEL_i`` names, or keys that are not ``0..n-1``.
    """
    for m in module.modules():
        id2label = getattr(getattr(m, "config", None), "id2label", None)
        if not id2label:
            continue
        try:
            table = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError):
            return None
        if sorted(table) != list(range(len(table))):
            return None
        names = tuple(table[i] for i in range(len(table)))
        return None if all(_GENERIC.fullmatch(n) for n in names) else names
    return None


def model_classes(module: torch.nn.Module, scores: torch.Tensor, dataset: str | None = None) \
        -> ModelClasses:
    """The classes of a model whose class scores (one batch, ``(B, C)``) are ``scores``.

    Args:
        module: The model (its ``id2label`` is looked up).
        scores: Its class scores for a batch, ``(..., C)``.
        dataset: The built-in data set of a zoo model, whose class names are the model's.

    Raises:
        DataError: The model's ``id2label`` names another number of classes than its scores.
    """
    count = int(scores.shape[-1])
    names, source = config_names(module), "its config's id2label"
    if names is None and dataset in DATASETS:
        names, source = DATASETS[dataset].classes, f"its data set {dataset!r}"
        if len(names) != count:
            names = None
    if names is not None and len(names) != count:
        raise DataError(f"the model's {source} names {len(names)} classes but its class scores "
                        f"have {count}: fix the model's config (id2label / num_labels)")
    return ModelClasses(count, names, source if names else "")


def check_labels(module: torch.nn.Module, ds: TensorDictDataset, dataset: str | None = None,
                 where: str = "data") -> str | None:
    """Number ``ds``'s labels in the model's class order and check them (in place).

    Nothing to do without labels, or when the model has no class scores for them (it is then
    judged on all its outputs against its float model). Runs the model on two rows.

    Returns:
        A note when labels were numbered alphabetically (the model records no names), else None.

    Raises:
        DataError: See :func:`slimformer.data.labels.align_labels`.
    """
    if ds.labels is None or not len(ds):
        return None
    with torch.no_grad():
        out = run_batch(module, {k: v[:2] for k, v in ds.inputs.items()})
    scores = O.class_scores(out)
    if not O.fits_labels(scores, ds.labels[:2]):
        return None
    classes = model_classes(module, scores, dataset)
    return align_labels(ds, classes.count, classes.names, where)
