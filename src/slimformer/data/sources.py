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
from typing import Annotated, Any, Literal, Protocol

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from slimformer.data import tabular
from slimformer.data.datasets import DATASETS, TensorDictDataset, get_dataset
from slimformer.data.tabular import TEXT_SUFFIXES
from slimformer.errors import ConfigError, DataError

TABLE_SUFFIXES = (".parquet", ".arrow")
TENSOR_SUFFIXES = (".safetensors", ".npz")
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class InputLike(Protocol):
    """What the data layer needs of a model input spec (``slimformer.models.spec.InputSpec``)."""

    shape: list[int]
    dtype: str
    high: int | None


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuiltinData(_Source):
    """A built-in data set (``slimformer data list``) and one of its splits."""

    kind: Literal["builtin"] = "builtin"
    name: str
    split: str = "test"


class ImageFolderData(_Source):
    """A folder of images: class sub-folders (labels in sorted order, or ``classes``) or flat.

    Preprocessing: explicit ``mean`` and ``std`` (with ``size`` or the model's input size) if
    given, else the image processor config (``preprocessor_config.json``) of ``processor`` or of
    the model's directory.
    """

    kind: Literal["images"] = "images"
    path: str
    size: Annotated[int, Field(ge=1)] | tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] \
        | None = None  # (height, width)
    mean: list[float] | None = Field(None, min_length=1, max_length=4)
    std: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1, max_length=4)
    channels: Literal[1, 3] | None = None  # grey or RGB; default the model's input channels
    processor: str | None = None  # folder with preprocessor_config.json
    input: str | None = None  # model input name; default the model's only image-shaped input
    classes: list[str] | None = None  # label order; default sorted sub-folder names


class _TextFields(_Source):
    text: str | None = None  # column; default "text" / "sentence", or the only column
    text_pair: str | None = None  # second column for sentence pairs
    label: str | Literal[False] | None = None  # column; None: "label"/"labels" if present
    classes: list[str] | None = None  # label order for string labels; default sorted
    tokenizer: str | None = None  # tokenizer folder; default the model's directory
    max_length: int = Field(128, ge=1, le=65536)
    padding: Literal["max_length", "longest"] = "max_length"


class TextFileData(_TextFields):
    """Text in CSV, TSV (header row), JSONL (one object a line) or plain text (one row a line)."""

    kind: Literal["text"] = "text"
    path: str
    format: Literal["csv", "tsv", "jsonl", "txt"] | None = None  # default from the suffix


class TableData(_TextFields):
    """A ``datasets.save_to_disk`` folder, a ``.parquet`` or ``.arrow`` file.

    Either a text column (tokenized as for :class:`TextFileData`) or ``inputs``: model input name
    -> column of numbers (lists for sequences), taken as they are.
    """

    kind: Literal["table"] = "table"
    path: str
    split: str | None = None  # for a saved DatasetDict
    inputs: dict[str, str] | None = None


class TensorFileData(_Source):
    """A ``.safetensors`` or ``.npz`` file: keys are model input names, plus ``label``'s key."""

    kind: Literal["tensors"] = "tensors"
    path: str
    label: str = "labels"


def _kind_of_path(path: str) -> str:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix in TENSOR_SUFFIXES:
        return "tensors"
    if p.is_dir():
        return "table" if any((p / m).is_file() for m in DATASETS_MARKERS) else "images"
    allowed = ", ".join([*TEXT_SUFFIXES, *TABLE_SUFFIXES, *TENSOR_SUFFIXES])
    if not p.exists():
        raise ValueError(f"data path {path!r} does not exist (a file {allowed}, an image folder "
                         f"or a datasets folder), and is no built-in data set "
                         f"({', '.join(sorted(DATASETS))})")
    raise ValueError(f"cannot tell the kind of data in {path!r} from its suffix {suffix!r}; "
                     f"allowed: {allowed}, a folder, or give kind: images|text|table|tensors")


def _infer_kind(value: Any) -> Any:
    if isinstance(value, (str, Path)):
        text = str(value)
        if text in DATASETS and not Path(text).exists():
            return {"kind": "builtin", "name": text}
        return {"kind": _kind_of_path(text), "path": text}
    if isinstance(value, Mapping) and "kind" not in value:
        if "path" in value and isinstance(value["path"], str):
            return {"kind": _kind_of_path(value["path"]), **value}
        if "name" in value:
            return {"kind": "builtin", **value}
        raise ValueError("a data source needs `path` (a file or folder) or `name` (a built-in "
                         "data set), or an explicit kind: builtin|images|text|table|tensors")
    return value


DataSource = Annotated[
    BuiltinData | ImageFolderData | TextFileData | TableData | TensorFileData,
    Field(discriminator="kind"), BeforeValidator(_infer_kind),
]
"""A data source in a recipe: a path string, or a mapping with ``path`` (or ``name``) and options."""

_ADAPTER = TypeAdapter(DataSource)


def parse_source(value: str | Path | Mapping) -> BuiltinData | ImageFolderData | TextFileData | \
        TableData | TensorFileData:
    """A typed source from a CLI path / built-in name or a recipe mapping; ConfigError if invalid."""
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(x) for x in e['loc']) or 'data'}: "
                    f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        raise ConfigError(problems, source="data source") from None


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
        ds = _load(spec, model_inputs, model_dir, accepts, limit)
    if model_inputs is not None:
        check_inputs(ds, model_inputs, accepts, where)
    return ds


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
