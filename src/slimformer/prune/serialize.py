"""Save a pruned model and load it back: the base model's spec plus the slice spec and weights.

Layout: ``pruned.safetensors`` (the sliced model's state) and the artifact manifest
``slimformer.json`` (:mod:`slimformer.store.manifest`: the base model spec, the prune stage with
its config and results, the slice spec, the dtype and shape of every tensor, and the SHA-256 of
each file and section). Loading checks the hashes, refuses a model factory unless
trusted, rebuilds the base model from its spec, rediscovers its structure, slices it the same
way, checks every tensor's dtype and shape against the sliced model and loads them strictly.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from slimformer.errors import ConfigError, ModelLoadError
from slimformer.prune.slicing import SliceSpec
from slimformer.store.manifest import MANIFEST, read_artifact, stage_entry, write_manifest

KIND, TENSORS, META = "pruned", "pruned.safetensors", MANIFEST
REDO = "re-create the folder with save_pruned (`slimformer prune`)"


def save_pruned(model: nn.Module, /, directory: str | Path, model_spec=None, slice_spec=None,
                history: list[dict] | None = None, config=None, result: dict | None = None) -> Path:
    """Write the pruned ``model`` into ``directory`` atomically (all files or none).

    The signature of every save function (``save_quantized``, ``save_search``): the model, the
    folder, the base model's spec, the :class:`SliceSpec` that made ``model`` from it (required
    here), the stage entries applied before pruning, the prune stage's config and results.

    Raises:
        ConfigError: No ``slice_spec``.
    """
    from safetensors.torch import save_model

    from slimformer.store.atomic import readable
    from slimformer.store.outdir import staged_dir

    if slice_spec is None:
        raise ConfigError(["slice_spec: a pruned model is saved with the SliceSpec that made it "
                           "(PruneResult.spec)"], "save_pruned")
    directory = Path(directory)
    stages = [*(history or []), stage_entry("prune", config, result)]
    with staged_dir(directory) as tmp:
        save_model(model, str(tmp / TENSORS))
        readable(tmp / TENSORS)
        write_manifest(tmp, KIND, model_spec, stages, TENSORS, slice_spec=slice_spec)
    return directory


def read_pruned(directory: str | Path) -> dict:
    """The checked manifest of a folder :func:`save_pruned` wrote (hashes, format, tensors)."""
    return read_artifact(Path(directory), KIND, TENSORS, (), REDO, "pruned model")


def load_pruned(directory: str | Path, trust_code: bool = False):
    """Load what :func:`save_pruned` wrote; returns a ``LoadedModel`` holding the pruned model.

    Args:
        directory: The folder.
        trust_code: Allow a base model spec that names a ``package.module:factory`` (importing
            it runs code); without it such a folder is refused before anything is imported.

    Raises:
        ModelLoadError: Missing, edited, truncated or wrong-shape files; an untrusted factory;
            a base model that cannot be rebuilt.
    """
    from slimformer.models.loading import load_model, saved_model_spec

    directory = Path(directory)
    meta = read_pruned(directory)
    loaded = load_model(saved_model_spec(meta["model_spec"], str(directory / META), trust_code))
    replay_slices(loaded, meta, directory / META)
    load_weights(loaded.module, directory, meta)
    return loaded


def replay_slices(loaded, meta: dict, source, redo: str = REDO) -> SliceSpec:
    """Slice ``loaded.module`` in place as the manifest ``meta`` records: the pruning replay.

    The structure is rediscovered on ``loaded``'s example inputs and the recorded slice spec
    applied (every artifact pruned before its own stage is rebuilt through here). ``source``
    names the manifest in errors, ``redo`` ends them.

    Raises:
        ModelLoadError: No valid slice spec recorded, or one that does not fit the model.
    """
    from slimformer.models.structure import discover
    from slimformer.prune.slicing import slice_model

    try:
        slices = SliceSpec.from_dict(meta["slice_spec"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{source}: slice_spec is invalid ({exc}); {redo}") from None
    x = loaded.example_inputs(2)
    smap = discover(loaded.module, x, require_attention=False)
    loaded.module = slice_model(loaded.module, smap, slices, inplace=True, check_inputs=x)
    return slices


def load_weights(model: nn.Module, directory: str | Path, meta: dict) -> nn.Module:
    """Load a pruned folder's tensors into ``model`` (sliced as recorded) strictly; eval mode.

    Raises:
        ModelLoadError: A tensor whose dtype or shape differs from the model's (named).
    """
    from safetensors.torch import load_model as load_tensors

    tensors = Path(directory) / TENSORS
    check_shapes(model, meta["tensors"], tensors)
    try:
        load_tensors(model, str(tensors), strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{tensors} does not fit the sliced model: {str(e)[:500]}") from None
    return model.eval()


def check_shapes(model: nn.Module, manifest: dict[str, dict], source, redo: str = REDO) -> None:
    """Every saved tensor must exist in ``model`` with the same dtype and shape.

    ``redo`` (how to make the file again) ends the message.

    Raises:
        ModelLoadError: Naming the first tensors that differ.
    """
    from slimformer.store.integrity import st_dtype

    own = model.state_dict()
    bad = []
    for key, rec in manifest.items():
        if key not in own:
            bad.append(f"{key}: the rebuilt model has no such tensor")
            continue
        want = [st_dtype(own[key].dtype), list(own[key].shape)]
        if [rec["dtype"], list(rec["shape"])] != want:
            bad.append(f"{key}: {rec['dtype']} {list(rec['shape'])} in the file, the rebuilt "
                       f"model has {want[0]} {want[1]}")
    if bad:
        raise ModelLoadError(f"{source} does not fit the rebuilt model ({len(bad)} tensor(s)): "
                             + "; ".join(bad[:5]) + f"; {redo}")
