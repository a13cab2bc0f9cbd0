"""repquant's learned dual clipping of the per-channel activation quantizers, judged at the output.

Each per-channel site learns its lower and upper bounds
(:func:`~slimformer.quantize.repq.learn_dual_clipping`) where that lowers its Linears' output
error on rows of other calibration batches; the learned bounds as a whole are kept only if they
lower the model output error vs float on the judging rows by
:data:`~slimformer.quantize.holdout.MARGIN`.
"""

from __future__ import annotations

from slimformer.quantize.capture import float_outputs, output_error
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.holdout import MARGIN, SiteChoice, decide
from slimformer.quantize.repq import learn_dual_clipping
from slimformer.quantize.select import calibrate_weights
from slimformer.quantize.state import QuantizedModel


def dual_clipping(qmodel: QuantizedModel, judge_data, config: QuantConfig, tick,
                   choices: list[SiteChoice]) -> list[str]:
    """Learn the dual clipping of every per-channel activation quantizer; notes.

    Each site's bounds must lower its Linears' output error on rows of other calibration batches
    (:func:`~slimformer.quantize.repq.learn_dual_clipping`); then the model as a whole must gain:
    the output error vs float on ``judge_data`` (the held-out calibration rows) with the learned
    bounds must beat the observed ranges by :data:`~slimformer.quantize.holdout.MARGIN`, else
    every range goes back (recorded in ``choices``). A layer-local gain does not always carry to
    the output (a rare large token clipped).
    """
    state, notes = qmodel.quant, []
    per_channel = [act for act in state.acts.values() if act.per_channel]
    observed = {act.name: (act.lo.detach().clone(), act.hi.detach().clone())
                for act in per_channel}
    kept = 0
    for i, act in enumerate(per_channel):
        ws = [lq.matrix().detach() for lq in state.linears.values() if lq.act is act]
        gain = learn_dual_clipping(act, ws, config.clip_steps)
        kept += gain > 0
        if gain > 0:
            notes.append(f"{act.name}: dual clipping cut the held-out output error by "
                         f"{100 * gain:.1f}%")
        tick("dual clipping", i + 1, len(per_channel))
    if kept < len(per_channel):
        notes.append(f"dual clipping not kept at {len(per_channel) - kept} of {len(per_channel)}"
                     " site(s): no clear gain on held-out calibration rows")
    if not kept:
        return notes
    calibrate_weights(state, search=True)  # the quantized model before reparameterization
    clipped = {act.name: (act.lo.detach().clone(), act.hi.detach().clone())
               for act in per_channel}
    refs = float_outputs(qmodel, judge_data, config)  # once, for both settings
    with_clip = output_error(qmodel, judge_data, config, refs)
    for act in per_channel:
        act.set_range(*observed[act.name])
    without = output_error(qmodel, judge_data, config, refs)
    state.set_mode("observe")
    choices.append(decide("model", "dual clipping", {"observed ranges": without,
                                                     "learned bounds": with_clip}, MARGIN))
    if choices[-1].kept == "learned bounds":
        for act in per_channel:
            act.set_range(*clipped[act.name])
        notes.append(f"dual clipping kept at {kept} site(s): model output error {without:.4g} ->"
                     f" {with_clip:.4g} on the held-out calibration rows")
    else:
        notes.append(f"dual clipping dropped: its {kept} site(s) did not cut the model output "
                     f"error by {100 * (1 - MARGIN):.0f}% ({without:.4g} -> {with_clip:.4g})")
    return notes
