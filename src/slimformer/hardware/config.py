"""Typed configuration of an hls4ml FPGA project (also the recipe's ``hls`` stage)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class ReuseOverride(BaseModel):
    """Reuse factor of the layers whose module path matches ``pattern`` (fnmatch glob)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str
    reuse_factor: Annotated[int, Field(ge=1, le=4096)]


class HlsConfig(BaseModel):
    """How to build the hls4ml project.

    Attributes:
        backend: hls4ml backend: ``Vivado`` (Vivado HLS) or ``Vitis`` (Vitis HLS).
        part: FPGA part (default: hls4ml's VU13P, the part of the published transformer figure).
        clock_period_ns: Target clock period (5 ns = 200 MHz).
        io_type: Only ``io_parallel``: attention and LayerNorm have no streaming form here.
        strategy: hls4ml ``Latency`` (all multipliers unrolled) or ``Resource``.
        reuse_factor: Global reuse factor (multiplications per multiplier); ``auto``: the
            smallest power of two whose estimate fits 90% of the part's DSPs and LUTs.
        reuse_overrides: Ordered glob patterns over module paths; the first match wins; a pattern
            that matches no layer is an error.
        free_frac_bits: Fractional bits of tensors our quantization leaves in float (residual
            stream, attention scores, LayerNorm outputs not feeding a Linear); their integer bits
            come from the ranges seen on calibration data.
        accum_frac_bits: Fractional bits kept in accumulators (Dense, einsum) beyond which they
            are rounded; ``None`` keeps every product bit (exact).
        table_size: Entries of the softmax and LayerNorm lookup tables.
        gelu: ``refuse`` (GELU is an error listing where it is) or ``sigmoid``: the explicit
            substitution ``x * sigmoid(1.702 x)`` (hls4ml's sigmoid lookup table; max abs error
            0.02 against the exact GELU, reported).
        calib_samples: Calibration rows used to find the ranges of float tensors.
        project_name: Name of the HLS top function and project.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["Vivado", "Vitis"] = "Vitis"
    part: str = "xcvu13p-flga2577-2-e"
    clock_period_ns: Annotated[float, Field(gt=0.5, le=100.0)] = 5.0
    io_type: Literal["io_parallel"] = "io_parallel"
    strategy: Literal["Latency", "Resource"] = "Latency"
    reuse_factor: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = "auto"
    reuse_overrides: list[ReuseOverride] = Field(default_factory=list)
    free_frac_bits: Annotated[int, Field(ge=2, le=24)] = 10
    accum_frac_bits: Annotated[int, Field(ge=2, le=32)] | None = None
    table_size: Literal[256, 512, 1024, 2048, 4096] = 1024
    gelu: Literal["refuse", "sigmoid"] = "refuse"
    calib_samples: Annotated[int, Field(ge=1, le=100_000)] = 256
    project_name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "myproject"

    @property
    def clock_mhz(self) -> float:
        """Clock frequency in MHz."""
        return 1000.0 / self.clock_period_ns
