"""hls4ml 1.3 pitfalls that :mod:`slimformer.hardware.adapter` works around.

Each test asserts that upstream hls4ml still has the problem: when one fails, hls4ml fixed it
and the matching workaround can go.
"""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

hls4ml = pytest.importorskip("hls4ml")


class _SeqSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):  # x (B, 4, 4)
        return torch.softmax(self.fc(x), dim=-1)


def _convert(model, shape, tmp_path):
    cfg = hls4ml.utils.config_from_pytorch_model(model, input_shape=shape, granularity="name",
                                                 channels_last_conversion="off",
                                                 transpose_outputs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hls4ml.converters.convert_from_pytorch_model(
            model, hls_config=cfg, output_dir=str(tmp_path), io_type="io_parallel")


def test_pitfall_b_linear_over_sequence_keeps_torch_weight_layout(tmp_path):
    torch.manual_seed(0)
    model = _SeqSoftmax().eval()
    hm = _convert(model, (4, 4), tmp_path)
    layer = next(lay for lay in hm.get_layers() if lay.name == "fc")
    w = np.asarray(layer.get_weights("weight").data).reshape(4, 4)
    # hls4ml expects (in, out); with conversion off it keeps PyTorch's (out, in)
    assert np.allclose(w, model.fc.weight.detach().numpy())
    assert not np.allclose(w, model.fc.weight.detach().numpy().T)


def test_pitfall_c_softmax_over_3d_normalizes_the_whole_tensor(tmp_path):
    hm = _convert(_SeqSoftmax().eval(), (4, 4), tmp_path)
    sm = next(lay for lay in hm.get_layers() if lay.class_name == "Softmax")
    assert (sm.get_attr("n_outer", 1), sm.get_attr("n_inner", 1)) == (1, 1)  # not (4, 1)


def test_pitfall_d_einsum_handler_reports_the_input_shape():
    from hls4ml.converters.pytorch.core import parse_einsum_layer

    node = SimpleNamespace(args=["bqd,bkd->bqk"])
    _, shape = parse_einsum_layer("einsum", "e", ["a", "b"], [[None, 8, 2], [None, 8, 2]],
                                  node, None, None, {})
    assert shape == [None, 8, 2]  # the real output shape is [None, 8, 8]


def test_pitfall_a_softmax_table_precisions_are_not_read_from_the_config(tmp_path):
    """hls4ml reads result/weight/bias/accum from the config, not the softmax table types."""
    from hls4ml.converters import create_config
    from hls4ml.model.graph import ModelGraph

    cfg = create_config(output_dir=str(tmp_path), backend="Vitis", io_type="io_parallel")
    want = "ufixed<18,1,RND_CONV,SAT>"
    cfg["HLSConfig"] = {"Model": {"Precision": "fixed<16,6>", "ReuseFactor": 1},
                        "LayerName": {"sm": {"Precision": {"result": want, "exp_table": want}}}}
    layers = [{"name": "x", "class_name": "InputLayer", "input_shape": [8]},
              {"name": "sm", "class_name": "Softmax", "inputs": ["x"], "activation": "softmax",
               "n_in": 8, "axis": -1}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hm = ModelGraph.from_layer_list(cfg, layers, inputs=["x"], outputs=["sm"])
    sm = hm.graph["sm"]
    assert sm.get_attr("result_t").precision.width == 18  # result: read
    exp_t = sm.get_attr("exp_table_t").precision
    assert (exp_t.width, exp_t.integer, exp_t.signed) != (18, 1, False)  # exp_table: ignored
