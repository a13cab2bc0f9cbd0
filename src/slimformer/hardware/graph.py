"""Lower a PyTorch model to a flat graph of the operations hls4ml can build (:class:`HlsGraph`).

The model is traced once with ``torch.fx`` and its shapes propagated with an example input; shape
arithmetic (``x.shape``, ``size()``) becomes constants, and every remaining node must be one of
:data:`SUPPORTED` or the lowering fails with a :class:`~slimformer.errors.HardwareError` that lists
every offending module by path. Shapes in the graph exclude the batch axis.

Rewrites (exact in float): a multiplication of attention scores by a constant before a softmax
becomes the softmax's ``exp_scale``; a constant added to a tensor (a position embedding) becomes
a per-element bias; ``x.mean(dim)`` over the token axis becomes average pooling; ``a @ b`` becomes
an einsum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.errors import HardwareError

SUPPORTED = (
    "nn.Linear (over the last axis)", "nn.LayerNorm (last axis)", "ReLU", "softmax (any axis)",
    "einsum / matmul of two activations", "GELU (only with gelu: sigmoid)", "add (same shape, or a constant)",
    "multiply by a constant", "mean over the token axis", "reshape / view / flatten",
    "permute / transpose", "Dropout / Identity (eval)",
)


@dataclass
class Op:
    """One operation: ``kind`` with named ``inputs``; ``shape`` excludes the batch axis."""

    name: str
    kind: str  # input dense layernorm einsum softmax relu add mul add_const scale mean reshape transpose
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


def _fn_name(node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


_ADD = {"add", "iadd", "__add__", "__iadd__"}
_MUL = {"mul", "imul", "__mul__", "__imul__"}
_RESHAPE = {"reshape", "view", "flatten", "contiguous", "unflatten"}
_ALIAS_MODULES = (nn.Identity, nn.Dropout)


def _module_path(node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else "<top level>"


GELU_SIGMOID = 1.702  # gelu(x) ~ x * sigmoid(1.702 x)


def trace_ops(model: nn.Module, example: dict[str, torch.Tensor],
              gelu: str = "refuse") -> HlsGraph:
    """Trace ``model`` on ``example`` (batch 1) into an :class:`HlsGraph`, before any rewrite.

    :func:`slimformer.hardware.lower.lower` is this plus the rewrite passes.

    ``gelu="sigmoid"`` substitutes ``x * sigmoid(1.702 x)`` for GELU (explicit, approximate).

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
    args = [example[n] for n in names]
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    mods = dict(gm.named_modules())
    consts: dict[str, object] = {}  # python values (shapes, ints) and constant tensors
    ops: list[Op] = []
    alias: dict[str, str] = {}
    bad: list[str] = []

    def shape_of(n) -> tuple[int, ...]:
        return tuple(n.meta["tensor_meta"].shape[1:])

    def src(a) -> str:
        return alias.get(a.name, a.name)

    def val(a):
        if isinstance(a, fx.Node):
            return consts[a.name] if a.name in consts else None
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) if isinstance(x, fx.Node) else x for x in a)
        return a

    def is_tensor(a) -> bool:
        return isinstance(a, fx.Node) and a.name not in consts

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            ops.append(Op(n.name, "input", [], shape_of(n), n.name, {"key": n.target}))
            continue
        if n.op == "output":
            outs = n.args[0]
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            if not all(is_tensor(o) for o in outs):
                bad.append("<output> (non-tensor model output)")
                continue
            graph_outputs = [src(o) for o in outs]
            continue
        if n.op == "get_attr":
            t = gm
            for part in str(n.target).split("."):
                t = getattr(t, part)
            consts[n.name] = t.detach()
            continue
        where = _module_path(n)
        name = _fn_name(n)
        tensors = [a for a in n.args if is_tensor(a)]
        if n.op == "call_module":
            mod = mods[str(n.target)]
            x = n.args[0]
            if isinstance(mod, _ALIAS_MODULES):
                alias[n.name] = src(x)
            elif isinstance(mod, nn.Linear):
                ops.append(Op(n.name, "dense", [src(x)], shape_of(n), where, {
                    "weight": mod.weight.detach(), "weight_name": f"{n.target}.weight",
                    "bias": None if mod.bias is None else mod.bias.detach()}))
            elif isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1 \
                    and mod.elementwise_affine and mod.bias is not None:
                ops.append(Op(n.name, "layernorm", [src(x)], shape_of(n), where, {
                    "gamma": mod.weight.detach(), "beta": mod.bias.detach(), "eps": mod.eps}))
            elif isinstance(mod, nn.ReLU):
                ops.append(Op(n.name, "relu", [src(x)], shape_of(n), where))
            elif isinstance(mod, nn.GELU) and gelu == "sigmoid":
                ops.extend(_gelu_ops(n.name, src(x), shape_of(n), where))
            elif isinstance(mod, nn.Softmax):
                ops.append(_softmax(n.name, src(x), shape_of(n), where, mod.dim))
            else:
                bad.append(f"{where} ({type(mod).__name__})")
            continue
        # call_function / call_method
        if name == "getattr" and n.args[1] == "shape" or name == "size":
            s = tuple(n.args[0].meta["tensor_meta"].shape)
            dim = n.args[1] if name == "size" and len(n.args) > 1 else None
            consts[n.name] = s if dim is None else s[dim]
        elif name == "getitem" and not is_tensor(n.args[0]):
            consts[n.name] = val(n.args[0])[n.args[1]]
        elif name in ("dim",):
            consts[n.name] = len(n.args[0].meta["tensor_meta"].shape)
        elif name in ("contiguous",) or name == "dropout":
            alias[n.name] = src(n.args[0])
        elif name in _RESHAPE and tensors:
            ops.append(Op(n.name, "reshape", [src(tensors[0])], shape_of(n), where))
        elif name in ("permute", "transpose") and tensors:
            rank = len(n.args[0].meta["tensor_meta"].shape)
            if name == "transpose":
                d0, d1 = (int(d) % rank for d in n.args[1:3])
                perm = list(range(rank))
                perm[d0], perm[d1] = perm[d1], perm[d0]
            else:
                perm = [int(d) % rank for d in (val(n.args[1:]) if not isinstance(
                    n.args[1], (list, tuple)) else val(n.args[1]))]
            if perm[0] != 0:
                bad.append(f"{where} ({name} moves the batch axis)")
                continue
            ops.append(Op(n.name, "transpose", [src(tensors[0])], shape_of(n), where,
                          {"perm": [p - 1 for p in perm[1:]]}))
        elif name in ("relu", "relu_"):
            ops.append(Op(n.name, "relu", [src(tensors[0])], shape_of(n), where))
        elif name == "gelu" and gelu == "sigmoid" and tensors:
            ops.extend(_gelu_ops(n.name, src(tensors[0]), shape_of(n), where))
        elif name == "softmax":
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            ops.append(_softmax(n.name, src(tensors[0]), shape_of(n), where, dim))
        elif name == "einsum" and len(tensors) == 2 and isinstance(n.args[0], str):
            ops.append(Op(n.name, "einsum", [src(t) for t in tensors], shape_of(n), where,
                          {"equation": n.args[0].replace(" ", "")}))
        elif name in ("matmul", "__matmul__") and len(tensors) == 2:
            ra, rb = (len(t.meta["tensor_meta"].shape) for t in tensors)
            if ra != rb or ra < 3:
                bad.append(f"{where} (matmul of ranks {ra} and {rb})")
                continue
            lead = "abcdefgh"[:ra - 2]
            eq = f"{lead}ij,{lead}jk->{lead}ik"
            ops.append(Op(n.name, "einsum", [src(t) for t in tensors], shape_of(n), where,
                          {"equation": eq}))
        elif name in _ADD | _MUL | {"truediv", "div", "sub"}:
            a, b = n.args[0], n.args[1]
            if is_tensor(a) and is_tensor(b) and name in _ADD | _MUL and \
                    shape_of(a) == shape_of(b) == shape_of(n):
                kind = "add" if name in _ADD else "mul"
                ops.append(Op(n.name, kind, [src(a), src(b)], shape_of(n), where))
                continue
            t, c = (a, val(b)) if is_tensor(a) else (b, val(a))
            if not is_tensor(t) or c is None or (isinstance(c, torch.Tensor) and c.numel() > 1
                                                   and name not in _ADD):
                bad.append(f"{where} ({name} of two tensors of different shapes)")
                continue
            if name in _ADD:
                full = torch.as_tensor(c, dtype=torch.float64).expand(
                    (1, *shape_of(n))).reshape(shape_of(n)).clone()
                ops.append(Op(n.name, "add_const", [src(t)], shape_of(n), where, {"value": full}))
            elif name == "sub" and is_tensor(a):
                ops.append(Op(n.name, "add_const", [src(t)], shape_of(n), where, {
                    "value": -torch.as_tensor(c, dtype=torch.float64).expand(shape_of(n)).clone()}))
            elif name in _MUL or (name in ("truediv", "div") and is_tensor(a)):
                s = float(c)
                ops.append(Op(n.name, "scale", [src(t)], shape_of(n), where,
                              {"value": s if name in _MUL else 1.0 / s}))
            else:
                bad.append(f"{where} ({name} with a tensor divisor)")
        elif name == "mean" and tensors:
            dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            rank = len(n.args[0].meta["tensor_meta"].shape)
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if rank == 3 and [d % rank for d in dims] == [1] and not n.kwargs.get("keepdim"):
                ops.append(Op(n.name, "mean", [src(tensors[0])], shape_of(n), where))
            else:
                bad.append(f"{where} (mean over dims {dims} of a rank-{rank} tensor; only the "
                           "token axis of (B, T, C))")
        else:
            bad.append(f"{where} ({name})")
    if bad:
        bad = list(dict.fromkeys(bad))
        raise HardwareError(
            f"{len(bad)} operation(s) cannot be built by hls4ml:\n"
            + "\n".join(f"  - {b}" for b in bad)
            + "\nsupported: " + "; ".join(SUPPORTED)
            + "\n(nn.MultiheadAttention: write it as Linear q/k/v + einsum + softmax + Linear; "
            "GELU: set gelu: sigmoid for x * sigmoid(1.702 x), or use ReLU; no substitution "
            "is made silently)")
    return HlsGraph(ops, [o.name for o in ops if o.kind == "input"], graph_outputs)


def contraction_size(graph: HlsGraph, op: Op) -> int:
    """Number of products summed per output of an einsum (the sizes of its summed indices)."""
    ins, out = op.attrs["equation"].split("->")
    sizes: dict[str, int] = {}
    for sub, name in zip(ins.split(","), op.inputs, strict=True):
        for letter, dim in zip(sub[1:], graph.op(name).shape, strict=True):  # sub[0]: batch
            sizes[letter] = dim
    return math.prod(d for letter, d in sizes.items() if letter not in out) or 1


def _gelu_ops(name: str, x: str, shape: tuple[int, ...], where: str) -> list[Op]:
    """``x * sigmoid(1.702 x)`` for GELU: scale, sigmoid lookup table, multiply."""
    return [Op(f"{name}_scale", "scale", [x], shape, where, {"value": GELU_SIGMOID}),
            Op(f"{name}_sigmoid", "sigmoid", [f"{name}_scale"], shape, where),
            Op(name, "mul", [x, f"{name}_sigmoid"], shape, where, {"gelu": True})]


def _softmax(name: str, x: str, shape: tuple[int, ...], where: str, dim) -> Op:
    rank = len(shape) + 1
    axis = (rank - 1 if dim is None else int(dim) % rank) - 1  # without the batch axis
    return Op(name, "softmax", [x], shape, where, {
        "axis": axis, "n_outer": math.prod(shape[:axis]), "n_inner": math.prod(shape[axis + 1:]),
        "exp_scale": 1.0})


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


