"""GPTQ rounding with quantized activations (``gptq: true``, quantize.gptqacts).

The trained vit-fmnist at W3A3 (repq) on Fashion-MNIST calibration rows: GPTQ keeps each
Linear's calibrated per-channel grid and picks other codes on it, lowering the model output
error on the held-out calibration rows; judged on 1,000 test images by agreement with the float
model and accuracy. A round trip through the saved folder keeps the codes.
"""

import pytest
import torch

from slimformer.data.datasets import get_dataset
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.stages.context import evaluate_model


@pytest.fixture(scope="module")
def fmnist():
    lm = load_model(ZooSpec(name="vit-fmnist"))
    return lm, get_dataset("fashion-mnist", "calib"), get_dataset("fashion-mnist", "test", 1000)


@pytest.fixture(scope="module")
def pair(fmnist):
    lm, calib, _ = fmnist
    cfg = {"method": "repq", "weight_bits": 3, "act_bits": 3}
    return (quantize(lm.module, QuantConfig(**cfg, gptq=False), calib),
            quantize(lm.module, QuantConfig(**cfg, gptq=True), calib))


def test_gptq_codes_on_the_same_grids_lower_the_output_error(pair):
    rtn, gq = pair
    note = next(n for n in gq.notes if n.startswith("gptq:"))
    before, after = (float(x) for x in note.rsplit("rows ", 1)[1].split(" -> "))
    assert after < 0.95 * before, note  # kept only where it lowers the held-out error
    changed = 0
    for name, lq in gq.model.quant.linears.items():
        ref = rtn.model.quant.linears[name]
        if lq.param[0].dim() != 2:  # the patch embedding (a conv): rounded to nearest
            assert lq.int_weight is None
            continue
        assert lq.int_weight is not None and torch.equal(lq.wq.scale, ref.wq.scale)
        rtn_codes = torch.round(ref.matrix() / ref.wq.scale + ref.wq.zero).clamp(0, 7)
        changed += int((lq.int_weight.float() != rtn_codes).sum())
    assert changed > 0


def test_gptq_agrees_with_float_better_than_round_to_nearest(fmnist, pair):
    lm, _, test = fmnist
    pf, y = evaluate_model(lm.module, test, 500)
    agree = [float((evaluate_model(r.model, test, 500)[0] == pf).float().mean()) for r in pair]
    assert agree[1] > agree[0], agree


def test_gptq_codes_survive_the_saved_folder(fmnist, pair, tmp_path):
    from slimformer.quantize.serialize import load_quantized, save_quantized

    lm, _, test = fmnist
    gq = pair[1]
    save_quantized(gq.model, tmp_path / "q", ZooSpec(name="vit-fmnist"))
    again = load_quantized(tmp_path / "q")
    inputs = {k: v[:16] for k, v in test.inputs.items()}
    with torch.no_grad():
        a, b = gq.model(**inputs), again(**inputs)
    a = a.logits if hasattr(a, "logits") else a
    b = b.logits if hasattr(b, "logits") else b
    assert torch.equal(a, b)


def test_gptq_with_weight_only_or_repquant_is_refused():
    with pytest.raises(Exception, match="gptq: true rounds the weights of a model with quantized"):
        QuantConfig(weight_only=True, gptq=True)
    with pytest.raises(Exception, match="repquant its learned rounding"):
        QuantConfig(method="repquant", gptq=True)
