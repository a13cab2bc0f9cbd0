"""Save a quantized model to a directory and load it back to identical outputs.

Layout: ``quantized.safetensors`` (the whole wrapper's state: the model's weights as changed by
reparameterization, every quantizer's parameters, integer weights in inference form) and
``quant.json`` (format version, the base model spec, the quantization config, the form).
Loading rebuilds the base model from its spec, rediscovers its structure, builds the same
quantizers and loads the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimformer import __version__
from slimformer.errors import ModelLoadError
from slimformer.quantize.config import QuantConfig

FORMAT_VERSION = 1


def save_quantized(qmodel, directory: str | Path, model_spec, slice_spec=None) -> Path:
    """Write ``qmodel`` into ``directory`` atomically (all files or none).

    ``slice_spec``: the :class:`~slimformer.prune.slicing.SliceSpec` when the model was pruned
    before quantization (the base model is sliced the same way on load).
    """
    from safetensors.torch import save_model

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
        save_model(qmodel, str(tmp / "quantized.safetensors"))
        (tmp / "quant.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_quantized(directory: str | Path):
    """Load what :func:`save_quantized` wrote; returns the quantized model in quant mode."""
    from pydantic import TypeAdapter
    from safetensors.torch import load_file
    from safetensors.torch import load_model as load_tensors

    from slimformer.models import spec as S
    from slimformer.models.loading import load_model
    from slimformer.models.structure import discover
    from slimformer.quantize.build import build

    directory = Path(directory)
    meta_path, tensors_path = directory / "quant.json", directory / "quantized.safetensors"
    if not meta_path.is_file() or not tensors_path.is_file():
        raise ModelLoadError(f"{directory} is not a saved quantized model (needs quant.json and "
                             "quantized.safetensors)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{meta_path}: format version {meta.get('format_version')!r}, this "
                             f"slimformer reads {FORMAT_VERSION}")
    spec = TypeAdapter(S.ModelSpec).validate_python(meta["model_spec"])
    config = QuantConfig.model_validate(meta["config"])
    lm = load_model(spec)
    x = lm.example_inputs(2)
    if meta.get("slice_spec"):  # pruned before quantization: rebuild the smaller model
        from slimformer.prune.slicing import SliceSpec, slice_model

        base = discover(lm.module, x, require_attention=False)
        slice_model(lm.module, base, SliceSpec.from_dict(meta["slice_spec"]), inplace=True,
                    check_inputs=x)
    smap = discover(lm.module, x, require_attention=config.softmax_kind != "none")
    qmodel = build(lm.module, smap, config)
    state = load_file(str(tensors_path))
    _shape_like(qmodel, state)
    try:
        load_tensors(qmodel, str(tensors_path), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{tensors_path} does not fit the rebuilt model: {exc}") from exc
    qmodel._rebind()
    if meta["inference_form"]:
        for a in qmodel.quant.attention.values():
            a.inference = True
        qmodel.inference = True
    qmodel.quant.set_mode("quant")
    return qmodel


def _shape_like(qmodel: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every tensor slot of ``qmodel`` the shape (and existence) the saved state has."""
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = qmodel.get_submodule(owner_name)
        except AttributeError:
            continue
        current = getattr(owner, attr, None)
        if current is not None and tuple(current.shape) == tuple(value.shape) and \
                current.dtype == value.dtype:
            continue
        if isinstance(current, nn.Parameter) or (current is None and attr == "bias"):
            setattr(owner, attr, nn.Parameter(torch.empty_like(value),
                                              requires_grad=current is None or
                                              current.requires_grad))
        else:
            owner.register_buffer(attr, torch.empty_like(value))
