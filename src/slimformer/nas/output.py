"""Write a search's results: front table (Markdown, JSON), front plot, the chosen sub-network.

The folder is an artifact (:mod:`slimformer.store.manifest`): ``slimformer.json`` records the
search stage (config and chosen point), the SHA-256 of every file written and the dtype and shape
of each tensor of ``chosen.safetensors``; :func:`load_chosen` checks them before it builds
anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from slimformer.errors import ModelLoadError
from slimformer.nas.api import SearchResult
from slimformer.nas.pareto import plot_front
from slimformer.store.manifest import MANIFEST, read_artifact, stage_entry, write_manifest

KIND, TENSORS, SPEC = "search", "chosen.safetensors", "chosen.json"
REDO = "run the search again (it resumes its study) to write the folder afresh"


def _clean(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "params_choice"} | {
        "choices": row.get("params_choice", {})}


def summary(result: SearchResult) -> dict:
    """JSON-ready summary: objectives, reference, front, predictors, hypervolume, chosen."""
    return {
        "objectives": result.objectives,
        "space_size": result.space_size,
        "train": result.train,
        "reference": _clean(result.reference),
        "front": [_clean(r) for r in result.front],
        "measured": [_clean(r) for r in result.measured],
        "predictors": result.predictors,
        "hypervolume": result.hypervolume,
        "chosen": _clean(result.chosen) if result.chosen else None,
        "chosen_spec": result.chosen_spec,
        "notes": result.notes,
        "seconds": round(result.seconds, 1),
    }


def predictor_lines(result: SearchResult) -> list[str]:
    """One line per objective predictor with its held-out rank correlation."""
    return [f"predictor {o}: {p['kind']}, held-out Spearman {p['spearman']:.3f}, Kendall "
            f"{p['kendall']:.3f} ({p['holdout']} sub-networks)" for o, p in
            result.predictors.items()]


def save_search(search: SearchResult, /, directory: str | Path, model_spec=None,
                slice_spec=None, history: list[dict] | None = None, config=None,
                result: dict | None = None) -> Path:
    """``front.json``, ``front.md``, ``front.png``, ``chosen.*`` and the manifest into ``directory``.

    The signature of every save function (``save_pruned``, ``save_quantized``). The folder is
    expected to be a fresh (temporary) one: callers wrap it in an atomic writer.
    ``model_spec`` (the searched base model's spec), ``slice_spec`` (how it was pruned before the
    search) and ``history`` (the stage entries applied before) are recorded so the folder can be
    restored as a model (:mod:`slimformer.stages.artifact`: the chosen float sub-network);
    ``config`` (the :class:`~slimformer.nas.config.SearchConfig`) and ``result`` (merged with the
    chosen point) are recorded as the search stage's.
    """
    from safetensors.torch import save_file

    from slimformer.store.atomic import readable

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "front.json").write_text(json.dumps(summary(search), indent=2, default=str) + "\n",
                                    encoding="utf-8")
    md = ["# Measured Pareto front", "", *search.table(), "", *predictor_lines(search), "",
          f"hypervolume {search.hypervolume:.4f}; {len(search.measured)} sub-networks measured "
          f"of {search.space_size:,} in the space", ""]
    if search.chosen:
        md.append(f"chosen: {search.chosen['sub']} (accuracy {search.chosen['accuracy']:.4f})")
    (out / "front.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    groups = {"measured": [r for r in search.measured if r["phase"] == "sample"],
              "predicted front, measured": [r for r in search.measured if r["phase"] == "front"],
              "measured front": search.front}
    plot_front(groups, search.objectives, out / "front.png", search.reference,
               "sub-networks: accuracy against cost")
    files = ["front.json", "front.md", "front.png"]
    weights = None
    if search.float_model is not None:
        state = {k: v.detach().contiguous().clone() for k, v in
                 search.float_model.state_dict().items()}
        save_file(state, str(out / TENSORS))
        readable(out / TENSORS)
        (out / SPEC).write_text(json.dumps(search.chosen_spec, indent=2) + "\n",
                                encoding="utf-8")
        files.append(SPEC)
        weights = TENSORS
    chosen = json.loads(json.dumps(_clean(search.chosen), default=str)) if search.chosen else None
    entry = stage_entry("search", config, {"chosen": chosen, **(result or {})})
    write_manifest(out, KIND, model_spec, [*(history or []), entry], weights, files,
                   slice_spec=slice_spec)
    return out


def read_search(folder: str | Path) -> dict:
    """The checked manifest of a search output that holds a chosen sub-network.

    Raises:
        ModelLoadError: Not a search output, no chosen sub-network, or a file that differs.
    """
    folder = Path(folder)
    if (folder / MANIFEST).is_file() and not (folder / TENSORS).exists():
        raise ModelLoadError(f"{folder} holds no chosen sub-network (the search chose none)")
    return read_artifact(folder, KIND, TENSORS, (), REDO, "search output")


def load_chosen(model, structure, folder: str | Path, meta: dict | None = None):
    """Rebuild the chosen float sub-network from ``model`` (the searched base model).

    Checks the manifest (file hashes, tensor manifest), slices ``model`` (a copy) as
    ``chosen.json`` says, drops its blocks, checks every tensor's shape and loads
    ``chosen.safetensors`` strictly; quantize it again with the recorded bits to deploy.
    ``meta``: the manifest as :func:`read_search` returned it (read here when None).

    Raises:
        ModelLoadError: A file missing, edited, truncated or of the wrong shape, or the folder
            holds no chosen sub-network.
    """
    from slimformer.nas.measure import DroppedBlock
    from slimformer.prune.serialize import check_shapes
    from slimformer.prune.slicing import SliceSpec, slice_model
    from slimformer.store.integrity import read_manifest

    folder = Path(folder)
    meta = read_search(folder) if meta is None else meta
    if SPEC not in meta["integrity"]["files"]:
        raise ModelLoadError(f"{folder / MANIFEST} does not record {SPEC}; {REDO}")
    spec = read_manifest(folder / SPEC, ("heads", "mlp", "dropped_blocks"), REDO)
    try:
        out = slice_model(model, structure, SliceSpec.from_dict(spec), inplace=False)
        for path, n in spec["dropped_blocks"].items():
            parent, _, child = path.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, DroppedBlock(n))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{folder / SPEC} does not fit the model ({str(exc)[:300]}); "
                             f"{REDO}") from None
    check_shapes(out, meta["tensors"], folder / TENSORS, REDO)
    from safetensors.torch import load_file

    try:
        out.load_state_dict(load_file(str(folder / TENSORS)), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{folder / TENSORS} does not fit the sliced model: "
                             f"{str(exc)[:500]}; {REDO}") from None
    return out.eval()
