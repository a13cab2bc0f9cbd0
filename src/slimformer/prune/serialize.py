"""Save a pruned model and load it back: the base model's spec plus the slice spec and weights.

Layout: ``pruned.safetensors`` (the sliced model's state) and ``prune.json`` (format version, the
base model spec, the slice spec, the config). Loading rebuilds the base model from its spec,
rediscovers its structure, slices it the same way and loads the tensors strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from slimformer import __version__
from slimformer.errors import ModelLoadError
from slimformer.prune.slicing import SliceSpec

FORMAT_VERSION = 1


def save_pruned(model: nn.Module, spec: SliceSpec, directory: str | Path, model_spec,
                config=None) -> Path:
    """Write the pruned ``model`` into ``directory`` atomically (all files or none)."""
    from safetensors.torch import save_model

    from slimformer.report.io import atomic_dir

    directory = Path(directory)
    meta = {"format_version": FORMAT_VERSION, "slimformer_version": __version__,
            "model_spec": model_spec.model_dump(mode="json"), "slice_spec": spec.to_dict(),
            "config": config.model_dump(mode="json") if config is not None else None}
    with atomic_dir(directory) as tmp:
        save_model(model, str(tmp / "pruned.safetensors"))
        (tmp / "prune.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_pruned(directory: str | Path):
    """Load what :func:`save_pruned` wrote; returns a ``LoadedModel`` holding the pruned model."""
    from pydantic import TypeAdapter
    from safetensors.torch import load_model as load_tensors

    from slimformer.models import spec as S
    from slimformer.models.loading import load_model
    from slimformer.models.structure import discover
    from slimformer.prune.slicing import slice_model

    directory = Path(directory)
    meta_path, tensors = directory / "prune.json", directory / "pruned.safetensors"
    if not meta_path.is_file() or not tensors.is_file():
        raise ModelLoadError(f"{directory} is not a saved pruned model (needs prune.json and "
                             "pruned.safetensors)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{meta_path}: format version {meta.get('format_version')!r}, this "
                             f"slimformer reads {FORMAT_VERSION}")
    spec = TypeAdapter(S.ModelSpec).validate_python(meta["model_spec"])
    loaded = load_model(spec)
    x = loaded.example_inputs(2)
    smap = discover(loaded.module, x, require_attention=False)
    model = slice_model(loaded.module, smap, SliceSpec.from_dict(meta["slice_spec"]),
                        inplace=True, check_inputs=x)
    try:
        load_tensors(model, str(tensors), strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{tensors} does not fit the sliced model: {e}") from None
    loaded.module = model.eval()
    return loaded
