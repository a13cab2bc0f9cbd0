"""Tensor files as model inputs: ``.safetensors`` or ``.npz`` whose keys are the model's input names.

Every key but the label key is an input ``(N, ...)``; the label key (``labels`` by default), if
present, holds ``(N,)`` integer class indices. Nothing is unpickled: ``.npz`` files are read with
``allow_pickle=False``. Floating tensors become float32 and integer ones int64.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import DataError
from slimformer.store import limits


def _bound(path: Path, nbytes: int) -> None:
    if nbytes > limits.MAX_TENSOR_BYTES:
        raise DataError(f"{path}: {nbytes:,} bytes of arrays, over the limit of "
                        f"{limits.mib(limits.MAX_TENSOR_BYTES)} for a tensor data file "
                        f"(slimformer.store.limits.MAX_TENSOR_BYTES); split the file")


def _check_npz(path: Path) -> None:
    """Check every ``.npy`` member's header (shape, dtype) before numpy allocates anything.

    Raises:
        DataError: A member whose header claims more bytes than the member holds, or arrays
            over :data:`~slimformer.store.limits.MAX_TENSOR_BYTES` in all.
    """
    fmt = np.lib.format
    total = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = fmt.read_magic(f)
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read(f)
                header = f.tell()
            key = info.filename[:-4]
            if dtype.hasobject:
                continue  # np.load(allow_pickle=False) refuses it before reading
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if nbytes > info.file_size - header:
                raise DataError(f"{path}: key {key!r} claims shape {tuple(shape)} "
                                f"({nbytes:,} bytes) in a member of {info.file_size:,} bytes: "
                                f"damaged or crafted")
            total += nbytes
            _bound(path, total)


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            _bound(path, path.stat().st_size)
            return load_file(str(path))
        if suffix == ".npz":
            _check_npz(path)
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile, EOFError) as exc:
        kind = "object arrays need pickle, which is refused; " if "pickle" in str(exc) else ""
        raise DataError(f"{path}: cannot read as {suffix} ({kind}{type(exc).__name__}: {exc})") from None
    except SafetensorError as exc:
        raise DataError(f"{path}: not a valid .safetensors file ({exc})") from None
    raise DataError(f"{path}: tensor files are .safetensors or .npz, not {suffix!r}")


def _as_model_dtype(path: Path, key: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t.long()
    if t.is_floating_point():
        t = t.float()
        bad = ~torch.isfinite(t.reshape(len(t), -1)).all(1) if t.dim() else ~torch.isfinite(t)
        if bad.any():
            row = int(bad.nonzero()[0]) + 1 if t.dim() else 1
            raise DataError(f"{path}: key {key!r} holds NaN or inf (row {row})")
        return t
    if t.is_complex():
        raise DataError(f"{path}: key {key!r} is complex; model inputs are real numbers")
    return t.long()


def load_tensor_file(spec, limit: int | None = None) -> TensorDictDataset:
    """The inputs and labels of a ``TensorFileData`` spec (rows along the first axis)."""
    path = Path(spec.path)
    tensors = _read(path)
    if not tensors:
        raise DataError(f"{path}: holds no tensors")
    for k, t in tensors.items():
        if t.dim() == 0:
            raise DataError(f"{path}: key {k!r} is a scalar; every key needs one row per sample (N, ...)")
    labels = tensors.pop(spec.label, None)
    if not tensors:
        raise DataError(f"{path}: holds only the label key {spec.label!r}, no inputs")
    sizes = {k: len(t) for k, t in tensors.items()}
    if labels is not None:
        sizes[spec.label] = len(labels)
    if len(set(sizes.values())) > 1:
        raise DataError(f"{path}: keys differ in rows (first axis): "
                        + ", ".join(f"{k} {n}" for k, n in sizes.items()))
    if limit is not None:
        tensors = {k: t[:limit] for k, t in tensors.items()}
        labels = labels[:limit] if labels is not None else None
    inputs = {k: _as_model_dtype(path, k, t) for k, t in tensors.items()}
    if labels is not None:
        if labels.dim() != 1 or labels.is_floating_point() and not torch.equal(labels, labels.round()) \
                or labels.dtype == torch.bool:
            raise DataError(f"{path}: key {spec.label!r} must hold (N,) integer class indices; got "
                            f"{str(labels.dtype).removeprefix('torch.')} of shape {tuple(labels.shape)}")
        labels = labels.long()
        if (labels < 0).any():
            row = int((labels < 0).nonzero()[0]) + 1
            raise DataError(f"{path}: key {spec.label!r} row {row} is negative; labels are class "
                            f"indices >= 0")
    return TensorDictDataset(inputs, labels)
