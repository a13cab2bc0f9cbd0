"""The report of a run: a versioned, JSON-serializable record of every stage and the environment."""

from __future__ import annotations

import datetime as dt
import platform
from importlib import metadata
from typing import Any

from pydantic import BaseModel, Field

REPORT_SCHEMA_VERSION = 1
_PACKAGES = ("torch", "transformers", "timm", "onnx", "onnxruntime", "optuna", "hls4ml",
             "numpy", "safetensors", "pydantic")


class StageRecord(BaseModel):
    """What one stage did: its config, the metrics measured after it, its duration and notes.

    ``latency`` maps ``"batch=N"`` (PyTorch) or ``"<runtime> batch=N"`` (e.g. ``onnxruntime``)
    to statistics in ms; ``images`` maps a caption to a PNG that the stage's artifact holds, as a
    path relative to the run folder (the HTML report embeds it). ``warnings`` says what the
    stage lost past the run's budget (:mod:`slimformer.stages.quality`).
    """

    index: int
    type: str
    config: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0
    metrics: dict[str, Any] = Field(default_factory=dict)
    latency: dict[str, dict[str, float]] = Field(default_factory=dict)  # "batch=1" -> stats
    size: dict[str, int] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    images: dict[str, str] = Field(default_factory=dict)  # caption -> PNG path in the run folder
    warnings: list[str] = Field(default_factory=list)  # e.g. a loss past the budget
    # the algorithm's whole result as its summary() gives it (JSON), where the metrics keep
    # only figures: e.g. the export's parity per shape and every lint finding
    result: dict[str, Any] = Field(default_factory=dict)


class Report(BaseModel):
    """The whole run."""

    schema_version: int = REPORT_SCHEMA_VERSION
    slimformer_version: str = ""
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(
        timespec="seconds"))
    name: str = "run"
    headline: str = ""  # one line: size x, accuracy delta, deployed latency ratio (summary.py)
    recipe: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    structure: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageRecord] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)  # of the final model
    environment: dict[str, Any] = Field(default_factory=dict)
    seeds: dict[str, int] = Field(default_factory=dict)
    total_seconds: float = 0.0


def environment() -> dict[str, Any]:
    """Python, OS, CPU count, torch threads and versions of the packages that matter."""
    import os

    import torch

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
    }
