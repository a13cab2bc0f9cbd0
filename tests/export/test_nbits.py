"""MatMulNBits from our codes on an encoder: a Linear on 2-D rows (exported as Gemm) included."""

import numpy as np
import pytest
import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.export import OnnxConfig, export_onnx
from slimformer.models.outputs import metrics
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=128)).eval()


def _rows(n=16, t=12, seed=0) -> TensorDictDataset:
    ids = torch.randint(1, 64, (n, t), generator=torch.Generator().manual_seed(seed))
    return TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_a_pooler_gemm_becomes_matmulnbits_with_its_bias(bert, tmp_path):
    """BERT's pooler (tanh(Linear(h[:, 0]))) is a Gemm in the graph: it gets our codes too, and
    ONNX Runtime's pooler output equals the quantized PyTorch model's (SQNR, not atol)."""
    import onnx
    import onnxruntime as ort

    qmodel = quantize(bert, QuantConfig(weight_only=True, weight_bits=4, group_size=32,
                                        method="minmax", calib_batch_size=8), _rows()).model
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    path = tmp_path / "bert.onnx"
    res = export_onnx(qmodel, path, inputs, OnnxConfig())
    graph = onnx.load(path).graph
    ops = [n.op_type for n in graph.node]
    # 6 + the pooler; the query / key / value Linears of the layer read one input: one op
    assert "Gemm" not in ops and ops.count("MatMulNBits") == len(qmodel.quant.linears) - 2 == 5
    assert res.fusion["integer_matmuls"] == 5 and ops.count("Split") == 1
    assert min(p["sqnr_db"] for p in res.parity.values()) > 60, res.parity
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {k: v.numpy() for k, v in inputs.items()
                                          if k in {i.name for i in sess.get_inputs()}}), strict=True))
    with torch.no_grad():
        ref = qmodel(**inputs)
    pooled = next(v for k, v in got.items() if "pool" in k)
    m = metrics(ref.pooler_output, torch.from_numpy(np.asarray(pooled)))
    assert m["sqnr_db"] > 60, m
