"""Measure a sub-network for real: extract it as a smaller model, quantize it, evaluate it.

Extraction reuses prune's physical slicing (:func:`slimformer.prune.slicing.slice_model`) for
heads and MLP units; dropped residual blocks are replaced by a module that returns its input.
Each layer group gets its bit-widths through :class:`~slimformer.quantize.config.QuantConfig`
``overrides`` (``float`` layers through ``keep_float``), the embedding tables through
``embedding_bits``. Latency is that of the quantized sub-network as deployed: exported by
:func:`slimformer.export.onnx.export_onnx` in its QDQ form (without its checks) and timed
in ONNX Runtime (median of repeats), so bit-widths count there too; when the QDQ export fails, the
float sub-network is timed instead and the measurement says so (``latency_form``, ``notes``).
Size is the deployed size in bytes (quantized weights and embedding tables at their bit-width);
MACs per sample come from the sliced model's forward.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimformer.nas.space import SubNet
from slimformer.nas.supernet import SuperNet
from slimformer.store.outdir import scratch_root


class DroppedBlock(nn.Module):
    """Stands in for a dropped residual block: returns the hidden state it was given.

    Args:
        output_tuple: 0 when the block returned a tensor, else the length of its output tuple
            (the hidden state first, the other items None).
    """

    def __init__(self, output_tuple: int = 0):
        super().__init__()
        self.output_tuple = output_tuple

    def forward(self, *args, **kwargs):
        """Return the first tensor argument (in the block's output format)."""
        from slimformer.nas.space import _first_tensor

        x = _first_tensor((args, kwargs))
        return x if not self.output_tuple else (x, *([None] * (self.output_tuple - 1)))


def slicing_available() -> bool:
    """Whether prune's physical slicing can be imported."""
    try:
        from slimformer.prune.slicing import slice_model  # noqa: F401
    except ImportError:
        return False
    return True


def extract(net: SuperNet, sub: SubNet) -> tuple[nn.Module, bool]:
    """The sub-network as a standalone model and whether it was physically sliced.

    Without prune's slicing the heads and units are masked (zeroed) in a copy instead; dropped
    blocks are removed either way.
    """
    space = net.space
    heads, units = net.kept(sub)
    attn_on, mlp_on = space.site_kept(sub)
    heads = {i: k for i, k in heads.items() if attn_on[i] and len(k) < space.full_heads[i]}
    units = {i: k for i, k in units.items() if mlp_on[i] and len(k) < space.full_mlp[i]}
    sliced = True
    if heads or units:
        try:
            from slimformer.prune.slicing import SliceSpec, slice_model
        except ImportError:
            sliced = False
        if sliced:
            model = slice_model(net.model, net.structure, SliceSpec(heads=heads, mlp=units),
                                inplace=False)
        else:
            model = _masked_copy(net, sub)
    else:
        model = copy.deepcopy(net.model)
    for b, blk in enumerate(space.blocks):
        if not sub.keep[b]:
            parent, _, child = blk.path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    DroppedBlock(blk.output_tuple))
    return model.eval(), sliced


def _masked_copy(net: SuperNet, sub: SubNet) -> nn.Module:
    """A deep copy whose head / unit masks stay applied (fallback without prune's slicing)."""
    twin = SuperNet(copy.deepcopy(net.model), net.structure, net.space)
    twin.load_state(net.state())
    twin._set(sub)
    twin._skip = set()
    hooks = twin._hooks()
    hooks.__enter__()  # kept for the copy's lifetime
    twin.model._nas_masks = twin  # keep the masks alive with the model
    return twin.model


def quant_config(net: SuperNet, sub: SubNet, model: nn.Module, base=None):
    """``base`` (method, calibration, softmax ...) with the sub-network's bit-widths.

    Each surviving layer group gets its bit-widths as overrides, float groups are kept float,
    the embedding tables get their bits.
    """
    from slimformer.quantize.config import LayerOverride, QuantConfig

    base = base if base is not None else QuantConfig()

    names = {n for n, _ in model.named_parameters()}
    overrides, keep_float = [], []
    for g, weights in enumerate(net.space.groups):
        alive = [w for w in weights if w in names]
        wb, ab = sub.wbits[g], sub.abits[g]
        if wb == "float":
            keep_float += alive
        elif wb != 8 or ab != 8:
            overrides += [LayerOverride(pattern=w, weight_bits=wb, act_bits=ab) for w in alive]
    ebits = getattr(sub, "ebits", "float")
    return base.model_copy(update={
        "weight_bits": 8, "act_bits": 8, "overrides": overrides, "keep_float": keep_float,
        "embedding_bits": None if ebits == "float" else int(ebits)})


def exported_latency(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 20,
                     warmup: int = 3, threads: int | None = None) -> float:
    """Median wall time (ms) of ``model`` on ``inputs`` in ONNX Runtime on this machine's CPU.

    ``model`` is a float module or a quantized model (exported as QDQ); it is written by
    :func:`slimformer.export.onnx.export_onnx` without the checker, the parity check or the
    lint, then timed with :func:`slimformer.export.ortrun.ort_latency` on ``threads``
    (default ``torch.get_num_threads()``) threads. The axes stay symbolic as in any export: a static
    batch-1 QDQ graph of MiniLM lost ONNX Runtime's Q/DQ fusion of its MLP weights here (3x
    slower than float), the symbolic one is fully integer.
    """
    from slimformer.export.config import OnnxConfig
    from slimformer.export.onnx import export_onnx
    from slimformer.export.ortrun import ort_latency

    with tempfile.TemporaryDirectory(prefix="slimformer-nas-", dir=scratch_root()) as d:
        path = Path(d) / "model.onnx"
        export_onnx(model, path, inputs, OnnxConfig(check=False, lint=False))
        return float(ort_latency(path, inputs, repeats, warmup,
                                 threads=threads or torch.get_num_threads())["median_ms"])


def deployed_latency(qmodel, float_model: nn.Module, inputs: dict[str, torch.Tensor],
                     repeats: int = 20) -> tuple[float, str, list[str]]:
    """``(ms, form, notes)``: the QDQ export of ``qmodel`` timed, else ``float_model``'s.

    ``form`` is ``qdq`` or ``float`` (the quantized export failed; the note says why). A float
    export that fails too raises :class:`~slimformer.errors.ExportError`.
    """
    from slimformer.errors import ExportError

    try:
        return exported_latency(qmodel, inputs, repeats), "qdq", []
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
        note = (f"latency: the QDQ export failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); the float sub-network "
                "was timed instead")
    try:
        return exported_latency(float_model, inputs, repeats), "float", [note]
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"ONNX export for the latency measurement failed: "
                          f"{type(exc).__name__}: {str(exc)[:300]}") from exc


@dataclass
class Measurement:
    """Measured objectives of one sub-network."""

    accuracy: float
    size: int
    macs: int
    latency: float | None
    params: int
    sliced: bool
    seconds: float
    notes: list[str] = field(default_factory=list)
    latency_form: str | None = None  # qdq | float (see deployed_latency)

    def value(self, objective: str) -> float:
        """The value of one objective."""
        return float(getattr(self, objective))


def measure(net: SuperNet, sub: SubNet, eval_data, calib_data, quant, latency: bool,
            latency_inputs: dict[str, torch.Tensor] | None = None, latency_repeats: int = 20,
            return_model: bool = False):
    """Extract, quantize (``quant``: the search's QuantConfig) and evaluate ``sub``.

    Returns a :class:`Measurement` (and, with ``return_model``, the quantized and float models).
    """
    from slimformer.data.datasets import make_loader
    from slimformer.models.evaluate import model_size, predict
    from slimformer.models.structure import discover
    from slimformer.quantize.api import _batches, quantize

    t0 = time.perf_counter()
    model, sliced = extract(net, sub)
    first = next(_batches(calib_data, 2, 2))
    smap = discover(model, first, require_attention=False)
    cfg = quant_config(net, sub, model, quant)
    res = quantize(model, cfg, calib_data, smap, inplace=False)
    preds, labels = predict(res.model, make_loader(eval_data, 256))
    lat, form, notes = None, None, []
    if latency:
        lat, form, notes = deployed_latency(res.model, model, latency_inputs, latency_repeats)
    m = Measurement(accuracy=float((preds == labels).float().mean()),
                    size=int(model_size(res.model)["bytes"]), macs=int(smap.macs),
                    latency=lat, params=int(sum(p.numel() for p in model.parameters())),
                    sliced=sliced, seconds=time.perf_counter() - t0, notes=notes,
                    latency_form=form)
    if not sliced:
        m.notes.append("prune's physical slicing is not available: heads/units were masked, "
                       "so size, MACs and latency count them")
    return (m, res.model, model) if return_model else m
