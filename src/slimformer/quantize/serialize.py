"""Save a quantized model to a directory and load it back to identical outputs.

Layout: ``quantized.safetensors`` and the artifact manifest ``slimformer.json``
(:mod:`slimformer.store.manifest`: the base model spec, the applied stages with the quantization
config last, the slice spec, the dtype and shape of every tensor, the SHA-256 of each file and
section) with the sections ``inference_form``, ``codes`` (packed-code records) and ``aliases``.
The tensor file holds the wrapper's state except the float weights of quantized Linears and
embedding tables: their integer codes are stored packed at their bit-width
(:mod:`~slimformer.quantize.pack`) under ``...int_weight`` beside the per-channel scale and zero
point, and the float weight is rebuilt on load as ``(code - zero) * scale``. A weight stays in
float only when that would change the outputs: it is shared with another site or a float
embedding, or (simulated form) its fake-quantized value is not exactly ``(code - zero) * scale``.
So the file is about the size :func:`~slimformer.models.evaluate.model_size` reports. Loading
checks the hashes, refuses a model factory unless trusted, rebuilds the base model from its spec,
rediscovers its structure, builds the same quantizers, checks every tensor's shape against the
rebuilt model (or, for quantizer slots whose shape comes from calibration, against what the slot
can hold), loads the tensors and refuses any missing or extra one.

After loading, a quantized weight's float value *is* its dequantized codes: the quantized outputs
are identical, but putting the quantizers in float mode runs the dequantized weights, not the
original float ones (load the base model from :func:`saved_spec` for a float reference).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from slimformer.errors import ModelLoadError
from slimformer.quantize.config import QuantConfig
from slimformer.store.integrity import ST_DTYPES, st_dtype
from slimformer.store.manifest import MANIFEST, read_artifact, stage_entry, write_manifest

KIND, TENSORS = "quantized", "quantized.safetensors"
META = MANIFEST
REDO = "re-create the folder with save_quantized (`slimformer quantize`)"
_KEYS = ("inference_form", "codes", "aliases")


def save_quantized(qmodel, /, directory: str | Path, model_spec=None, slice_spec=None,
                   history: list[dict] | None = None, config=None,
                   result: dict | None = None, after: list[dict] | None = None) -> Path:
    """Write ``qmodel`` into ``directory`` atomically (all files or none).

    Args:
        qmodel: The quantized model (simulated or inference form).
        directory: The folder to write.
        model_spec: The base model's spec.
        slice_spec: The :class:`~slimformer.prune.slicing.SliceSpec` when the model was pruned
            before quantization (the base model is sliced the same way on load).
        history: The stage entries applied before quantization
            (:func:`~slimformer.store.manifest.stage_entry`); a slice spec without a recorded
            prune stage gets one.
        config: The quantize stage's config to record (default: ``qmodel.config``).
        result: The quantize stage's results to record (metrics, sizes).
        after: Stage entries applied after quantization, recorded after it (``qat``: the
            model's tensors are its result).
    """
    from safetensors.torch import save_file

    from slimformer.store.atomic import readable
    from slimformer.store.outdir import staged_dir

    directory = Path(directory)
    inference = bool(getattr(qmodel, "inference", False))
    state, codes = _packed_state(qmodel, inference)
    state, aliases = _dedup(state)
    stages = list(history or [])
    if slice_spec is not None and "prune" not in [s.get("stage") for s in stages]:
        stages.append(stage_entry("prune"))
    stages.append(stage_entry("quantize", qmodel.config if config is None else config,
                              result))
    stages += list(after or [])
    with staged_dir(directory) as tmp:
        save_file(state, str(tmp / TENSORS))
        readable(tmp / TENSORS)
        write_manifest(tmp, KIND, model_spec, stages, TENSORS, slice_spec=slice_spec,
                       inference_form=inference, codes=codes, aliases=aliases)
    return directory


def read_quantized(directory: str | Path) -> dict:
    """The checked manifest of a folder :func:`save_quantized` wrote (hashes, format, sections)."""
    return read_artifact(Path(directory), KIND, TENSORS, _KEYS, REDO, "quantized model")


def _quant_config(meta: dict, where: Path) -> QuantConfig:
    """The quantize stage's config recorded in ``meta`` (the last quantize entry)."""
    from pydantic import ValidationError

    entry = next((s for s in reversed(meta["stages"]) if isinstance(s, dict)
                  and s.get("stage") == "quantize"), None)
    if entry is None:
        raise ModelLoadError(f"{where}: records no quantize stage; {REDO}")
    try:
        # written before head_bits / attention existed: the head quantized as the other
        # Linears, the attention quantized
        return QuantConfig.model_validate({"head_bits": None, "attention": "quantized",
                                           **entry["config"]})
    except ValidationError as exc:
        raise ModelLoadError(f"{where}: the quantize stage's config is invalid "
                             f"({exc.errors()[0]['msg']}); {REDO}") from None


def _sites(qmodel):
    """``(state-dict prefix, LinearQuant | EmbeddingQuant)`` of every quantized weight."""
    q = qmodel.quant
    return [*((f"quant.linears.{k}", s) for k, s in q.linears.items()),
            *((f"quant.embeddings.{k}", s) for k, s in getattr(q, "embeddings", {}).items())]


def _fake_quantized(site, dense: torch.Tensor | None = None) -> torch.Tensor:
    """What the forward uses for ``site``'s weight in quant mode, as ``(rows, cols)``.

    ``dense``: a ``(rows, cols)`` stand-in for the float weight (the dequantized codes), with no
    learned rounding: what a loaded simulated-form model computes.
    """
    from slimformer.quantize.quantizers import fake_uniform
    from slimformer.quantize.state import LinearQuant

    wq = site.wq
    if dense is not None:
        return fake_uniform(dense, wq.scale, wq.zero, wq.bits)
    if site.int_weight is not None:
        return (site.int_weight.float() - wq.zero) * wq.scale
    if isinstance(site, LinearQuant):
        return site.quantized_matrix()
    return fake_uniform(site.param[0].detach(), wq.scale, wq.zero, wq.bits)


@torch.no_grad()
def _packed_state(qmodel, inference: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors to write (codes packed, derivable float weights left out) and their records.

    Record per packed site, keyed by its ``...int_weight`` name: ``bits``, ``shape`` of the
    codes ``(rows, cols)``, and ``param``: the state-dict name of the float weight rebuilt from
    the codes on load, or None where the float weight is stored (it is needed as it is).
    """
    from slimformer.quantize.pack import pack_codes

    state = {k: v.detach() for k, v in qmodel.state_dict().items()}
    sites = _sites(qmodel)
    owners = Counter(id(s.param[0]) for _, s in sites)
    quantized_tables = {id(s.param[0]) for _, s in sites if not hasattr(s, "act")}
    float_tables = {id(m.weight) for m in qmodel.model.modules()
                    if isinstance(m, nn.Embedding) and id(m.weight) not in quantized_tables}
    records = {}
    for prefix, site in sites:
        w, wq = site.param[0], site.wq
        m = _fake_quantized(site)  # (rows, cols)
        codes = site.int_weight.float() if site.int_weight is not None else \
            torch.round(m / wq.scale + wq.zero).clamp(0, 2**wq.bits - 1)
        dense = (codes - wq.zero) * wq.scale
        derivable = (owners[id(w)] == 1 and id(w) not in float_tables
                     and w.dtype == torch.float32 and torch.equal(dense, m)
                     and (inference or torch.equal(_fake_quantized(site, dense), m)))
        if not (inference or derivable):
            continue  # simulated form, weight needed as it is: stored as before
        pname = "model." + site.name
        key = f"{prefix}.int_weight"
        state[key] = pack_codes(codes, wq.bits)
        records[key] = {"bits": wq.bits, "shape": list(codes.shape),
                        "param": pname if derivable else None}
        if derivable:
            state.pop(pname, None)
            state.pop(f"{prefix}.alpha", None)  # learned rounding: its result is in the codes
    return state, records


def _dedup(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors sharing storage (tied weights) written once; ``{alias: written name}``."""
    out, seen, aliases = {}, {}, {}
    for k in sorted(state):
        t = state[k]
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[k] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = k
        out[k] = t.contiguous()
    return out, aliases


def saved_spec(directory: str | Path, trust_code: bool = False):
    """The base model spec of a folder written by :func:`save_quantized`, checked.

    Checks what :func:`load_quantized` checks before it builds anything (hashes, format,
    trust); the CLI uses it to load the base model beside the quantized one.
    """
    from slimformer.models.loading import saved_model_spec

    meta = read_quantized(directory)
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
    from slimformer.models.loading import load_model, saved_model_spec
    from slimformer.prune.serialize import replay_slices

    directory = Path(directory)
    meta = read_quantized(directory)
    _quant_config(meta, directory / META)  # checked before the base model is built
    lm = load_model(saved_model_spec(meta["model_spec"], str(directory / META), trust_code))
    if meta["slice_spec"]:  # pruned before quantization: rebuild the smaller model
        replay_slices(lm, meta, directory / META, REDO)
    return quantized_from(lm, meta, directory)


def quantized_from(loaded, meta: dict, directory: str | Path):
    """Wrap ``loaded.module`` with the recorded quantizers and load the folder's tensors.

    ``loaded``: the base model, rebuilt (and sliced) as the checked manifest ``meta`` of
    ``directory`` records; its module becomes the quantized model's (its weights are replaced by
    the dequantized codes). Returns the quantized model in quant mode.

    Raises:
        ModelLoadError: A tensor that does not fit the rebuilt model; an invalid config.
    """
    from safetensors.torch import load_file

    from slimformer.models.structure import discover
    from slimformer.quantize.build import build

    directory = Path(directory)
    config = _quant_config(meta, directory / META)
    smap = discover(loaded.module, loaded.example_inputs(2),
                    require_attention=config.softmax_kind != "none")
    if config.rotate == "on":  # saved rotated: the readers (a tied head) had their own weights
        from slimformer.quantize.rotate import untie_readers

        if untie_readers(loaded.module, smap):  # the head is now a Linear of its own
            smap = discover(loaded.module, loaded.example_inputs(2),
                            require_attention=config.softmax_kind != "none")
    qmodel = build(loaded.module, smap, config)
    tensors_path = directory / TENSORS
    codes, aliases = meta["codes"], meta["aliases"]
    if not (isinstance(codes, dict) and isinstance(aliases, dict)):
        raise ModelLoadError(f"{directory / META}: 'codes' and 'aliases' must be mappings; "
                             f"{REDO}")
    fit_slots(qmodel, meta["tensors"], tensors_path, codes)
    state = load_file(str(tensors_path))
    packed = {k: state.pop(k) for k in codes}
    derived = {rec["param"] for rec in codes.values() if rec["param"]}
    missing, extra = qmodel.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - derived - set(aliases))
    if missing or extra:
        raise ModelLoadError(f"{tensors_path} does not fit the rebuilt model: missing "
                             f"{missing[:5]}, unexpected {list(extra)[:5]}; {REDO}")
    _restore_codes(qmodel, packed, codes, meta["inference_form"], tensors_path)
    qmodel._rebind()
    if meta["inference_form"]:
        for a in qmodel.quant.attention.values():
            a.inference = True
        qmodel.inference = True
    qmodel.quant.set_mode("quant")
    return qmodel


@torch.no_grad()
def _restore_codes(qmodel, packed: dict[str, torch.Tensor], codes: dict[str, dict],
                   inference: bool, source) -> None:
    """Unpack each site's codes; rebuild its float weight; keep the codes in inference form."""
    from slimformer.quantize.pack import unpack_codes
    from slimformer.quantize.state import LinearQuant

    for key, rec in codes.items():
        site = qmodel.get_submodule(key.rpartition(".")[0])
        wq = site.wq
        c = unpack_codes(packed[key], rec["bits"], tuple(rec["shape"]), f"{source}: {key}")
        if rec["param"]:
            dense = (c.float() - wq.zero) * wq.scale  # (rows, cols)
            w = site.param[0]
            w.copy_(site._unmatrix(dense) if isinstance(site, LinearQuant) else dense)
        if inference:
            site.int_weight = c
        site._cache = None


def fit_slots(qmodel: nn.Module, manifest: dict[str, dict], source,
              codes: dict[str, dict] | None = None) -> None:
    """Check each saved tensor against the rebuilt ``qmodel``; shape the calibrated slots.

    Model tensors must have the rebuilt model's dtype and shape (a Linear may gain the bias
    that RepQ's fold adds, of its output size). Quantizer slots whose shape comes from
    calibration are checked against what they can hold: packed codes (``codes``: the records
    of :func:`save_quantized`) their site's bit-width and weight matrix, rounding logits the
    shape of their weight matrix, weight scales one value or one per output row, activation
    ranges 1-D, probability scales 0-D.

    Raises:
        ModelLoadError: Naming the first tensors that do not fit.
    """
    codes = codes or {}
    bad = [f"{key}: recorded as packed codes but absent from the file"
           for key in codes if key not in manifest]
    for key, rec in manifest.items():
        dtype, shape = rec["dtype"], tuple(rec["shape"])
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = qmodel.get_submodule(owner_name)
        except AttributeError:
            bad.append(f"{key}: the rebuilt model has no such tensor")
            continue
        if key in codes:
            why = _codes_problem(owner, attr, codes[key], dtype, shape)
            if why:
                bad.append(f"{key}: {why}")
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


def _codes_problem(owner, attr, rec, dtype, shape) -> str | None:
    """Why packed codes of ``dtype``/``shape`` recorded as ``rec`` cannot fill ``owner.attr``."""
    from slimformer.quantize.pack import packed_bytes
    from slimformer.quantize.state import EmbeddingQuant, LinearQuant

    if not isinstance(owner, (LinearQuant, EmbeddingQuant)) or attr != "int_weight":
        return "packed codes of something that is not a quantized weight"
    if not (isinstance(rec, dict) and {"bits", "shape", "param"} <= set(rec)):
        return "its packed-code record is malformed"
    want = list((owner.matrix() if isinstance(owner, LinearQuant) else owner.param[0]).shape)
    if rec["bits"] != owner.wq.bits or rec["shape"] != want:
        return (f"{rec['bits']}-bit codes of {rec['shape']} recorded, the rebuilt model has "
                f"{owner.wq.bits}-bit codes of {want}")
    if rec["param"] not in (None, "model." + owner.name):
        return f"recorded for weight {rec['param']!r}, the site quantizes model.{owner.name}"
    n = packed_bytes(want[0] * want[1], owner.wq.bits)
    return None if (dtype, shape) == ("U8", (n,)) else \
        f"{dtype} {list(shape)} in the file, U8 [{n}] expected ({owner.wq.bits}-bit codes of {want})"


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
    if isinstance(owner, ActQuantizer) and attr in ("rot_signs", "rot_a", "rot_b"):
        ok = dtype == "F32" and (len(shape) == 1 if attr == "rot_signs" else
                                 len(shape) == 2 and shape[0] == shape[1]) and min(shape) >= 1
        return None if ok else (f"{dtype} {list(shape)} in the file, F32 rotation "
                                f"{'signs (C,)' if attr == 'rot_signs' else 'factor (n, n)'} "
                                "expected")
    if isinstance(owner, ActQuantizer) and attr == "outliers":
        return None if dtype == "I64" and len(shape) == 1 and shape[0] >= 1 else \
            f"{dtype} {list(shape)} in the file, 1-D I64 channel indices expected"
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
