"""TensorRT: the engine build needs `import tensorrt` (skipped without it); profile shapes and the
trtexec command are checked everywhere."""

import os

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from slimformer.errors import ExportError
from slimformer.export.config import TensorRTConfig
from slimformer.export.tensorrt import build_engine, profile_shapes, tensorrt_available, trtexec_command


@pytest.fixture
def text_onnx(tmp_path):
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    img = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    g = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [ids, img],
                          [out])
    p = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), p)
    return p


def test_profile_and_trtexec_command(text_onnx, tmp_path):
    cfg = TensorRTConfig(batch=(1, 4, 16), sequence=(8, 32, 128), timing_cache="t.cache")
    prof = profile_shapes(text_onnx, cfg)
    assert prof["input_ids"] == ([1, 8], [4, 32], [16, 128])
    assert prof["pixels"] == ([1, 3, 8, 8], [4, 3, 8, 8], [16, 3, 8, 8])
    cmd = trtexec_command(text_onnx, tmp_path / "m.plan", cfg, prof)
    for part in ("trtexec", "--fp16", "--int8", "--minShapes=input_ids:1x8,pixels:1x3x8x8",
                 "--maxShapes=input_ids:16x128", "--timingCacheFile=t.cache",
                 "--memPoolSize=workspace:2048M"):
        assert part in cmd
    strongly = trtexec_command(text_onnx, "m.plan", TensorRTConfig(strongly_typed=True), prof)
    assert "--stronglyTyped" in strongly and "--int8" not in strongly


@pytest.mark.skipif(tensorrt_available() is not None, reason="TensorRT is installed here")
def test_without_tensorrt_the_error_gives_the_command(text_onnx, tmp_path):
    with pytest.raises(ExportError, match="TensorRT is not installed.*trtexec --onnx="):
        build_engine(text_onnx, tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()


def test_bad_paths(text_onnx, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "m.plan")
    with pytest.raises(ExportError, match="does not exist"):
        build_engine(text_onnx, tmp_path / "missing" / "m.plan")


@pytest.mark.skipif(tensorrt_available() is None,
                    reason="TensorRT cannot be installed on this machine (import tensorrt failed)")
def test_engine_from_qdq_export(tmp_path):  # pragma: no cover - needs TensorRT and a GPU
    from slimformer.export.onnx import export_onnx

    lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    export_onnx(lin, tmp_path / "m.onnx", {"input": torch.randn(2, 8)})
    res = build_engine(tmp_path / "m.onnx", tmp_path / "m.plan",
                       TensorRTConfig(timing_cache=str(tmp_path / "t.cache")))
    assert res.size_bytes > 0 and os.path.exists(tmp_path / "t.cache")
    assert (tmp_path / "m.plan.trtexec.sh").read_text().count("trtexec") == 1
