"""The ``hls`` stage: an hls4ml FPGA project of the current model, in ``<output>/hls/``."""

from __future__ import annotations

from typing import Literal

from slimformer.hardware.config import HlsConfig
from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext


class HlsStage(HlsConfig):
    """An hls4ml FPGA project of the current model (see ``HlsConfig``); written to ``<output>/hls/``.

    The project is compiled and C-simulated on the evaluation data unless ``csim`` is false.
    """

    type: Literal["hls"] = "hls"
    csim: bool = True

    def hls_config(self) -> HlsConfig:
        """The plain config, without the stage fields."""
        return HlsConfig(**self.model_dump(exclude={"type", "csim"}))


def run(ctx: RunContext, stage: HlsStage) -> StageRecord:
    """Build, compile and C-simulate an hls4ml project of the current model; ``hls/`` artifact."""
    from slimformer.hardware.api import build_hls, summary

    calib = ctx.data.get("calib")
    res = build_hls(ctx.model, stage.hls_config(), ctx.artifact_dir("hls"), calib,
                    ctx.eval_data if stage.csim else None, compile=stage.csim,
                    progress=ctx.progress)
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"))
    where = str(res.project_dir)  # the staging folder: name it as the run folder's hls/
    rec.metrics = {k: v.replace(where, "hls") if isinstance(v, str) else v
                   for k, v in summary(res).items()}
    rec.notes = [n.replace(where, "hls") for n in res.notes]
    return rec
