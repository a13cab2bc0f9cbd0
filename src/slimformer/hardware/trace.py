"""Trace a PyTorch model into an :class:`~slimformer.hardware.graph.HlsGraph`, before any rewrite.

The model is traced once with ``torch.fx`` and its shapes propagated with an example input (batch
1). Each node is converted by one small handler, as hls4ml's converter handlers do: a module by
:data:`MODULE_HANDLERS` (the first entry its type is an instance of, in table order), a function or
method by :data:`FUNCTION_HANDLERS` (by name). Handlers write the operation in torch's terms (a
``gelu`` or ``matmul`` op); the rewrite passes of :mod:`slimformer.hardware.rewrite` turn them into
what hls4ml builds. Shape arithmetic (``x.shape``, ``size()``, ``dim()``) becomes constants;
Identity, Dropout and ``contiguous`` become aliases of their input. A handler returns ``None`` or
why its node cannot be built; every such node is listed by module path in one
:class:`~slimformer.errors.HardwareError`. Shapes exclude the batch axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.errors import HardwareError
from slimformer.hardware.graph import HlsGraph, Op

SUPPORTED = (
    "nn.Linear (over the last axis)", "nn.LayerNorm (last axis)", "ReLU", "softmax (any axis)",
    "einsum / matmul of two activations", "GELU (only with gelu: sigmoid)", "add (same shape, or a constant)",
    "multiply by a constant", "mean over the token axis", "reshape / view / flatten",
    "permute / transpose", "Dropout / Identity (eval)",
)


@dataclass
class _Trace:
    """What the handlers read and write while walking the fx graph."""

    gelu: str
    ops: list[Op] = field(default_factory=list)
    consts: dict[str, object] = field(default_factory=dict)  # python values and constant tensors
    alias: dict[str, str] = field(default_factory=dict)  # node -> the node it passes through

    def shape(self, n) -> tuple[int, ...]:
        """The node's tensor shape without the batch axis."""
        return tuple(n.meta["tensor_meta"].shape[1:])

    def src(self, a) -> str:
        """The op that computes node ``a`` (through aliases)."""
        return self.alias.get(a.name, a.name)

    def val(self, a):
        """The constant value of ``a`` (a node, a list of nodes or a python value); None if not one."""
        import torch.fx as fx

        if isinstance(a, fx.Node):
            return self.consts[a.name] if a.name in self.consts else None
        if isinstance(a, (list, tuple)):
            return type(a)(self.val(x) if isinstance(x, fx.Node) else x for x in a)
        return a

    def is_tensor(self, a) -> bool:
        """Whether ``a`` is a node computing an activation (not a constant)."""
        import torch.fx as fx

        return isinstance(a, fx.Node) and a.name not in self.consts

    def tensors(self, n) -> list:
        """The activation arguments of ``n``, in order."""
        return [a for a in n.args if self.is_tensor(a)]

    def emit(self, n, kind: str, inputs: list, where: str, attrs: dict | None = None) -> None:
        """Append the op computing node ``n`` from the nodes ``inputs``."""
        self.ops.append(Op(n.name, kind, [self.src(a) for a in inputs], self.shape(n), where,
                           attrs or {}))


Handler = Callable[..., "str | None"]  # (trace, node, where[, module]) -> None or why not


# ---- modules ----------------------------------------------------------------------------------

def _alias_module(t: _Trace, n, mod: nn.Module, where: str) -> str | None:
    t.alias[n.name] = t.src(n.args[0])
    return None


def _linear(t: _Trace, n, mod: nn.Linear, where: str) -> str | None:
    t.emit(n, "dense", [n.args[0]], where, {
        "weight": mod.weight.detach(), "weight_name": f"{n.target}.weight",
        "bias": None if mod.bias is None else mod.bias.detach()})
    return None


def _layernorm(t: _Trace, n, mod: nn.LayerNorm, where: str) -> str | None:
    if len(mod.normalized_shape) != 1 or not mod.elementwise_affine or mod.bias is None:
        return type(mod).__name__
    t.emit(n, "layernorm", [n.args[0]], where,
           {"gamma": mod.weight.detach(), "beta": mod.bias.detach(), "eps": mod.eps})
    return None


def _relu_module(t: _Trace, n, mod: nn.Module, where: str) -> str | None:
    t.emit(n, "relu", [n.args[0]], where)
    return None


def _gelu_module(t: _Trace, n, mod: nn.Module, where: str) -> str | None:
    if t.gelu != "sigmoid":
        return type(mod).__name__
    t.emit(n, "gelu", [n.args[0]], where)
    return None


def _softmax_module(t: _Trace, n, mod: nn.Softmax, where: str) -> str | None:
    t.ops.append(_softmax(n.name, t.src(n.args[0]), t.shape(n), where, mod.dim))
    return None


MODULE_HANDLERS: dict[type, Handler] = {
    nn.Identity: _alias_module, nn.Dropout: _alias_module, nn.Linear: _linear,
    nn.LayerNorm: _layernorm, nn.ReLU: _relu_module, nn.GELU: _gelu_module,
    nn.Softmax: _softmax_module,
}


# ---- functions and methods --------------------------------------------------------------------

def _shape_const(t: _Trace, n, where: str) -> str | None:
    name = _fn_name(n)
    if name == "getattr" and n.args[1] != "shape":
        return name
    s = tuple(n.args[0].meta["tensor_meta"].shape)
    dim = n.args[1] if name == "size" and len(n.args) > 1 else None
    t.consts[n.name] = s if dim is None else s[dim]
    return None


def _getitem(t: _Trace, n, where: str) -> str | None:
    if t.is_tensor(n.args[0]):
        return "getitem"
    t.consts[n.name] = t.val(n.args[0])[n.args[1]]
    return None


def _dim(t: _Trace, n, where: str) -> str | None:
    t.consts[n.name] = len(n.args[0].meta["tensor_meta"].shape)
    return None


def _alias(t: _Trace, n, where: str) -> str | None:
    t.alias[n.name] = t.src(n.args[0])
    return None


def _reshape(t: _Trace, n, where: str) -> str | None:
    if not t.tensors(n):
        return _fn_name(n)
    t.emit(n, "reshape", t.tensors(n)[:1], where)
    return None


def _permute(t: _Trace, n, where: str) -> str | None:
    name = _fn_name(n)
    if not t.tensors(n):
        return name
    rank = len(n.args[0].meta["tensor_meta"].shape)
    if name == "transpose":
        d0, d1 = (int(d) % rank for d in n.args[1:3])
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        dims = t.val(n.args[1]) if isinstance(n.args[1], (list, tuple)) else t.val(n.args[1:])
        perm = [int(d) % rank for d in dims]
    if perm[0] != 0:
        return f"{name} moves the batch axis"
    t.emit(n, "transpose", t.tensors(n)[:1], where, {"perm": [p - 1 for p in perm[1:]]})
    return None


def _relu(t: _Trace, n, where: str) -> str | None:
    t.emit(n, "relu", [t.tensors(n)[0]], where)
    return None


def _gelu(t: _Trace, n, where: str) -> str | None:
    if t.gelu != "sigmoid" or not t.tensors(n):
        return "gelu"
    t.emit(n, "gelu", t.tensors(n)[:1], where)
    return None


def _softmax_fn(t: _Trace, n, where: str) -> str | None:
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    t.ops.append(_softmax(n.name, t.src(t.tensors(n)[0]), t.shape(n), where, dim))
    return None


def _einsum(t: _Trace, n, where: str) -> str | None:
    tensors = t.tensors(n)
    if len(tensors) != 2 or not isinstance(n.args[0], str):
        return "einsum"
    t.emit(n, "einsum", tensors, where, {"equation": n.args[0].replace(" ", "")})
    return None


def _matmul(t: _Trace, n, where: str) -> str | None:
    tensors = t.tensors(n)
    if len(tensors) != 2:
        return _fn_name(n)
    ra, rb = (len(a.meta["tensor_meta"].shape) for a in tensors)
    if ra != rb or ra < 3:
        return f"matmul of ranks {ra} and {rb}"
    t.emit(n, "matmul", tensors, where)
    return None


_ADD = {"add", "iadd", "__add__", "__iadd__"}
_MUL = {"mul", "imul", "__mul__", "__imul__"}


def _arith(t: _Trace, n, where: str) -> str | None:
    """``a + b`` / ``a * b`` of same-shape tensors, or a tensor and a constant (``-`` and ``/`` too)."""
    name = _fn_name(n)
    a, b = n.args[0], n.args[1]
    if t.is_tensor(a) and t.is_tensor(b) and name in _ADD | _MUL \
            and t.shape(a) == t.shape(b) == t.shape(n):
        t.emit(n, "add" if name in _ADD else "mul", [a, b], where)
        return None
    x, c = (a, t.val(b)) if t.is_tensor(a) else (b, t.val(a))
    if not t.is_tensor(x) or c is None or (isinstance(c, torch.Tensor) and c.numel() > 1
                                           and name not in _ADD):
        return f"{name} of two tensors of different shapes"
    shape = t.shape(n)
    if name in _ADD:  # a constant (a position embedding) becomes a per-element bias
        full = torch.as_tensor(c, dtype=torch.float64).expand((1, *shape)).reshape(shape).clone()
        t.emit(n, "add_const", [x], where, {"value": full})
    elif name == "sub" and t.is_tensor(a):
        t.emit(n, "add_const", [x], where,
               {"value": -torch.as_tensor(c, dtype=torch.float64).expand(shape).clone()})
    elif name in _MUL or (name in ("truediv", "div") and t.is_tensor(a)):
        s = float(c)
        t.emit(n, "scale", [x], where, {"value": s if name in _MUL else 1.0 / s})
    else:
        return f"{name} with a tensor divisor"
    return None


def _mean(t: _Trace, n, where: str) -> str | None:
    if not t.tensors(n):
        return "mean"
    dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    rank = len(n.args[0].meta["tensor_meta"].shape)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if rank != 3 or [d % rank for d in dims] != [1] or n.kwargs.get("keepdim"):
        return f"mean over dims {dims} of a rank-{rank} tensor; only the token axis of (B, T, C)"
    t.emit(n, "mean", t.tensors(n)[:1], where)
    return None


FUNCTION_HANDLERS: dict[str, Handler] = {
    "getattr": _shape_const, "size": _shape_const, "getitem": _getitem, "dim": _dim,
    "contiguous": _alias, "dropout": _alias,
    **dict.fromkeys(("reshape", "view", "flatten", "unflatten"), _reshape),
    "permute": _permute, "transpose": _permute, "relu": _relu, "relu_": _relu, "gelu": _gelu,
    "softmax": _softmax_fn, "einsum": _einsum, "matmul": _matmul, "__matmul__": _matmul,
    **dict.fromkeys((*_ADD, *_MUL, "truediv", "div", "sub"), _arith),
    "mean": _mean,
}


def trace_ops(model: nn.Module, example: dict[str, torch.Tensor],
              gelu: str = "refuse") -> HlsGraph:
    """Trace ``model`` on ``example`` (batch 1) into an :class:`HlsGraph`, before any rewrite.

    :func:`slimformer.hardware.lowering.lower` is this plus the rewrite passes.
    ``gelu="sigmoid"`` admits GELU (lowered to ``x * sigmoid(1.702 x)``, explicit, approximate).

    Raises:
        HardwareError: Listing every unsupported operation by module path, and the supported set.
    """
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises plain errors on data-dependent control flow
        raise HardwareError(f"the model cannot be traced with torch.fx ({e}); hls4ml needs a "
                            "static graph built from: " + "; ".join(SUPPORTED)) from e
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if set(names) - set(example):
        from slimformer.errors import DataError

        raise DataError(f"the model's inputs are {names}; the data has {sorted(example)}")
    with torch.no_grad():
        ShapeProp(gm).propagate(*[example[n] for n in names])
    mods = dict(gm.named_modules())
    t = _Trace(gelu)
    bad: list[str] = []
    outputs: list[str] = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            t.ops.append(Op(n.name, "input", [], t.shape(n), n.name, {"key": n.target}))
        elif n.op == "output":
            outs = n.args[0]
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            if all(t.is_tensor(o) for o in outs):
                outputs = [t.src(o) for o in outs]
            else:
                bad.append("<output> (non-tensor model output)")
        elif n.op == "get_attr":
            value = gm
            for part in str(n.target).split("."):
                value = getattr(value, part)
            t.consts[n.name] = value.detach()
        elif n.op == "call_module":
            mod = mods[str(n.target)]
            handler = next((h for cls, h in MODULE_HANDLERS.items() if isinstance(mod, cls)), None)
            why = type(mod).__name__ if handler is None else handler(t, n, mod, str(n.target))
            if why is not None:
                bad.append(f"{n.target} ({why})")
        else:  # call_function / call_method
            where, name = _module_path(n), _fn_name(n)
            handler = FUNCTION_HANDLERS.get(name)
            why = name if handler is None else handler(t, n, where)
            if why is not None:
                bad.append(f"{where} ({why})")
    if bad:
        bad = list(dict.fromkeys(bad))
        raise HardwareError(
            f"{len(bad)} operation(s) cannot be built by hls4ml:\n"
            + "\n".join(f"  - {b}" for b in bad)
            + "\nsupported: " + "; ".join(SUPPORTED)
            + "\n(nn.MultiheadAttention: write it as Linear q/k/v + einsum + softmax + Linear; "
            "GELU: set gelu: sigmoid for x * sigmoid(1.702 x), or use ReLU; no substitution "
            "is made silently)")
    return HlsGraph(t.ops, [o.name for o in t.ops if o.kind == "input"], outputs)


def _fn_name(node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else "<top level>"


def _softmax(name: str, x: str, shape: tuple[int, ...], where: str, dim) -> Op:
    rank = len(shape) + 1
    axis = (rank - 1 if dim is None else int(dim) % rank) - 1  # without the batch axis
    return Op(name, "softmax", [x], shape, where, {
        "axis": axis, "n_outer": math.prod(shape[:axis]), "n_inner": math.prod(shape[axis + 1:]),
        "exp_scale": 1.0})
