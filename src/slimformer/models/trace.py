"""Record the data flow of one forward pass as a graph of torch-function calls.

A :class:`torch.overrides.TorchFunctionMode` sees every torch function and tensor method the
model calls (``F.linear``, ``softmax``, ``@``, ``view`` ...); module hooks tell which module was
running. Each call becomes an :class:`OpNode` whose inputs point at the nodes that produced them,
so later passes can follow values forwards and backwards without knowing any module name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

INPUT = -1  # producer index of a tensor the model received from outside
CONST = -2  # producer index of a buffer or constant created outside any recorded op

# Functions whose internals are hidden from the mode but whose arguments say everything we need.
_OPAQUE_ATTENTION = {"multi_head_attention_forward"}
_PRODUCTS = {"linear", "matmul", "mm", "bmm", "addmm", "einsum", "baddbmm"}  # canonical names
# Tensor queries that produce no tensors worth recording.
_SKIP = {"size", "dim", "numel", "shape", "dtype", "device", "is_floating_point", "__len__",
         "stride", "data_ptr", "element_size", "is_contiguous", "requires_grad", "ndim",
         "__get__", "__set__", "is_complex", "get_device", "__bool__", "item", "tolist",
         "__index__", "__format__", "__repr__", "grad_fn", "storage_offset", "__hash__"}


def canonical(name: str) -> str:
    """Canonical op name: ``__matmul__`` -> ``matmul``, ``add_`` -> ``add``, ``__radd__`` -> ``add``."""
    n = name.strip("_")
    if name.startswith("__r") and name.endswith("__") and n[1:] in {
        "add", "sub", "mul", "truediv", "matmul", "div", "pow"}:
        n = n[1:]
    if n.endswith("_") and not n.startswith("_"):
        n = n[:-1]
    return {"truediv": "div", "iadd": "add", "imul": "mul", "isub": "sub", "itruediv": "div",
            "scaled_dot_product_attention": "sdpa"}.get(n, n)


@dataclass
class OpNode:
    """One recorded call.

    Attributes:
        idx: Position in the graph.
        op: Canonical op name (``linear``, ``softmax``, ``matmul``, ``view`` ...).
        module: Path of the innermost module running when the op was called ('' = root).
        inputs: Producer index of each tensor argument, in argument order (INPUT / CONST too).
        params: Parameter name of each tensor argument that is (a view of) a parameter, else None.
        in_shapes: Shapes of the tensor arguments.
        out_shapes: Shapes of the tensor outputs.
        meta: Scalar arguments worth keeping (``dim`` of softmax, ``num_heads`` of MHA ...).
    """

    idx: int
    op: str
    module: str
    inputs: list[int] = field(default_factory=list)
    params: list[str | None] = field(default_factory=list)
    in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    param_only: bool = False  # all tensor inputs are parameters: a weight view, not activation


@dataclass
class ModuleCall:
    """One module forward: its path, class, the producer of its first input and of its output."""

    path: str
    module: torch.nn.Module
    input_node: int | None
    output_node: int | None
    input: torch.Tensor | None
    output: torch.Tensor | None


@dataclass
class Graph:
    """The recorded forward pass."""

    nodes: list[OpNode]
    calls: list[ModuleCall]
    param_names: dict[int, str]
    outputs: set[int] = field(default_factory=set)  # nodes whose tensors the model returned

    def consumers(self) -> dict[int, list[int]]:
        """Map producer index -> indices of the nodes that read its output."""
        out: dict[int, list[int]] = {}
        for n in self.nodes:
            for p in n.inputs:
                if p >= 0:
                    out.setdefault(p, []).append(n.idx)
        return out


class _Recorder(TorchFunctionMode):
    def __init__(self, param_names: dict[int, str]):
        super().__init__()
        self.param_names = param_names
        self.nodes: list[OpNode] = []
        self.producer: dict[int, int] = {}
        self.param_view: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique while recording
        self.stack: list[str] = [""]

    def source(self, t: torch.Tensor) -> tuple[int, str | None]:
        tid = id(t)
        if tid in self.param_names:
            return CONST, self.param_names[tid]
        if tid in self.param_view:
            return self.producer.get(tid, CONST), self.param_view[tid]
        return self.producer.get(tid, CONST), None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        out = func(*args, **kwargs)
        if name in _SKIP:
            return out
        flat_in, _ = tree_flatten((args, kwargs))
        tin = [a for a in flat_in if isinstance(a, torch.Tensor)]
        flat_out, _ = tree_flatten(out)
        tout = [o for o in flat_out if isinstance(o, torch.Tensor)]
        in_ids = {id(t) for t in tin}
        tout = [o for o in tout if id(o) not in in_ids]  # identity ops (eval dropout) add nothing
        if not tout:
            return out
        node = OpNode(len(self.nodes), canonical(name), self.stack[-1])
        for t in tin:
            prod, pname = self.source(t)
            node.inputs.append(prod)
            node.params.append(pname)
            node.in_shapes.append(tuple(t.shape))
        node.out_shapes = [tuple(o.shape) for o in tout]
        node.param_only = bool(tin) and all(p is not None for p in node.params) and not (
            node.op in _PRODUCTS and len(node.in_shapes[0]) > 2)  # a learned query times a
        # weight (an attention-pooling probe) is an activation: weights and their views are 2-D
        for k in ("dim", "num_heads", "embed_dim_to_check", "scale", "is_causal"):
            if k in kwargs and isinstance(kwargs[k], (int, float, bool)):
                node.meta[k] = kwargs[k]
        if node.op == "softmax" and "dim" not in node.meta:
            ints = [a for a in args[1:] if isinstance(a, int)]
            if ints:
                node.meta["dim"] = ints[0]
        if node.op == "einsum" and args and isinstance(args[0], str):
            node.meta["equation"] = args[0]  # which axes a weight operand contracts
        if name in _OPAQUE_ATTENTION:
            node.op = "mha"
            node.meta["num_heads"] = args[4] if len(args) > 4 else kwargs.get("num_heads")
        self.nodes.append(node)
        for o in tout:
            self.producer[id(o)] = node.idx
            if node.param_only:
                self.param_view[id(o)] = next(p for p in node.params if p)
            self.keep.append(o)
        return out


def record(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[Graph, object]:
    """Run ``model(**inputs)`` once and return its op graph and the model output.

    Runs with autograd enabled (but no backward), so fused inference fast paths such as
    ``torch._transformer_encoder_layer_fwd`` are not taken and attention stays visible.
    """
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)  # a shared parameter keeps its first name, as named_parameters()
    rec = _Recorder(names)
    calls: list[ModuleCall] = []
    handles = []
    paths: dict[torch.nn.Module, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(m, n)  # a module registered twice keeps its first path

    def pre(mod, args, kwargs):
        rec.stack.append(paths.get(mod, "?"))

    def post(mod, args, kwargs, output):
        rec.stack.pop()
        tin = next((a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)),
                   None)
        tout = output if isinstance(output, torch.Tensor) else None
        calls.append(ModuleCall(
            paths.get(mod, "?"), mod,
            rec.source(tin)[0] if tin is not None else None,
            rec.producer.get(id(tout)) if tout is not None else None,
            tin, tout,
        ))

    for m in paths:  # each module object once: a shared module is hooked once, recorded per call
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            rec.producer[id(t)] = INPUT
    try:
        was_training = model.training
        model.eval()
        with torch.enable_grad(), rec:
            out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        detach_caches(model)
    from slimformer.models.outputs import leaves

    outputs = {rec.producer[id(t)] for t in leaves(out).values() if id(t) in rec.producer}
    return Graph(rec.nodes, calls, names, outputs), out


def detach_caches(model: torch.nn.Module) -> None:
    """Detach tensors a forward in grad mode left on modules (caches such as attention biases).

    Recording runs with autograd on; a module that caches a computed tensor in eval mode would
    keep it with its autograd graph, and ``copy.deepcopy`` of the model then fails. Parameters,
    buffers and submodules are not touched; plain tensor attributes and tensors in dict, list or
    tuple attributes are.
    """
    def fix(v):
        if isinstance(v, torch.Tensor) and v.grad_fn is not None:
            return v.detach()
        if isinstance(v, dict):
            return type(v)((k, fix(x)) for k, x in v.items()) if any(
                isinstance(x, torch.Tensor) and x.grad_fn is not None for x in v.values()) else v
        if isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) and
                                                x.grad_fn is not None for x in v):
            return type(v)(fix(x) for x in v)
        return v

    for m in model.modules():
        for k, v in list(vars(m).items()):
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            new = fix(v)
            if new is v:
                continue
            if isinstance(v, dict):  # in place: the module may hold other references to it
                v.clear()
                v.update(new)
            else:
                setattr(m, k, new)
