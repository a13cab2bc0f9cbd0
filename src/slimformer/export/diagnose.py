"""Find which operators of a model ONNX cannot express, and in which module they are called.

Uses the same steps as ``torch.onnx.export(dynamo=True)``: ``torch.export`` the model, decompose
with the ONNX-friendly table, then look every remaining operator up in the ONNX registry. Private
``torch.onnx`` helpers are used here, and only here, for the diagnosis of a failed export.
"""

from __future__ import annotations

import operator

import torch


def unsupported_ops(module: torch.nn.Module, args: tuple) -> list[tuple[str, str]]:
    """``[(operator, module path)]`` of ops without an ONNX translation (empty if none found).

    If ``torch.export`` itself fails, its message is returned as the operator and the module of
    the failing frame is unknown.
    """
    from torch.onnx._internal.exporter import _fx_passes, _registration

    try:
        ep = torch.export.export(module, args, strict=False)
        registry = _registration.ONNXRegistry.from_torchlib()
        ep = _fx_passes.decompose_with_registry(ep, registry)
    except Exception as exc:  # noqa: BLE001 - report what torch.export said
        return [(f"torch.export: {str(exc).strip().splitlines()[0][:200]}", "")]
    found: dict[str, str] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target in (operator.getitem,) or \
                "assert" in str(node.target):  # the exporter drops assertion nodes
            continue
        if registry.is_registered(node.target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else ""
        found.setdefault(str(node.target), _clean(path))
    return sorted(found.items())


def _clean(path: str) -> str:
    """``L['self'].model.blocks[0].attn`` -> ``model.blocks.0.attn`` (as named_modules() says)."""
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path.removeprefix("model.") if path.startswith("model.") else path
