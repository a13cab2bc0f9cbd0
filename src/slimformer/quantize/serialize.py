"""Save a quantized model to a directory and load it back to identical outputs.

Layout: ``quantized.safetensors`` (the whole wrapper's state: the model's weights as changed by
reparameterization, every quantizer's parameters, integer weights in inference form) and
``quant.json`` (format version, the base model spec, the quantization config, the form, the
dtype and shape of every tensor, and the SHA-256 of each file and section). Loading checks the
hashes, refuses a model factory unless trusted, rebuilds the base model from its spec,
rediscovers its structure, builds the same quantizers, checks every tensor's shape against the
rebuilt model (or, for quantizer slots whose shape comes from calibration, against what the
slot can hold) and loads the tensors strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimformer import __version__
from slimformer.errors import ModelLoadError
from slimformer.quantize.config import QuantConfig
from slimformer.report.integrity import ST_DTYPES, st_dtype

FORMAT_VERSION = 2  # 2: file hashes and the tensor manifest
META, TENSORS = "quant.json", "quantized.safetensors"
REDO = "re-create the folder with save_quantized (`slimformer quantize`)"
_KEYS = ("format_version", "model_spec", "config", "inference_form", "slice_spec", "tensors")


def save_quantized(qmodel, directory: str | Path, model_spec, slice_spec=None) -> Path:
    """Write ``qmodel`` into ``directory`` atomically (all files or none).

    ``slice_spec``: the :class:`~slimformer.prune.slicing.SliceSpec` when the model was pruned
    before quantization (the base model is sliced the same way on load).
    """
    from safetensors.torch import save_model

    from slimformer.report.integrity import seal, tensor_manifest
    from slimformer.report.io import atomic_dir

    directory = Path(directory)
    meta = {
        "format_version": FORMAT_VERSION,
        "slimformer_version": __version__,
        "model_spec": model_spec.model_dump(mode="json"),
        "config": qmodel.config.model_dump(mode="json"),
        "inference_form": bool(getattr(qmodel, "inference", False)),
        "input_specs": None,
        "slice_spec": slice_spec.to_dict() if slice_spec is not None else None,
    }
    with atomic_dir(directory) as tmp:
        save_model(qmodel, str(tmp / TENSORS))
        meta["tensors"] = tensor_manifest(tmp / TENSORS)
        (tmp / META).write_text(json.dumps(seal(meta, tmp, [TENSORS]), indent=2) + "\n",
                                encoding="utf-8")
    return directory


def saved_spec(directory: str | Path, trust_code: bool = False):
    """The base model spec of a folder written by :func:`save_quantized`, checked.

    Checks what :func:`load_quantized` checks before it builds anything (hashes, format,
    trust); the CLI uses it to load the base model beside the quantized one.
    """
    from slimformer.models.loading import saved_model_spec
    from slimformer.report.integrity import read_sealed

    meta = read_sealed(directory, META, TENSORS, _KEYS, FORMAT_VERSION, REDO,
                       "quantized model")
    return saved_model_spec(meta["model_spec"], str(Path(directory) / META), trust_code)


def load_quantized(directory: str | Path, trust_code: bool = False):
    """Load what :func:`save_quantized` wrote; returns the quantized model in quant mode.

    Args:
        directory: The folder.
        trust_code: Allow a base model spec that names a ``package.module:factory`` (importing
            it runs code); without it such a folder is refused before anything is imported.

    Raises:
        ModelLoadError: Missing, edited, truncated or wrong-shape files; an untrusted factory;
            a base model that cannot be rebuilt.
    """
    from pydantic import ValidationError
    from safetensors.torch import load_model as load_tensors

    from slimformer.models.loading import load_model, saved_model_spec
    from slimformer.models.structure import discover
    from slimformer.quantize.build import build
    from slimformer.report.integrity import read_sealed

    directory = Path(directory)
    meta = read_sealed(directory, META, TENSORS, _KEYS, FORMAT_VERSION, REDO,
                       "quantized model")
    spec = saved_model_spec(meta["model_spec"], str(directory / META), trust_code)
    try:
        config = QuantConfig.model_validate(meta["config"])
    except ValidationError as exc:
        raise ModelLoadError(f"{directory / META}: config is invalid ({exc.errors()[0]['msg']}); "
                             f"{REDO}") from None
    lm = load_model(spec)
    x = lm.example_inputs(2)
    if meta["slice_spec"]:  # pruned before quantization: rebuild the smaller model
        from slimformer.prune.slicing import SliceSpec, slice_model

        base = discover(lm.module, x, require_attention=False)
        slice_model(lm.module, base, SliceSpec.from_dict(meta["slice_spec"]), inplace=True,
                    check_inputs=x)
    smap = discover(lm.module, x, require_attention=config.softmax_kind != "none")
    qmodel = build(lm.module, smap, config)
    tensors_path = directory / TENSORS
    fit_slots(qmodel, meta["tensors"], tensors_path)
    try:
        load_tensors(qmodel, str(tensors_path), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{tensors_path} does not fit the rebuilt model: "
                             f"{str(exc)[:500]}") from None
    qmodel._rebind()
    if meta["inference_form"]:
        for a in qmodel.quant.attention.values():
            a.inference = True
        qmodel.inference = True
    qmodel.quant.set_mode("quant")
    return qmodel


def fit_slots(qmodel: nn.Module, manifest: dict[str, dict], source) -> None:
    """Check each saved tensor against the rebuilt ``qmodel``; shape the calibrated slots.

    Model tensors must have the rebuilt model's dtype and shape (a Linear may gain the bias
    that RepQ's fold adds, of its output size). Quantizer slots whose shape comes from
    calibration are checked against what they can hold: integer codes and rounding logits
    the shape of their weight matrix, weight scales one value or one per output row,
    activation ranges 1-D, probability scales 0-D.

    Raises:
        ModelLoadError: Naming the first tensors that do not fit.
    """
    bad = []
    for key, rec in manifest.items():
        dtype, shape = rec["dtype"], tuple(rec["shape"])
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = qmodel.get_submodule(owner_name)
        except AttributeError:
            bad.append(f"{key}: the rebuilt model has no such tensor")
            continue
        current = getattr(owner, attr, None)
        if current is not None and not isinstance(current, torch.Tensor):
            bad.append(f"{key}: the rebuilt model has no such tensor")
            continue
        why = _slot_problem(qmodel, owner_name, owner, attr, current, dtype, shape)
        if why:
            bad.append(f"{key}: {why}")
            continue
        if current is not None and tuple(current.shape) == shape and st_dtype(
                current.dtype) == dtype:
            continue
        empty = torch.empty(shape, dtype=getattr(torch, next(
            t for t, s in ST_DTYPES.items() if s == dtype)))
        if isinstance(current, nn.Parameter) or (current is None and attr == "bias"):
            setattr(owner, attr, nn.Parameter(empty, requires_grad=current is None or
                                              current.requires_grad))
        else:
            owner.register_buffer(attr, empty)
    if bad:
        raise ModelLoadError(f"{source} does not fit the rebuilt model ({len(bad)} tensor(s)): "
                             + "; ".join(bad[:5]) + f"; {REDO}")


def _slot_problem(qmodel, owner_name, owner, attr, current, dtype, shape) -> str | None:
    """Why a saved tensor of ``dtype``/``shape`` cannot fill ``owner.attr``; None if it can."""
    from slimformer.quantize.act import ActQuantizer, ProbQuantizer
    from slimformer.quantize.quantizers import WeightQuantizer
    from slimformer.quantize.state import EmbeddingQuant, LinearQuant

    if dtype not in ST_DTYPES.values():
        return f"dtype {dtype} is not one slimformer writes"
    if isinstance(owner, (LinearQuant, EmbeddingQuant)) and attr in ("int_weight", "alpha"):
        want = tuple((owner.matrix() if isinstance(owner, LinearQuant) else owner.param[0]).shape)
        kind = "U8" if attr == "int_weight" else "F32"
        return None if (shape, dtype) == (want, kind) else \
            f"{dtype} {list(shape)} in the file, {kind} {list(want)} expected"
    if isinstance(owner, WeightQuantizer):
        parent = qmodel.get_submodule(owner_name.rpartition(".")[0])
        rows = (parent.matrix() if isinstance(parent, LinearQuant) else parent.param[0]).shape[0]
        ok = dtype == "F32" and shape in ((1,), (rows, 1))
        return None if ok else f"{dtype} {list(shape)} in the file, F32 [1] or [{rows}, 1] expected"
    if isinstance(owner, ActQuantizer) and attr in ("lo", "hi", "shift", "inv_r"):
        return None if dtype == "F32" and len(shape) == 1 and shape[0] >= 1 else \
            f"{dtype} {list(shape)} in the file, a 1-D F32 range expected"
    if isinstance(owner, ProbQuantizer) and attr == "delta":
        return None if (dtype, shape) == ("F32", ()) else \
            f"{dtype} {list(shape)} in the file, an F32 scalar expected"
    if current is None:
        if attr == "bias" and isinstance(owner, nn.Linear):
            want = (owner.out_features,)
            return None if shape == want and dtype == st_dtype(owner.weight.dtype) else \
                f"{dtype} {list(shape)} in the file, a bias of {list(want)} expected"
        return "the rebuilt model has no such tensor"
    want = (st_dtype(current.dtype), tuple(current.shape))
    return None if (dtype, shape) == want else \
        f"{dtype} {list(shape)} in the file, the rebuilt model has {want[0]} {list(want[1])}"
