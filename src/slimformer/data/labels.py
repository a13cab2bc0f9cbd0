"""Labels against the model's classes: numbering class names the model's way, and range checks.

A data set's labels are class indices of the *model*: index ``i`` is scored against the model's
``i``-th class score. Where the data gives class *names* (image class folders, string labels in a
text file or table), the loader numbers them first by the data spec's ``classes`` list (which is
then, by definition, the model's class order) or else alphabetically
(:attr:`~slimformer.data.datasets.TensorDictDataset.label_names` says which). :func:`align_labels`
then renumbers alphabetically numbered names through the model's own class names (a Hugging Face
``id2label``, a zoo model's data set classes): exact names first, else names equal up to case;
names that are all whole numbers (folders ``0/ ... 9/``) are the class indices themselves. Where
the model records no names, the alphabetical numbering stays and a note says so. Last, every
label must lie in ``[0, number of classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import DataError

SHOWN = 20  # names / labels listed in a message


def _listed(items: Sequence, indexed: bool = False) -> str:
    text = [f"{i} {x}" if indexed else str(x) for i, x in enumerate(items)][:SHOWN]
    return ", ".join(text) + (f", ... ({len(items)} in all)" if len(items) > SHOWN else "")


def model_side(n_classes: int, names: Sequence[str] | None) -> str:
    """``"10 classes (0 T-shirt/top, 1 Trouser, ...)"``: the model's side of a message."""
    return f"{n_classes} classes" + (f" ({_listed(names, indexed=True)})" if names else
                                     " (indices 0 to " f"{n_classes - 1}; it records no names)")


def _by_name(data: Sequence[str], model: Sequence[str]) -> list[int] | None:
    """Model index of each data name: exact, else equal up to case (when unambiguous)."""
    exact = {n: i for i, n in enumerate(model)}
    folded: dict[str, int | None] = {}
    for i, n in enumerate(model):
        folded[n.casefold()] = None if n.casefold() in folded else i  # None: ambiguous
    out = []
    for n in data:
        i = exact.get(n, folded.get(n.casefold()))
        if i is None:
            return None
        out.append(i)
    return out


def _as_indices(data: Sequence[str]) -> list[int] | None:
    """The names as class indices when every one is a whole number (folders ``0/ ... 9/``)."""
    return [int(n) for n in data] if all(n.isdigit() for n in data) else None


def align_labels(ds: TensorDictDataset, n_classes: int, names: Sequence[str] | None,
                 where: str = "data") -> str | None:
    """Renumber ``ds``'s labels into the model's class order (in place) and check their range.

    Args:
        ds: Rows with ``(N,)`` labels (or none: nothing to do) and ``label_names`` telling how
            class names in the data were numbered.
        n_classes: The model's number of classes (the width of its class scores).
        names: The model's class names in index order (``len == n_classes``), or ``None``.
        where: What the data is, for messages.

    Returns:
        A note for the report when labels were numbered alphabetically because the model records
        no class names, else ``None``.

    Raises:
        DataError: A class name the model does not know, a ``classes`` list of another length
            than the model's classes, or a label outside ``[0, n_classes)``; each lists the
            data's side and the model's.
    """
    if ds.labels is None:
        return None
    note = None
    data_names = tuple(ds.classes or ())
    if ds.label_names == "given" and len(data_names) != n_classes:
        raise DataError(f"{where}: the data spec's classes list has {len(data_names)} names "
                        f"({_listed(data_names)}); it gives the model's class order, and the model "
                        f"has {model_side(n_classes, names)}")
    if ds.label_names == "sorted":
        index = (_by_name(data_names, names) if names else None) or _as_indices(data_names)
        if index is None and names:
            unknown = [n for n in data_names if _by_name([n], names) is None]
            raise DataError(f"{where}: the class name(s) {_listed(unknown)} are not classes of the "
                            f"model; the data's classes: {_listed(data_names)}; the model has "
                            f"{model_side(n_classes, names)}. Rename them, or give the data spec "
                            f"a classes list (the data's names in the model's class order)")
        if index is None:
            note = (f"{where}: the model records no class names, so the data's class names were "
                    f"numbered alphabetically ({_listed(data_names, indexed=True)}); if the "
                    f"model's classes are in another order, give the data spec a classes list")
        else:
            ds.labels = torch.tensor(index, dtype=torch.long)[ds.labels]
            ds.classes = tuple(names) if names else None
        ds.label_names = None  # labels are model class indices from here on
    _check_range(ds, n_classes, names, where)
    return note


def _check_range(ds: TensorDictDataset, n_classes: int, names: Sequence[str] | None,
                 where: str) -> None:
    y = ds.labels
    bad = (y < 0) | (y >= n_classes)
    if not bool(bad.any()):
        return
    found = sorted({int(v) for v in y.unique()})
    outside = sorted({int(v) for v in y[bad].unique()})
    named = ""
    if ds.classes is not None and len(ds.classes) > max(outside) >= 0:
        named = f" (the data's names for them: {_listed([ds.classes[i] for i in outside])})"
    raise DataError(f"{where}: label(s) {_listed(outside)}{named} lie outside the model's "
                    f"classes [0, {n_classes}); the labels found: {_listed(found)}; the model has "
                    f"{model_side(n_classes, names)}")
