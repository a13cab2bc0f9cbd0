"""The flat graph of operations hls4ml can build (:class:`HlsGraph`) and its float64 execution.

:func:`slimformer.hardware.trace.trace_ops` writes it from a PyTorch model (operations in torch's
terms), the passes of :mod:`slimformer.hardware.rewrite` turn it into what hls4ml builds, and
:func:`run_float` executes either form alike (the rewrites are exact in float: a traced ``gelu``
already computes ``x * sigmoid(1.702 x)``). Shapes in the graph exclude the batch axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GELU_SIGMOID = 1.702  # gelu(x) ~ x * sigmoid(1.702 x)


@dataclass
class Op:
    """One operation: ``kind`` with named ``inputs``; ``shape`` excludes the batch axis."""

    name: str
    kind: str  # input dense layernorm einsum softmax relu sigmoid add mul add_const scale mean
    #            reshape transpose cast; traced only (rewritten before building): gelu matmul
    inputs: list[str]
    shape: tuple[int, ...]
    module: str = ""
    attrs: dict = field(default_factory=dict)


@dataclass
class HlsGraph:
    """Operations in execution order, the model input and output names."""

    ops: list[Op]
    inputs: list[str]
    outputs: list[str]

    @property
    def input_keys(self) -> list[str]:
        """The model's argument names of the inputs (the data's keys), in order."""
        return [self.op(n).attrs.get("key", n) for n in self.inputs]

    def op(self, name: str) -> Op:
        """The operation called ``name``."""
        return self._by_name()[name]

    def _by_name(self) -> dict[str, Op]:
        return {o.name: o for o in self.ops}

    def consumers(self, name: str) -> list[Op]:
        """Operations reading ``name``."""
        return [o for o in self.ops if name in o.inputs]


def contraction_size(graph: HlsGraph, op: Op) -> int:
    """Number of products summed per output of an einsum (the sizes of its summed indices)."""
    ins, out = op.attrs["equation"].split("->")
    sizes: dict[str, int] = {}
    for sub, name in zip(ins.split(","), op.inputs, strict=True):
        for letter, dim in zip(sub[1:], graph.op(name).shape, strict=True):  # sub[0]: batch
            sizes[letter] = dim
    return math.prod(d for letter, d in sizes.items() if letter not in out) or 1


def run_float(graph: HlsGraph, inputs: dict[str, torch.Tensor],
              quant=None) -> dict[str, torch.Tensor]:
    """Execute the graph in float64 (``quant(op, value)`` may round each result); all values."""
    env: dict[str, torch.Tensor] = {}
    for op in graph.ops:
        xs = [env[i] for i in op.inputs]
        env[op.name] = y = _apply(op, xs, inputs)
        if quant is not None:
            env[op.name] = quant(op, y, xs)
    return env


def _apply(op: Op, xs: list[torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    a = op.attrs
    k = op.kind
    if k == "input":
        return inputs[a.get("key", op.name)].double()
    x = xs[0]
    b = x.shape[0]
    if k == "dense":
        y = x @ a["weight"].double().t()
        return y if a["bias"] is None else y + a["bias"].double()
    if k == "layernorm":
        return torch.nn.functional.layer_norm(x, x.shape[-1:], a["gamma"].double(),
                                              a["beta"].double(), a["eps"])
    if k == "einsum":
        return torch.einsum(a["equation"], x, xs[1])
    if k == "matmul":
        return x @ xs[1]
    if k == "gelu":  # admitted only as its sigmoid form (trace_ops(gelu="sigmoid"))
        return x * torch.sigmoid(GELU_SIGMOID * x)
    if k == "softmax":
        return torch.softmax(x * a["exp_scale"], dim=a["axis"] + 1)
    if k == "relu":
        return torch.relu(x)
    if k == "sigmoid":
        return torch.sigmoid(x)
    if k == "add":
        return x + xs[1]
    if k == "mul":
        return x * xs[1]
    if k == "add_const":
        return x + a["value"].double()
    if k == "scale":
        return x * a["value"]
    if k == "mean":
        return x.mean(1)
    if k == "reshape":
        return x.reshape(b, *op.shape)
    if k == "transpose":
        return x.permute(0, *[p + 1 for p in a["perm"]])
    if k == "cast":
        return x
    raise ValueError(k)


