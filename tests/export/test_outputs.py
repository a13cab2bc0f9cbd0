"""Export keeps every output and every input the model reads: a two-tower model, an
encoder-decoder, a vision-language model (CLIP), float and QDQ, each output checked against
PyTorch by its own parity figures; an input no node reads is an error naming it."""

import onnx
import pytest
import torch
from torch import nn

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import ExportError
from slimformer.export.config import OnnxConfig
from slimformer.export.onnx import export_onnx
from slimformer.export.ortrun import run_all, session
from slimformer.models import outputs as O
from slimformer.models.generality import GENERALITY, fan_in_init
from slimformer.models.loading import load_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference


class TwoTower(nn.Module):
    """Two encoders that never meet: each output depends on one input only."""

    def __init__(self, dim=16):
        super().__init__()
        self.text = nn.Sequential(nn.Embedding(50, dim), _layer(dim))
        self.image = nn.Sequential(nn.Linear(12, dim), _layer(dim))

    def forward(self, input_ids, patches):
        t, i = self.text(input_ids), self.image(patches)  # (B, T, D), (B, P, D)
        return {"text_embeds": t[:, 0], "image_embeds": i.mean(1),
                "hidden": (t, i)}


class EncDec(nn.Module):
    """Encoder-decoder returning the decoder's and the encoder's last hidden states."""

    def __init__(self, dim=16):
        super().__init__()
        self.emb = nn.Embedding(50, dim)
        self.enc = _layer(dim)
        self.dec = nn.TransformerDecoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, input_ids, decoder_input_ids):
        memory = self.enc(self.emb(input_ids))  # (B, S, D)
        return self.dec(self.emb(decoder_input_ids), memory), memory


def _layer(dim):
    return nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True, norm_first=True)


def _two_tower_inputs(b=3):
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 50, (b, 7), generator=g),
            "patches": torch.randn(b, 5, 12, generator=g)}


def _check_all_outputs(res, model, x, path, min_cosine=0.99999):
    with torch.no_grad():
        want = O.leaves(model(**x))
    graph = onnx.load(str(path))
    assert [o.name for o in graph.graph.output] == list(want)
    for label, p in res.parity.items():
        assert list(p["outputs"]) == list(want), label
        for name, m in p["outputs"].items():
            assert m["cosine"] >= min_cosine, (label, name, m)
        assert p["cosine"] == min(m["cosine"] for m in p["outputs"].values())
    got = run_all(session(path), x)  # ONNX Runtime by name, independent of the parity code
    for name, w in want.items():
        assert O.metrics(w, torch.from_numpy(got[name]))["cosine"] >= min_cosine, name
    return graph


def test_two_tower_keeps_both_towers_and_inputs(tmp_path):
    torch.manual_seed(0)
    model, x = TwoTower().eval(), _two_tower_inputs()
    res = export_onnx(model, tmp_path / "m.onnx", x)
    graph = _check_all_outputs(res, model, x, tmp_path / "m.onnx")
    assert list(res.inputs) == ["input_ids", "patches"]
    inits = {i.name for i in graph.graph.initializer}
    assert any(n.startswith("model.image.") for n in inits)  # the second tower's weights
    assert any(n.startswith("model.text.") for n in inits)


def test_encoder_decoder_keeps_both_outputs(tmp_path):
    torch.manual_seed(0)
    model = EncDec().eval()
    x = {"input_ids": torch.randint(0, 50, (2, 6)), "decoder_input_ids": torch.randint(0, 50, (2, 4))}
    res = export_onnx(model, tmp_path / "m.onnx", x)
    _check_all_outputs(res, model, x, tmp_path / "m.onnx")
    assert list(res.parity["other"]["outputs"]) == ["0", "1"]


def test_unused_input_is_an_error_or_a_reported_choice(tmp_path):
    class IgnoresMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, mask=None):
            return self.lin(x)

    x = {"x": torch.randn(2, 4), "mask": torch.ones(2, 4)}
    with pytest.raises(ExportError, match="reads the example input mask"):
        export_onnx(IgnoresMask(), tmp_path / "m.onnx", x)
    assert list(tmp_path.iterdir()) == []
    res = export_onnx(IgnoresMask(), tmp_path / "m.onnx", x, OnnxConfig(unused_inputs="warn"))
    assert list(res.inputs) == ["x"]
    assert any("without the example input mask" in w for w in res.warnings)
    assert [i.name for i in session(tmp_path / "m.onnx").get_inputs()] == ["x"]


def test_two_tower_qdq_keeps_every_output(tmp_path):
    torch.manual_seed(0)
    model = TwoTower().eval()
    x = _two_tower_inputs()
    fan_in_init(model, x)
    calib = TensorDictDataset(_two_tower_inputs(16), torch.zeros(16, dtype=torch.long))
    inf = to_inference(quantize(model, QuantConfig(method="minmax", calib_samples=16),
                                calib).model)
    res = export_onnx(inf, tmp_path / "q.onnx", x)
    with torch.no_grad():
        want = O.leaves(inf(**x))
    assert [o.name for o in onnx.load(str(tmp_path / "q.onnx")).graph.output] == list(want)
    for label, p in res.parity.items():
        assert list(p["outputs"]) == list(want)
        for name, m in p["outputs"].items():  # QDQ vs the simulated model, in output steps
            assert m["within_1_step"] >= 0.95 and m["cosine"] >= 0.999, (label, name, m)
    assert res.fusion["integer_matmuls"] >= len(inf.quant.linears) // 2


@pytest.mark.slow
@pytest.mark.parametrize("name, n_out", [("clip", 8), ("t5", 2)])
def test_vision_language_and_encoder_decoder_keep_every_output(name, n_out, tmp_path):
    lm = load_model(GENERALITY[name])
    x = lm.example_inputs(2)
    res = export_onnx(lm.module, tmp_path / "f.onnx", x)
    graph = _check_all_outputs(res, lm.module, x, tmp_path / "f.onnx")
    assert len(graph.graph.output) == n_out
    assert sorted(res.inputs) == sorted(x)  # every input is read
