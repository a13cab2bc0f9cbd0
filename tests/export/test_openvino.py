"""OpenVINO as a runtime and target: IR export, parity of every output through OpenVINO (f32),
predictions agreeing with ONNX Runtime on the same file, latency, bad arguments.

Skipped only where ``openvino`` cannot be imported outside CI (it is in the dev extra)."""

import os

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import ExportError
from slimformer.export.config import OnnxConfig
from slimformer.export.openvino import openvino_available

if not openvino_available() and not os.environ.get("CI"):
    pytest.skip("openvino is not installed (pip install 'slimformer[openvino]')",
                allow_module_level=True)

from slimformer.export.openvino import export_openvino, ov_latency, ov_predict  # noqa: E402
from slimformer.export.ortrun import predict  # noqa: E402
from slimformer.models.generality import GENERALITY  # noqa: E402
from slimformer.models.loading import load_model  # noqa: E402
from slimformer.quantize.api import quantize  # noqa: E402
from slimformer.quantize.config import QuantConfig  # noqa: E402
from slimformer.quantize.inference import to_inference  # noqa: E402


@pytest.fixture(scope="module")
def bert():
    return load_model(GENERALITY["bert"])


def test_float_ir_matches_pytorch_on_every_output(bert, tmp_path):
    import openvino as ov

    x = bert.example_inputs(2)
    (tmp_path / "m.onnx").write_bytes(b"the user's own file")  # e.g. from `export onnx`
    res = export_openvino(bert.module, tmp_path / "m.xml", x)
    assert res.path.is_file() and (tmp_path / "m.bin").is_file() and res.onnx.path is None
    assert (tmp_path / "m.onnx").read_bytes() == b"the user's own file"  # ONNX went to a temp
    assert set(res.parity) == {"traced", "other"}  # a second batch size / sequence length
    for p in res.parity.values():
        assert p["cosine"] >= 0.99999 and set(p["outputs"]) == {"logits"}, p
    m = ov.Core().read_model(str(res.path))
    assert m.get_rt_info(["slimformer", "target"]).astype(str) == "openvino"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []
    lat = ov_latency(res.path, x, repeats=3, warmup=1)
    assert lat["median_ms"] > 0 and lat["precision"] == "f32"


def test_symmetric_qdq_through_openvino_matches_the_simulated_model(bert, tmp_path):
    calib = TensorDictDataset(bert.example_inputs(16, seed=1), torch.zeros(16, dtype=torch.long))
    q = to_inference(quantize(bert.module, QuantConfig(method="repq", calib_samples=16,
                                                       softmax="uniform", symmetric=True),
                              calib).model)
    res = export_openvino(q, tmp_path / "q.xml", bert.example_inputs(2),
                          onnx_path=tmp_path / "q.onnx")  # kept: ORT runs it below
    for label, p in res.parity.items():
        assert p["within_1_step"] >= 0.95 and p["argmax_agreement"] >= 0.99, (label, p)
    assert not any(w.startswith("slow") for w in res.warnings), res.warnings
    data = TensorDictDataset(bert.example_inputs(32, seed=3), torch.zeros(32, dtype=torch.long))
    by_ov = ov_predict(res.path, data, batch_size=16)
    by_ort = predict(res.onnx.path, data, batch_size=16)
    assert (by_ov == by_ort).float().mean() >= 0.95


def test_bad_arguments(bert, tmp_path):
    x = bert.example_inputs(2)
    with pytest.raises(ExportError, match=r"\.xml"):
        export_openvino(bert.module, tmp_path / "m.onnx", x)
    with pytest.raises(ExportError, match="target"):
        export_openvino(bert.module, tmp_path / "m.xml", x, OnnxConfig(target="tensorrt"))
    assert not list(tmp_path.iterdir())
