"""Running a quantized model over calibration rows: batches, output error, layer inputs.

Shared by :mod:`~slimformer.quantize.api` and :mod:`~slimformer.quantize.holdout`; every function
takes the data set (or a :class:`~slimformer.quantize.holdout.Rows` view of it) to run.
"""

from __future__ import annotations

import torch

from slimformer.quantize.config import QuantConfig
from slimformer.quantize.state import QuantizedModel


def batches(calib_data, batch_size: int, limit: int):
    """Yield input dicts from a TensorDictDataset (first ``limit`` rows)."""
    from slimformer.data.datasets import trim_padding

    n = min(limit, len(calib_data))
    for i in range(0, n, batch_size):
        rows = [calib_data[j] for j in range(i, min(n, i + batch_size))]
        yield trim_padding(rows)[0]


# the most one calibration batch's float outputs may take (an LM's logits: rows x tokens x vocab)
OUTPUT_BYTES = 1 << 28


@torch.no_grad()
def fit_batch(model, calib_data, config: QuantConfig) -> tuple[QuantConfig, str | None]:
    """``config`` with ``calib_batch_size`` lowered so one batch's outputs fit :data:`OUTPUT_BYTES`.

    One row, padded to the data's full length (the longest a batch can be), runs through the
    float ``model``; its floating outputs' bytes per row set the rows per batch. Every pass
    over the calibration rows holds one batch's outputs (and the check two, float and
    quantized): SmolLM2-135M's logits take 25 MB per 128-token row, 0.8 GB per batch of 32.
    Returns the config unchanged (and no note) where the batch already fits.
    """
    from torch.utils.data import default_collate

    from slimformer.models.outputs import leaves

    if config.calib_batch_size == 1 or not len(calib_data):
        return config, None
    inputs, _ = default_collate([calib_data[0]])
    per_row = sum(t.numel() * t.element_size() for t in leaves(model(**inputs)).values()
                  if t.is_floating_point())
    rows = max(1, OUTPUT_BYTES // max(per_row, 1))
    if rows >= config.calib_batch_size:
        return config, None
    note = (f"calibration batches of {rows} rows, not calib_batch_size "
            f"{config.calib_batch_size}: one row's outputs take {per_row / 1e6:.0f} MB, a "
            f"batch's are kept under {OUTPUT_BYTES >> 20} MB")
    return config.model_copy(update={"calib_batch_size": rows}), note


def run(qmodel: QuantizedModel, calib_data, config: QuantConfig) -> None:
    """One pass of ``qmodel`` over the calibration rows, in its current mode."""
    with torch.no_grad():
        for inputs in batches(calib_data, config.calib_batch_size, config.calib_samples):
            qmodel(**inputs)


def sample_rows(x: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """``rows`` rows of ``x`` drawn with a fixed seed (the same rows for equally long inputs)."""
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:rows]]


def real_positions(out: torch.Tensor, inputs: dict) -> torch.Tensor:
    """``out`` without its padded positions: what the model's users read of it.

    An output ``(B, T, ...)`` (3 axes or more) whose first two axes are those of the input's
    ``attention_mask (B, T)`` keeps the positions where the mask is set, ``(n, ...)``; any other
    output, and every output of unpadded inputs, is returned as it is. A padded position's
    output is computed but nothing reads it (attention and pooling mask it), and a quantized
    model may be far off there: the 128 shortest MiniLM calibration sentences under per-channel
    ranges, -0.4 dB at the padded positions against 21.1 dB at the real ones, 13x their error.
    """
    mask = inputs.get("attention_mask")
    if (not isinstance(mask, torch.Tensor) or mask.dim() != 2 or out.dim() < 3
            or out.shape[:2] != mask.shape or bool(mask.all())):
        return out
    return out[mask.bool()]


def _outputs(out, inputs: dict) -> dict[str, torch.Tensor]:
    """The output leaves of one batch (:func:`~slimformer.models.outputs.leaves`), padding left out."""
    from slimformer.models.outputs import leaves

    return {k: real_positions(v, inputs) for k, v in leaves(out).items()}


def float_outputs(qmodel: QuantizedModel, calib_data, config: QuantConfig) -> list:
    """The float model's output leaves per calibration batch.

    The reference of :func:`output_error`, computed once when several settings are compared;
    padded positions left out (:func:`real_positions`).
    """
    state, refs = qmodel.quant, []
    with torch.no_grad():
        state.set_mode("float")
        for inputs in batches(calib_data, config.calib_batch_size, config.calib_samples):
            refs.append(_outputs(qmodel(**inputs), inputs))
    return refs


def output_error(qmodel: QuantizedModel, calib_data, config: QuantConfig,
                  refs: list | None = None, as_set: bool = False) -> float:
    """Output error of the quantized vs the float model on the calibration data.

    Every output counts: the mean over batches of :func:`~slimformer.models.outputs.normalized_mse`
    (so base models without class scores are judged on all their outputs), at the positions the
    inputs' attention mask keeps (:func:`real_positions`). ``refs``: the float
    outputs from :func:`float_outputs` (computed here when None). ``as_set``: run the quantizers
    in the modes (and with the weights) they have, instead of putting all in quant mode.
    """
    from slimformer.models.outputs import normalized_mse

    refs = float_outputs(qmodel, calib_data, config) if refs is None else refs
    state, total = qmodel.quant, 0.0
    if not as_set:
        state.set_mode("quant")
    with torch.no_grad():
        for inputs, ref in zip(batches(calib_data, config.calib_batch_size,
                                        config.calib_samples), refs, strict=True):
            total += float(normalized_mse(_outputs(qmodel(**inputs), inputs), ref))
    return total / max(len(refs), 1)


class _Stop(Exception):
    """Ends a forward pass once the layer being captured has run."""


def capture_one(qmodel: QuantizedModel, target, calib_data, config: QuantConfig,
                 rows: int = 4096, calls: int = 1) -> torch.Tensor:
    """Inputs of one Linear in the quantized model (rows sampled as in :func:`capture_float_inputs`).

    ``calls``: executions of the layer per forward; each forward stops after the last of them.
    """
    qmodel.quant.set_mode("quant")
    parts: list[torch.Tensor] = []
    seen = [0]

    def grab(x):
        parts.append(x.detach().reshape(-1, x.shape[-1]))
        seen[0] += 1
        if seen[0] % calls == 0:
            raise _Stop
        return target.act(x)

    target.act_in = grab
    try:
        with torch.no_grad():
            for inputs in batches(calib_data, config.calib_batch_size, config.calib_samples):
                try:
                    qmodel(**inputs)
                except _Stop:
                    pass
    finally:
        del target.act_in
    return sample_rows(torch.cat(parts), rows, config.seed)


def capture_float_inputs(qmodel: QuantizedModel, calib_data, config: QuantConfig,
                          rows: int = 4096, calls: dict[str, int] | None = None
                          ) -> dict[str, torch.Tensor]:
    """Inputs ``(rows, in)`` of every quantized Linear in the float model, in execution order.

    Rows are drawn as in :func:`capture_one`, so both captures of a layer hold the same rows;
    every call of a layer run several times per forward counts. ``calls``, when given, receives
    the executions per forward of each layer.
    """
    state = qmodel.quant
    state.set_mode("float")
    for lq in state.linears.values():
        lq.mode = "float"
    captured: dict[str, list[torch.Tensor]] = {}
    for lq in state.linears.values():
        def grab(x, lq=lq):
            captured.setdefault(lq.name, []).append(x.detach().reshape(-1, x.shape[-1]))
            return lq.act(x)

        lq.act_in = grab
    try:
        run(qmodel, calib_data, config)
    finally:
        for lq in state.linears.values():
            del lq.act_in  # back to the class method
    out = {}
    widths = {lq.name: lq.matrix().shape[1] for lq in state.linears.values()}
    forwards = len(range(0, min(config.calib_samples, len(calib_data)), config.calib_batch_size))
    for name, parts in captured.items():
        if calls is not None:
            calls[name] = max(1, len(parts) // max(forwards, 1))
        x = torch.cat(parts)
        if x.shape[-1] != widths[name]:
            continue  # convolutions: inputs are images, not rows
        out[name] = sample_rows(x, rows, config.seed)
    state.set_mode("quant")
    return out
