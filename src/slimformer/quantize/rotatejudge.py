"""The online input rotation judged at the model level (``rotate_inputs: auto``).

The rotation (:mod:`~slimformer.quantize.inrotate`) spreads channels that dwarf the rest; on a
model without them it only reshuffles what the grid sees (vit-fmnist W8A8: 42.2 dB either way;
W3A3 per token on 2,000 test rows: accuracy 0.8565 -> 0.8560, agreement 0.949 -> 0.945). So
``auto`` splits the calibration rows (:func:`~slimformer.quantize.holdout.split`, seeded),
calibrates the model with and without the
rotation on the fit rows (the config's method, bits and GPTQ; no smoothing pass of its own)
and keeps the rotation only where the model output error vs float on the held-out rows
(:func:`~slimformer.quantize.capture.output_error`) is lower by
:data:`~slimformer.quantize.holdout.MARGIN`. The trial rotates the model's Linear weights in
place; they are put back bit for bit from a copy (memory: one copy of the Linear weights while
it runs). The decision is a :class:`~slimformer.quantize.holdout.SiteChoice` (``site ==
"rotate_inputs"``) and a note.
"""

from __future__ import annotations

import torch

from slimformer.quantize.holdout import MARGIN, MIN_ROWS, split
from slimformer.quantize.outputjudge import decide, held_out_errors


def rotate_judged(model: torch.nn.Module, structure, data, config, choices: list,
                  tick=None) -> tuple[str, list[str]]:
    """``"on"`` or ``"off"``: whether the rotation lowers the held-out error; and the notes.

    Args:
        model: The float model (left as it was).
        structure: Its :class:`~slimformer.models.structure.StructureMap`.
        data: Calibration rows (``({name: tensor}, label)`` items).
        config: The :class:`~slimformer.quantize.config.QuantConfig` (``rotate_inputs: auto``).
        choices: Receives the decision (``site == "rotate_inputs"``).
        tick: ``tick(step, done, total)`` progress callback.
    """
    n = min(config.calib_samples, len(data))
    fit, held = split(data, n, config.seed)
    if held is None:
        return "off", [f"rotate_inputs auto: not tried: {n} calibration rows, under the "
                       f"{MIN_ROWS} needed to judge it on held-out rows (rotate_inputs: on "
                       "applies it)"]
    # GPTQ as configured: the rotation pays with it (minilm-vader W4A4 per token, 1,000 test
    # rows: 9.7 -> 13.0 dB, agreement 0.903 -> 0.924) and not without (9.7 -> 10.3 dB, 0.889)
    proxy = config.model_copy(update={"smooth": "off", "budget": None})
    weights = {r.weight for r in structure.linears}
    saved = {k: p.detach().clone() for k, p in model.named_parameters() if k in weights}
    try:
        errs = held_out_errors(model, structure, fit, held, config, [
            (label, proxy.model_copy(update={"rotate_inputs": label}),
             f"rotate_inputs judged, {'rotated' if label == 'on' else 'not rotated'}", None)
            for label in ("off", "on")], tick)
    finally:
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in saved:
                    p.copy_(saved[k])
    keep = decide(choices, "rotate_inputs", "rotation", errs, "on", "off",
                  ("rotated", "unrotated"))
    head = (f"rotate_inputs auto, judged at the model output ({config.method}, error vs float on "
            f"{len(held)} held-out calibration rows, calibrated on the other {len(fit)}): "
            f"rotated {errs['on']:.4g}, not rotated {errs['off']:.4g}: ")
    return ("on", [head + "rotation kept"]) if keep else \
        ("off", [head + f"not rotated (not {100 * (1 - MARGIN):.0f}% lower)"])
