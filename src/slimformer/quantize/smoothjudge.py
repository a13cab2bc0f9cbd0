"""The SmoothQuant migration judged at the model level: kept only where the held-out error drops.

:func:`~slimformer.quantize.smooth.migrate` chooses each site's strength by the local error of
the site's Linears; that does not always carry to the model output (measured: a random-weight
timm ViT, W8A8 minmax, every site locally better and the model output worse). So with
``smooth: auto`` the calibration rows are split first (:func:`~slimformer.quantize.holdout.split`,
seeded): the migration sees only the fit rows, and the migrated and the plain float model are
both calibrated with min/max (``percentile`` when that is the config's method; the config's
bit-widths) on those rows; the migration is kept only where the model output error vs float on
the held-out rows (:func:`~slimformer.quantize.capture.output_error`) is lower by
:data:`~slimformer.quantize.holdout.MARGIN`; otherwise the float weights are put back.

The held-out rows must be unseen by the migration too: its scales equalize the per-channel
maxima of the rows it sees, so on those rows no channel passes the per-tensor range, while on new
rows many do (measured, random-weight timm ViT W8A8 minmax: migrated on all 32 calibration rows,
the 8 held-out ones judged it 0.76x the error of no migration, 256 fresh rows 2.6x; migrated on
the 24 fit rows, held-out 4.4x, fresh 3.6x). Under :data:`~slimformer.quantize.holdout.MIN_ROWS`
calibration rows nothing can be held out and ``auto`` does not migrate (noted). ``smooth: on``
migrates on every calibration row without the judgement. The decision is a
:class:`~slimformer.quantize.holdout.SiteChoice` (``site == "smooth"``) with both errors, and a
note.
"""

from __future__ import annotations

import torch

from slimformer.quantize.holdout import MARGIN, MIN_ROWS, split
from slimformer.quantize.outputjudge import decide, held_out_errors
from slimformer.quantize.smooth import migrate


def migrate_judged(model: torch.nn.Module, structure, data, config, choices: list,
                   tick=None) -> list[str]:
    """Migrate ``model`` in place (``smooth: auto|on``); ``auto`` undoes it unless it helps.

    ``auto`` migrates on the fit rows only (see the module doc).

    Args:
        model: The float model (its weights change where the migration is kept).
        structure: Its :class:`~slimformer.models.structure.StructureMap`.
        data: Calibration rows (``({name: tensor}, label)`` items).
        config: The :class:`~slimformer.quantize.config.QuantConfig`.
        choices: Receives the per-site choices and the model-level one (``site == "smooth"``).
        tick: ``tick(step, done, total)`` progress callback.

    Returns:
        The notes (the migration's, then the judgement's).
    """
    if config.smooth != "auto":
        return migrate(model, structure, data, config, choices, tick)
    n = min(config.calib_samples, len(data))
    fit, held = split(data, n, config.seed)
    if held is None:
        return [f"smooth: not applied: {n} calibration rows, under the {MIN_ROWS} needed to "
                "judge the migration on held-out rows (smooth: on applies it unjudged)"]
    named = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in named.items()}
    notes = migrate(model, structure, fit, config, choices, tick)
    changed = {k: v for k, v in before.items() if not torch.equal(v, named[k])}
    del before
    if not changed:
        return notes
    proxy = config.model_copy(update={
        "method": config.method if config.method in ("minmax", "percentile") else "minmax",
        "smooth": "off", "budget": None, "attention": config.attention_kind,
        "rotate_inputs": "off"})  # rotating would change the model's weights in place
    was_training = model.training
    model.eval()
    # on the model itself (min/max leaves its weights as they are); "off": the float weights
    # swapped in (``changed`` then holds the migrated ones)
    errs = held_out_errors(model, structure, fit, held, config, [
        ("auto", proxy, "smooth judged, migrated", None),
        ("off", proxy, "smooth judged, not migrated", lambda: _swap(named, changed))], tick)
    model.train(was_training)
    keep = decide(choices, "smooth", "smoothing", errs, "auto", "off", ("migrated", "off"))
    head = (f"smooth judged at the model output ({proxy.method}, error vs float on {len(held)} "
            f"held-out calibration rows; migration and calibration on the other {len(fit)}): "
            f"migrated {errs['auto']:.4g}, off {errs['off']:.4g}: ")
    if keep:
        _swap(named, changed)  # the migrated weights back
        notes.append(head + "migration kept")
        return notes
    notes[0] = "smooth (SmoothQuant migration): undone, see the judgement below; was: " + notes[0]
    notes.append(head + f"undone (not {100 * (1 - MARGIN):.0f}% lower; the float weights are "
                 "the original ones)")
    return notes


@torch.no_grad()
def _swap(named: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Exchange the values of the parameters ``named[k]`` with ``values[k]`` (bit for bit)."""
    for k, v in values.items():
        p = named[k]
        values[k] = p.detach().clone()
        p.copy_(v)
