"""The user's own data: typed source specs, loading them for a model, and a seeded split.

A source is one of five kinds (the ``kind`` tag; inferred from the path when left out):

- ``builtin``: a built-in data set by name (:data:`~slimformer.data.datasets.DATASETS`);
- ``images``: a folder of images, in class sub-folders (labels = sorted folder names) or flat;
- ``text``: CSV, TSV, JSONL or plain text (one row per line), tokenized by the model's tokenizer;
- ``table``: a Hugging Face ``datasets`` folder (``save_to_disk``), ``.parquet`` or ``.arrow``;
- ``tensors``: ``.safetensors`` or ``.npz`` whose keys are the model's input names.

:func:`load_source` turns a source into a :class:`~slimformer.data.datasets.TensorDictDataset`
checked against the model's inputs; :func:`split_source` splits one source into disjoint
calibration and evaluation rows.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import torch

from slimformer.data import tabular
from slimformer.data.datasets import DATASETS, TensorDictDataset, get_dataset
from slimformer.data.source_spec import (  # noqa: F401 - the public names of the source specs
    BUILTIN_NAMES,
    BuiltinData,
    DataSource,
    ImageFolderData,
    InputLike,
    TableData,
    TensorFileData,
    TextFileData,
    _Source,
    parse_source,
)
from slimformer.errors import DataError
from slimformer.store import limits


def load_source(source, model_inputs: Mapping[str, InputLike] | None = None,
                model_dir: str | Path | None = None, *, accepts: Collection[str] | None = None,
                limit: int | None = None) -> TensorDictDataset:
    """Load a data source as rows of model inputs, checked against the model.

    Args:
        source: A spec from :func:`parse_source`, or anything it accepts (path, name, mapping).
        model_inputs: The model's ``{name: InputSpec}`` (``LoadedModel.input_specs``); ``None``
            skips the checks.
        model_dir: The model's Hugging Face directory (tokenizer, image processor config), if any.
        accepts: Names of all the model's forward arguments (extra tokenizer outputs such as
            ``token_type_ids`` are kept when listed here or in ``model_inputs``).
        limit: Keep only the first ``limit`` rows (before decoding or tokenizing).

    Returns:
        A data set of ``{name: (N, ...)}`` inputs and ``(N,)`` labels (or none).

    Raises:
        DataError: Unreadable or malformed data, naming the file, row and column; data that does
            not fit the model, naming the model's inputs.
    """
    spec = source if isinstance(source, _Source) else parse_source(source)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    if isinstance(spec, BuiltinData):
        ds = get_dataset(spec.name, spec.split, limit)
        if ds.classes is None:
            ds.classes = DATASETS[spec.name].classes
        where = f"built-in data set {spec.name!r}"
    else:
        where = spec.path
        if not Path(spec.path).exists():
            raise DataError(f"{spec.path}: no such file or folder")
        _check_paths(spec)
        ds = _load(spec, model_inputs, model_dir, accepts, limit)
    if model_inputs is not None:
        check_inputs(ds, model_inputs, accepts, where)
    return ds


def _check_paths(spec) -> None:
    """Refuse FIFOs, devices and sockets (links followed) before anything opens them."""
    folder = isinstance(spec, (ImageFolderData, TableData))
    what = "an image folder" if isinstance(spec, ImageFolderData) else \
        "a data file or datasets folder" if folder else "a data file"
    path = limits.regular(spec.path, what, DataError, folder=folder)
    if isinstance(spec, TableData) and path.is_dir():  # datasets opens the files inside
        for p in sorted(path.rglob("*")):
            limits.regular(p, "a file of a datasets folder", DataError, folder=True)


def _load(spec, model_inputs, model_dir, accepts, limit) -> TensorDictDataset:
    keep = None if model_inputs is None else set(model_inputs) | set(accepts or ())
    if isinstance(spec, ImageFolderData):
        from slimformer.data.images import load_image_folder

        return load_image_folder(spec, model_inputs, model_dir, limit)
    if isinstance(spec, TensorFileData):
        from slimformer.data.tensorfiles import load_tensor_file

        return load_tensor_file(spec, limit)
    table = tabular.read_text_file(spec, limit) if isinstance(spec, TextFileData) else \
        tabular.read_table(spec, limit)
    return tabular.encode(table, spec, model_dir, keep)


def check_inputs(ds: TensorDictDataset, model_inputs: Mapping[str, InputLike],
                 accepts: Collection[str] | None = None, where: str = "data") -> None:
    """Check a data set's tensors against the model's inputs; DataError naming what differs.

    Every data key must be a model input (or in ``accepts``); every model input is needed except
    those named ``*mask``. dtypes must match (float32 / int64); the rank must match and so must
    every non-batch size of float inputs except the sequence axis of ``(B, T, F)`` inputs;
    integer inputs must lie in ``[0, high)``.
    """
    names = ", ".join(model_inputs)
    known = set(model_inputs) | set(accepts or ())
    extra = [k for k in ds.inputs if k not in known]
    if extra:
        raise DataError(f"{where}: {', '.join(map(repr, extra))} is not an input of the model; "
                        f"the model's inputs: {names}")
    missing = [k for k in model_inputs if k not in ds.inputs and not k.endswith("mask")]
    if missing:
        raise DataError(f"{where}: the model input(s) {', '.join(map(repr, missing))} are missing; "
                        f"the data has {', '.join(ds.inputs)}; the model's inputs: {names}")
    for name, t in ds.inputs.items():
        spec = model_inputs.get(name)
        if spec is None:
            continue
        want = torch.int64 if spec.dtype == "int64" else torch.float32
        if t.dtype != want:
            raise DataError(f"{where}: input {name!r} is {str(t.dtype).removeprefix('torch.')}; "
                            f"the model takes {spec.dtype}")
        row, model_row = tuple(t.shape[1:]), tuple(spec.shape[1:])
        if not _fits(row, model_row, spec.dtype == "int64"):
            seq = " (any length on the sequence axis)" if len(model_row) == 2 and spec.dtype != "int64" \
                else ""
            raise DataError(f"{where}: input {name!r} rows have shape {row}; the model takes "
                            f"{model_row}{seq}")
        if spec.dtype == "int64" and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or (spec.high is not None and hi >= spec.high):
                bad = lo if lo < 0 else hi
                r = int((t == bad).reshape(len(t), -1).any(1).nonzero()[0]) + 1
                raise DataError(f"{where}: input {name!r} row {r} holds {bad}; the model takes values "
                                f"in [0, {spec.high if spec.high is not None else 'inf'})"
                                + (" (a tokenizer that does not match the model?)" if name.endswith("ids")
                                   else ""))


def _fits(row: tuple, model_row: tuple, integer: bool) -> bool:
    if len(row) != len(model_row):
        return False
    free = {0} if len(row) == 2 and not integer else set(range(len(row))) if integer else set()
    return all(a == b for i, (a, b) in enumerate(zip(row, model_row, strict=True)) if i not in free)


def split_source(ds: TensorDictDataset, calib_rows: int, seed: int = 0) \
        -> tuple[TensorDictDataset, TensorDictDataset]:
    """Split one data set into ``(calibration, evaluation)`` rows that never overlap.

    ``calib_rows`` rows are drawn with a fixed ``seed``; the rest are evaluation rows. Both keep
    the source's row order.
    """
    if not 0 < calib_rows < len(ds):
        raise DataError(f"cannot take {calib_rows} calibration rows from a {len(ds)}-row data set "
                        f"and keep evaluation rows: give 1 to {len(ds) - 1}")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds.select(perm[:calib_rows].sort().values), ds.select(perm[calib_rows:].sort().values)
