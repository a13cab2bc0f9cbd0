"""A smoothed model's QDQ ONNX file computes what the quantized PyTorch model computes.

Parity is measured quantizer by quantizer with the same quantized inputs on both sides: PyTorch
runs the QDQ model with every activation quantizer's output replaced by the codes ONNX Runtime
produced there, so each site compares the two runtimes' quantizer inputs from identical upstream
values. End-to-end parity on a few rows cannot show this: ONNX Runtime's LayerNormalization differs
from PyTorch's by a few float32 ulps, and an input within 1e-5 of a rounding boundary (measured:
26.499994 steps) then takes the other code; on this random-weight 2-block ViT one such code
moves the output to 35-39 dB, on 9-14 of 40 random 2-row batches with smoothing off or auto
alike (2026-12-06). A wrong fold (gain, shift or columns not what the file holds) or a scale
computed before the fold moves most codes of a site instead.
"""

import numpy as np
import onnx
import onnxruntime as ort
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.export.config import OnnxConfig
from slimformer.export.onnx import export_onnx
from slimformer.export.qdq import QdqModel
from slimformer.export.targets import resolve_form
from slimformer.models.generality import GENERALITY, fan_in_init
from slimformer.models.loading import load_model
from slimformer.models.outputs import metrics
from slimformer.quantize.act import ActQuantizer
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference


def _ort_sites(path, x: dict) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, float, int]]]:
    """ONNX Runtime's output and, per QuantizeLinear in graph order, (input, codes, scale, zero)."""
    m = onnx.load(str(path))
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    for n in qs:
        m.graph.output.extend([onnx.ValueInfoProto(name=n.input[0]),
                               onnx.ValueInfoProto(name=n.output[0])])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {k: v.numpy() for k, v in x.items()})
    sites = [(out[1 + 2 * i], out[2 + 2 * i], float(consts[n.input[1]]),
              int(consts[n.input[2]])) for i, n in enumerate(qs)]
    return out[0], sites


def test_smoothed_vit_qdq_parity_site_by_site(tmp_path):
    # smooth: on (unjudged; auto undoes it on this model: see test_smooth's judge test)
    lm = load_model(GENERALITY["timm-vit"])
    x = lm.example_inputs(2)
    fan_in_init(lm.module, x)
    calib = TensorDictDataset(lm.example_inputs(32, seed=1), torch.zeros(32, dtype=torch.long))
    res = quantize(lm.module, QuantConfig(method="minmax", calib_samples=32, smooth="on"),
                   calib)
    assert "5 of 5 sites migrated (norm 5/5)" in res.notes[0], res.notes
    inf = to_inference(res.model)
    export_onnx(inf, tmp_path / "q.onnx", x)
    y_ort, sites = _ort_sites(tmp_path / "q.onnx", x)

    ref = QdqModel(inf, resolve_form(OnnxConfig(), True))
    seen: list[torch.Tensor] = []
    for act in ref.qmodel.quant.modules():
        if isinstance(act, ActQuantizer) and "forward" in act.__dict__:

            def forced(t, act=act):  # ONNX Runtime's codes at this site, as values
                seen.append(act.transform(t).detach())
                _, codes, scale, zero = sites[len(seen) - 1]
                return torch.from_numpy((codes.astype(np.float32) - zero) * scale).reshape(t.shape)

            act.forward = forced
    with torch.no_grad():
        y = ref(**x)
    assert len(seen) == len(sites) == 10  # patch conv, 2 x (qkv, proj, fc1, fc2), head
    for t, (x_ort, codes, scale, zero) in zip(seen, sites, strict=True):
        assert metrics(t, torch.from_numpy(x_ort).reshape(t.shape))["sqnr_db"] > 100.0
        mine = torch.clamp(torch.round(t / scale) + zero, 0, 255).numpy().reshape(codes.shape)
        lsb = np.abs(mine.astype(np.int32) - codes.astype(np.int32))
        assert lsb.max() <= 1 and (lsb > 0).mean() <= 1e-3, (lsb.max(), (lsb > 0).mean())
    # with the same codes everywhere, the outputs agree to float32 rounding
    assert metrics(y.reshape(-1), torch.from_numpy(y_ort).reshape(-1))["sqnr_db"] > 100.0
