"""TensorRT engines from (QDQ) ONNX files, with the official ``tensorrt`` Python API.

``build_engine(onnx_path, engine_path, config, inputs)`` parses the ONNX file, sets the precision
flags (explicit quantization comes from the Q/DQ nodes; INT8/FP16 flags allow the kernels),
one optimization profile covering the dynamic axes (batch and sequence ranges of the config), a
timing cache (loaded when it exists, saved after the build) and writes the serialized engine
atomically. Beside it goes ``<engine>.trtexec.sh``: the equivalent ``trtexec`` command line, which
:func:`trtexec_command` also gives without TensorRT installed.

TensorRT cannot be installed on machines without NVIDIA's package index; ``import tensorrt``
failing raises :class:`~slimformer.errors.ExportError` saying so. Nothing else imports it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from slimformer.errors import ExportError
from slimformer.export.config import TensorRTConfig


@dataclass(frozen=True)
class EngineResult:
    """A built engine and how it was built."""

    engine: Path
    trtexec: str
    profile: dict[str, tuple[list[int], list[int], list[int]]]
    size_bytes: int
    tensorrt_version: str


def profile_shapes(onnx_path: str | Path, config: TensorRTConfig
                   ) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """``{input: (min, opt, max)}`` shapes: symbolic axis 0 = batch, other symbolic = sequence."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        shapes = ([], [], [])
        for axis, d in enumerate(dims):
            for k in range(3):
                if d.dim_param or d.dim_value == 0:
                    rng = config.batch if axis == 0 else config.sequence
                    shapes[k].append(rng[k])
                else:
                    shapes[k].append(d.dim_value)
        out[inp.name] = shapes
    return out


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, config: TensorRTConfig,
                    profile: dict | None = None) -> str:
    """The ``trtexec`` command line equivalent to :func:`build_engine`."""
    profile = profile if profile is not None else profile_shapes(onnx_path, config)

    def fmt(k: int) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s[k]))}" for n, s in profile.items())

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            f"--memPoolSize=workspace:{config.workspace_mib}M",
            f"--builderOptimizationLevel={config.builder_optimization_level}"]
    if config.strongly_typed:
        args.append("--stronglyTyped")
    else:
        args += ["--fp16"] if config.fp16 else []
        args += ["--int8"] if config.int8 else []
    if any(s[0] != s[2] for s in profile.values()):
        args += [f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}"]
    if config.timing_cache:
        args.append(f"--timingCacheFile={config.timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


def tensorrt_available() -> str | None:
    """TensorRT's version, or None when ``import tensorrt`` fails."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def build_engine(onnx_path: str | Path, engine_path: str | Path,
                 config: TensorRTConfig | None = None) -> EngineResult:
    """Build and serialize a TensorRT engine (see module doc)."""
    from slimformer.store.atomic import atomic_path, write_text_atomic

    config = config or TensorRTConfig()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path} does not exist")
    if not engine_path.parent.is_dir():
        raise ExportError(f"{engine_path}: folder {engine_path.parent} does not exist")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError(
            "TensorRT is not installed (import tensorrt failed): install NVIDIA's tensorrt wheel "
            "on a machine with an NVIDIA GPU, or run the trtexec command: "
            + trtexec_command(onnx_path, engine_path, config)) from exc
    profile = profile_shapes(onnx_path, config)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if config.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    cfg.builder_optimization_level = config.builder_optimization_level
    if not config.strongly_typed:
        if config.fp16:
            cfg.set_flag(trt.BuilderFlag.FP16)
        if config.int8:
            cfg.set_flag(trt.BuilderFlag.INT8)
    if any(s[0] != s[2] for s in profile.values()):
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            prof.set_shape(name, lo, opt, hi)
        cfg.add_optimization_profile(prof)
    cache_path = Path(config.timing_cache) if config.timing_cache else None
    cache = cfg.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists()
                                    else b"")
    cfg.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, cfg)
    if plan is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(plan))
    if cache_path:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(cfg.get_timing_cache().serialize()))
    cmd = trtexec_command(onnx_path, engine_path, config, profile)
    write_text_atomic(engine_path.with_name(engine_path.name + ".trtexec.sh"),
                      f"#!/usr/bin/env bash\n# equivalent of slimformer export tensorrt\n{cmd}\n")
    return EngineResult(engine_path, cmd, profile, engine_path.stat().st_size, trt.__version__)
