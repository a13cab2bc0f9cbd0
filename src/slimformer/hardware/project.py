"""Write an :class:`~slimformer.hardware.graph.HlsGraph` as an hls4ml project (``ModelGraph``).

hls4ml's PyTorch front end cannot take a real transformer (it stops at ``x.shape``, treats
parameters as extra inputs, has no mean), so we hand hls4ml the layer list its converters would
produce, from our own lowering, with every precision set explicitly. hls4ml then runs its
optimizer flows, writes the C++ and compiles it. Weights are given in hls4ml's ``(in, out)``
layout. The workarounds for hls4ml's remaining pitfalls are applied in :mod:`.adapter`.
"""

from __future__ import annotations

import fnmatch
import warnings
from pathlib import Path

import numpy as np

from slimformer.errors import ConfigError
from slimformer.hardware.config import HlsConfig
from slimformer.hardware.graph import HlsGraph, Op
from slimformer.hardware.precision import Precisions

# hls4ml layer class of each of our operation kinds (the supported set, as data)
HLS_CLASS = {
    "input": "InputLayer", "dense": "Dense", "layernorm": "LayerNormalization",
    "einsum": "Einsum", "softmax": "Softmax", "relu": "Activation", "add": "Merge",
    "mul": "Merge", "add_const": "BatchNormalization", "scale": "BatchNormalization",
    "mean": "GlobalAveragePooling1D", "reshape": "Reshape", "transpose": "Transpose",
    "cast": "Activation", "sigmoid": "Activation",
}


def reuse_of(op: Op, config: HlsConfig) -> int:
    """Reuse factor of one operation: first matching override, else the global one."""
    for o in config.reuse_overrides:
        if fnmatch.fnmatchcase(op.module, o.pattern):
            return o.reuse_factor
    return config.reuse_factor


def check_reuse_patterns(graph: HlsGraph, config: HlsConfig) -> None:
    """Every reuse override must match at least one layer's module path."""
    mods = [o.module for o in graph.ops]
    problems = [f"reuse_overrides[{i}].pattern: {o.pattern!r} matches no layer"
                for i, o in enumerate(config.reuse_overrides)
                if not any(fnmatch.fnmatchcase(m, o.pattern) for m in mods)]
    if problems:
        examples = ", ".join(list(dict.fromkeys(m for m in mods if m))[:6])
        raise ConfigError([*problems, f"(module paths look like: {examples} ...)"], "hls config")


def layer_list(graph: HlsGraph, prec: Precisions) -> list[dict]:
    """The hls4ml layer dictionaries of ``graph`` (as hls4ml's converters write them)."""
    layers = []
    for op in graph.ops:
        d = {"name": op.name, "class_name": HLS_CLASS[op.kind], "inputs": list(op.inputs)}
        a = op.attrs
        shape_in = graph.op(op.inputs[0]).shape if op.inputs else op.shape
        k = op.kind
        if k == "input":
            d = {"name": op.name, "class_name": "InputLayer", "input_shape": list(op.shape)}
        elif k == "dense":
            w = prec.weights[op.name].numpy()  # (out, in), already on the weight grid
            d.update(n_in=w.shape[1], n_out=w.shape[0], weight_data=np.ascontiguousarray(w.T),
                     bias_data=prec.biases[op.name].numpy(), use_bias=True)
        elif k == "layernorm":
            d.update(n_in=int(np.prod(op.shape)), seq_len=int(np.prod(op.shape[:-1])), axis=2,
                     gamma_data=a["gamma"].double().numpy(), beta_data=a["beta"].double().numpy(),
                     epsilon_power_of_10=prec.ln_eps_power[op.name])
        elif k == "einsum":
            s0 = (1, *graph.op(op.inputs[0]).shape)
            s1 = (1, *graph.op(op.inputs[1]).shape)
            d.update(equation=a["equation"], inp0_shape=s0, inp1_shape=s1,
                     out_shape=(1, *op.shape))
        elif k == "softmax":
            d.update(activation="softmax", axis=a["axis"] + 1, n_in=int(np.prod(op.shape)))
        elif k in ("relu", "cast", "sigmoid"):
            d.update(activation={"cast": "linear"}.get(k, k), n_in=int(np.prod(op.shape)))
        elif k in ("add", "mul"):
            d.update(op="add" if k == "add" else "multiply")
        elif k in ("add_const", "scale"):
            n = int(np.prod(op.shape))
            if k == "add_const":
                scale, bias = np.ones(n), a["value"].double().reshape(-1).numpy()
            else:
                scale, bias = np.full(n, a["value"]), np.zeros(n)
            d.update(n_in=n, n_filt=-1, scale_data=scale, bias_data=bias,
                     use_gamma=k == "scale", use_beta=k == "add_const")
        elif k == "mean":
            d.update(n_in=shape_in[0], n_filt=shape_in[1], data_format="channels_last")
        elif k == "reshape":
            d.update(target_shape=list(op.shape))
        elif k == "transpose":
            d.update(perm=list(a["perm"]))
        layers.append(d)
    return layers


def hls_config(graph: HlsGraph, prec: Precisions, config: HlsConfig, out_dir: Path,
               trace: bool = False) -> dict:
    """The hls4ml converter config: part, clock, io type and a per-layer precision table."""
    from hls4ml.converters import create_config

    cfg = create_config(output_dir=str(out_dir), project_name=config.project_name,
                        backend=config.backend, part=config.part,
                        clock_period=config.clock_period_ns, io_type=config.io_type)
    names = {}
    for op in graph.ops:
        entry = {"Precision": dict(prec.types[op.name]), "ReuseFactor": reuse_of(op, config),
                 "Strategy": config.strategy, "Trace": trace}
        if op.kind == "softmax":
            entry.update(Implementation="stable", exp_table_size=config.table_size,
                         inv_table_size=config.table_size)
        if op.kind == "sigmoid":
            entry.update(table_size=config.table_size)
        if op.kind == "layernorm":
            entry.update(table_size=config.table_size,
                         table_range_power2=prec.ln_range_power2[op.name])
        names[op.name] = entry
    cfg["HLSConfig"] = {"Model": {"Precision": "fixed<32,16>", "ReuseFactor": config.reuse_factor,
                                  "Strategy": config.strategy, "BramFactor": 1_000_000_000,
                                  "TraceOutput": False},
                        "LayerName": names}
    cfg["InputData"] = cfg["OutputPredictions"] = None
    return cfg


def build_model_graph(graph: HlsGraph, prec: Precisions, config: HlsConfig, out_dir: Path,
                      trace: bool = False):
    """The hls4ml ``ModelGraph`` of ``graph`` with the adapter's fixes applied."""
    from hls4ml.model.graph import ModelGraph

    from slimformer.hardware import adapter

    cfg = hls_config(graph, prec, config, out_dir, trace)
    layers = layer_list(graph, prec)
    with warnings.catch_warnings():  # hls4ml's pointwise pass re-cases 'latency' and says so
        warnings.filterwarnings("ignore", message="Overriding attribute 'strategy'")
        model = ModelGraph.from_layer_list(cfg, layers, inputs=list(graph.inputs),
                                           outputs=list(graph.outputs))
    adapter.apply(model, graph, prec)
    return model
