"""quantize(): every model of the generality set and the zoo, both forms, save/load, bad input."""

import math
import os

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset, get_dataset
from slimformer.errors import CalibrationError, ConfigError, UnsupportedModelError
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.pipeline import evaluate_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference
from slimformer.quantize.serialize import load_quantized, save_quantized
from tests.quantize.test_reparam import _calib, _out


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return 10 * math.log10(float((ref**2).sum()) / max(float(((ref - got) ** 2).sum()), 1e-30))


@pytest.mark.parametrize("name", sorted(GENERALITY))
@pytest.mark.parametrize("method", ["minmax", "repq"])
def test_every_generality_model_quantizes(name, method, request):
    if name == "mobilevit":  # a known weakness, reported: 89 quantized layers (35 convs) in
        request.applymarker(pytest.mark.xfail(  # series; every site >= 37 dB, the output ~14
            reason="MobileViT W8A8 output SQNR 8.9-14 dB (floor 15): noise accumulated over 89 "
            "quantized layers (all convs in float: 21.5 dB)", strict=False))
    lm = load_model(GENERALITY[name])
    x = lm.example_inputs(4, seed=5)
    res = quantize(lm.module, QuantConfig(method=method, weight_bits=8, act_bits=8), _calib(lm))
    outs = []
    for model in (lm.module, res.model):  # the same random draws for models that sample
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outs.append(_out(model(**x)).float())
    ref, got = outs
    # W8A8 on random-weight models: the output keeps most of its signal
    assert sqnr_db(ref, got) > 15, name
    assert len(res.model.quant.attention) > 0


@pytest.fixture(scope="module")
def digits():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    return lm, get_dataset("digits-seq", "calib"), get_dataset("digits-seq", "test")


def test_inference_form_matches_simulated(digits):
    lm, calib, test = digits
    res = quantize(lm.module, QuantConfig(method="repq", weight_bits=4, act_bits=6), calib)
    inf = to_inference(res.model)
    x = test.inputs["x"]
    with torch.no_grad():
        sim, got = res.model(x=x), inf(x=x)
    assert sqnr_db(sim, got) > 80  # same math, float rounding only
    assert torch.equal(sim.argmax(1), got.argmax(1))
    lq = next(iter(inf.quant.linears.values()))
    assert lq.int_weight.dtype == torch.uint8 and int(lq.int_weight.max()) <= 15
    assert all(a.inference for a in inf.quant.attention.values())


def test_quantize_is_seeded_and_leaves_the_global_rng_alone(digits):
    lm, calib, test = digits
    cfg = QuantConfig(method="repq", weight_bits=4, act_bits=4, calib_samples=64)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = quantize(lm.module, cfg, calib).model
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(7)  # another global state: the same quantized model (config.seed)
    b = quantize(lm.module, cfg, calib).model
    x = test.inputs["x"][:64]
    with torch.no_grad():
        assert torch.equal(a(x=x), b(x=x))


@pytest.mark.parametrize("form", ["simulated", "inference"])
def test_save_and_load_give_identical_outputs(digits, tmp_path, form):
    lm, calib, test = digits
    res = quantize(lm.module, QuantConfig(method="repq", weight_bits=4, act_bits=4), calib)
    model = res.model if form == "simulated" else to_inference(res.model)
    save_quantized(model, tmp_path / "q", ZooSpec(name="vit-digits-seq"))
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [".slimformer-output",
                                                                 "quantized.safetensors",
                                                                 "slimformer.json"]
    mask = os.umask(0)
    os.umask(mask)  # the weights get a plain file's mode (safetensors writes 0600 files)
    assert (tmp_path / "q" / "quantized.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    again = load_quantized(tmp_path / "q")
    x = test.inputs["x"]
    with torch.no_grad():
        assert torch.equal(model(x=x), again(x=x))


def test_save_load_text_model_with_post_norm_affine(tmp_path):
    lm = load_model(GENERALITY["bert"])
    res = quantize(lm.module, QuantConfig(method="repq", weight_bits=6, act_bits=6), _calib(lm))
    save_quantized(res.model, tmp_path / "q", GENERALITY["bert"])
    again = load_quantized(tmp_path / "q")
    x = lm.example_inputs(3, seed=9)
    with torch.no_grad():
        assert torch.equal(_out(res.model(**x)), _out(again(**x)))


def test_save_load_pruned_then_quantized(tmp_path):
    from slimformer.models.structure import discover
    from slimformer.prune.slicing import SliceSpec, slice_model

    lm = load_model(GENERALITY["bert"])
    x = lm.example_inputs(2)
    spec = SliceSpec(heads={0: (0, 2)}, mlp={1: tuple(range(0, 64, 3))},
                     dims={1: ((0, 3, 5, 7), (0, 3, 5, 7))})
    small = slice_model(lm.module, discover(lm.module, x), spec, check_inputs=x)
    res = quantize(small, QuantConfig(method="repq", weight_bits=8, act_bits=8), _calib(lm))
    model = to_inference(res.model)
    save_quantized(model, tmp_path / "q", GENERALITY["bert"], spec)
    again = load_quantized(tmp_path / "q")  # rebuilt at the pruned shapes, not the base ones
    x = lm.example_inputs(3, seed=9)
    with torch.no_grad():
        assert torch.equal(_out(model(**x)), _out(again(**x)))


def test_vit_fmnist_w8a8_agrees_with_fp32():
    lm = load_model(ZooSpec(name="vit-fmnist"))
    test = get_dataset("fashion-mnist", "test", 1000)
    p0, y = evaluate_model(lm.module, test, 500)
    res = quantize(lm.module, QuantConfig(method="repq"), get_dataset("fashion-mnist", "calib"))
    p1, _ = evaluate_model(to_inference(res.model), test, 500)
    assert float((p1 == p0).float().mean()) > 0.98
    assert abs(float((p1 == y).float().mean()) - float((p0 == y).float().mean())) < 0.01


def test_nan_calibration_data_names_the_input_and_row(digits):
    lm, calib, _ = digits
    x = calib.inputs["x"].clone()
    x[3, 2, 5] = float("nan")
    bad = TensorDictDataset({"x": x}, calib.labels)
    with pytest.raises(CalibrationError, match=r"NaN or inf in the calibration data: input 'x', "
                                               r"row 3 "):
        quantize(lm.module, QuantConfig(method="minmax"), bad)


def test_too_few_calibration_samples(digits):
    lm, calib, _ = digits
    few = TensorDictDataset({"x": calib.inputs["x"][:4]}, calib.labels[:4])
    with pytest.raises(CalibrationError, match="needs at least 8 calibration samples, got 4"):
        quantize(lm.module, QuantConfig(method="repquant"), few)


def test_bits_out_of_range_and_unknown_keys():
    with pytest.raises(Exception, match="must be 2..8"):
        QuantConfig(weight_bits=12)
    from slimformer.recipe import parse_recipe

    with pytest.raises(ConfigError) as e:
        parse_recipe({"stages": [{"type": "evaluate"}, {"type": "quantize", "weight_bits": 12,
                                                        "act_bitz": 4}]})
    text = str(e.value)
    assert "stages[1].weight_bits: must be 2..8, got 12" in text
    assert "stages[1].act_bitz: unknown key" in text


def test_glob_pattern_that_matches_nothing(digits):
    lm, calib, _ = digits
    cfg = QuantConfig(overrides=[{"pattern": "blocks.*.fc1.weight", "weight_bits": 4},
                                 {"pattern": "encoder.*", "weight_bits": 2}])
    with pytest.raises(ConfigError, match=r"overrides\[1\].pattern: 'encoder.\*' matches no"):
        quantize(lm.module, cfg, calib)


def test_overrides_and_keep_float(digits):
    lm, calib, _ = digits
    cfg = QuantConfig(method="minmax", overrides=[{"pattern": "blocks.*.fc1.weight",
                                                   "weight_bits": 4}], keep_float=["head.weight"])
    res = quantize(lm.module, cfg, calib)
    lin = {lq.name: lq for lq in res.model.quant.linears.values()}
    assert "head.weight" not in lin and lin["blocks.0.fc1.weight"].wq.bits == 4
    assert lin["blocks.0.fc2.weight"].wq.bits == 8


def test_softmax_quantization_needs_attention():
    from slimformer.models.spec import FactorySpec

    lm = load_model(FactorySpec(factory="torch.nn:Linear", kwargs={"in_features": 8,
                                "out_features": 4}, inputs={"input": {"shape": [1, 8]}}))
    data = TensorDictDataset({"input": torch.randn(16, 8)}, torch.zeros(16, dtype=torch.long))
    with pytest.raises(UnsupportedModelError, match="no attention was found"):
        quantize(lm.module, QuantConfig(method="repq", softmax="log_sqrt2"), data)
    res = quantize(lm.module, QuantConfig(method="repq", softmax="none"), data)
    assert any("no norm feeds a Linear" in n for n in res.notes)


def test_size_of_quantized_model_counts_bits(digits):
    from slimformer.models.evaluate import model_size

    lm, calib, _ = digits
    fp = model_size(lm.module)["bytes"]
    w4 = model_size(to_inference(quantize(lm.module, QuantConfig(weight_bits=4, act_bits=8),
                                          calib).model))["bytes"]
    w8 = model_size(quantize(lm.module, QuantConfig(weight_bits=8, act_bits=8), calib).model)
    assert w4 < w8["bytes"] < fp
    assert w8["params"] == sum(p.numel() for p in lm.module.parameters())


def test_dual_clipping_that_hurts_the_model_output_is_dropped():
    # whisper (fan-in init): the learned bounds cut each site's own output error on held-out
    # rows by 80-99%, yet the model output error grows 5x (rare large frames are clipped)
    from slimformer.models.generality import fan_in_init
    from slimformer.models.outputs import OutputStats, leaves, seeded_forward

    lm = load_model(GENERALITY["whisper"])
    fan_in_init(lm.module, lm.example_inputs(2, seed=0))
    calib = _calib(lm, 16, seed=1)
    x = lm.example_inputs(64, seed=2)
    db = {}
    for name, cfg in (("minmax", QuantConfig(method="minmax", calib_samples=16,
                                             attention="quantized")),
                      ("clip", QuantConfig(method="repquant", calib_samples=16, clip_steps=100,
                                           recon_steps=0))):
        res = quantize(lm.module, cfg, calib)
        stats = OutputStats()
        with torch.no_grad():
            stats.add(leaves(seeded_forward(lm.module, x)), leaves(seeded_forward(res.model, x)))
        db[name] = stats.result()["sqnr_db"]
    assert any(n.startswith("dual clipping dropped") for n in res.notes), res.notes
    assert any("dual clipping cut the held-out output error" in n for n in res.notes)
    assert db["clip"] >= db["minmax"] - 0.5, db  # it was 30.1 vs 35.4 dB when kept


def test_attention_auto_is_float_for_the_baselines_and_quantized_for_repq():
    """``attention: auto`` leaves q, k, v and the probabilities float for min/max (as ONNX
    Runtime's Attention op runs them) and quantizes them for repq and fixed-point scales; a
    softmax quantizer with attention float is a typed error."""
    from pydantic import ValidationError

    assert QuantConfig(method="minmax").softmax_kind == "none"
    assert QuantConfig(method="repq").attention_kind == "quantized"
    assert QuantConfig(method="minmax", power_of_two_scales=True).attention_kind == "quantized"
    assert QuantConfig(method="minmax", softmax="log2").attention_kind == "quantized"
    with pytest.raises(ValidationError, match="attention: float"):
        QuantConfig(method="minmax", softmax="uniform", attention="float")
    lm = load_model(GENERALITY["bert"])
    calib = _calib(lm, 8, seed=1)
    for attention, floats in (("auto", True), ("quantized", False)):
        res = quantize(lm.module, QuantConfig(method="minmax", calib_samples=8,
                                              attention=attention), calib)
        sites = list(res.model.quant.attention.values())
        assert sites and all((a.q_in.keep_float and a.k_in.keep_float and a.v_in.keep_float
                              and a.probs_float) == floats for a in sites)
        assert any(n.startswith("attention: ") for n in res.notes) == floats


@pytest.mark.parametrize(("fields", "method"), [
    ({}, "minmax"),  # W8A8: min/max with float attention, migration, outlier channels
    ({"act_bits": 4}, "repq"),
    ({"weight_bits": 6}, "repq"),
    ({"overrides": [{"pattern": "*fc2*", "act_bits": 6}]}, "repq"),
    ({"overrides": [{"pattern": "*fc2*", "weight_bits": 8}]}, "minmax"),
    ({"power_of_two_scales": True}, "repq"),  # hls4ml: fixed-point attention, RepQ's folds
    ({"weight_only": True, "weight_bits": 4, "group_size": 128}, "gptq"),
    ({"act_dynamic": "token"}, "minmax"),
    ({"method": "repq"}, "repq"),
])
def test_the_default_method_follows_the_bits(fields, method):
    cfg = QuantConfig(**fields)
    assert cfg.method == method
    # what a recipe stage gets is the same, and naming the method always wins
    from slimformer.stages.quantize import QuantizeStage
    low_bit = fields in ({"act_bits": 4},)  # a stage's default below 5 activation bits: per token
    assert QuantizeStage(**fields).quant_config().method == ("minmax" if low_bit else method)
    named = "minmax" if fields.get("weight_only") else "percentile"
    assert QuantConfig(**{**fields, "method": named}).method == named


def test_a_causal_lm_weight_only_stage_calibrates_on_512_rows_in_windows_by_default():
    from slimformer.stages.quantize import QuantizeStage

    wo = {"weight_only": True, "weight_bits": 4, "group_size": 128}
    cfg = QuantizeStage(**wo).quant_config("causal-lm")
    assert (cfg.calib_window, cfg.calib_samples) == (512, 512)
    cfg = QuantizeStage(**wo, calib_samples=64, calib_window=256).quant_config("causal-lm")
    assert (cfg.calib_window, cfg.calib_samples) == (256, 64)  # what the stage names wins
    for stage, task in ((QuantizeStage(**wo), "sentence-embedding"), (QuantizeStage(), "causal-lm")):
        cfg = stage.quant_config(task)  # encoders, and activation methods: rows as given
        assert (cfg.calib_window, cfg.calib_samples) == (None, 128)


def test_a_stage_quantizing_activations_to_4_bits_takes_per_token_ranges_unless_told():
    from slimformer.stages.quantize import QuantizeStage

    for fields in ({"act_bits": 4}, {"weight_bits": 4, "act_bits": 3},
                   {"overrides": [{"pattern": "*fc2*", "act_bits": 4}]}):
        cfg = QuantizeStage(**fields).quant_config()
        assert (cfg.method, cfg.act_dynamic, cfg.attention_kind) == ("minmax", "token", "float")
        assert QuantizeStage.model_validate(fields).quant_config().act_dynamic == "token"
        assert cfg.rotate_inputs == "auto"  # the online rotation, judged on held-out rows
        assert QuantizeStage(**fields, rotate_inputs="off").quant_config().rotate_inputs == "off"
    for fields in ({"act_bits": 4, "method": "repq"}, {"act_bits": 4, "act_dynamic": "off"},
                   {"act_bits": 4, "power_of_two_scales": True}, {"act_bits": 4, "symmetric": True},
                   {"weight_bits": 4}, {}):  # named, fixed-point, symmetric, 8-bit activations
        cfg = QuantizeStage(**fields).quant_config()
        assert cfg.act_dynamic == "off", fields
        assert cfg.rotate_inputs == ("auto" if fields.get("method") == "repq" or
                                     fields.get("act_dynamic") else "off"), fields
    assert QuantizeStage(act_bits=4).quant_config("causal-lm").act_dynamic == "token"


def test_a_dumped_quantize_stage_read_again_resolves_to_the_same_config():
    """The report's recipe is a dump: what the stage filled in by default must not become a choice."""
    from slimformer.stages.quantize import QuantizeStage

    for fields, task in (({"act_bits": 4}, None), ({"act_bits": 4, "act_dynamic": "off"}, None),
                         ({"act_bits": 4, "method": "repq"}, None), ({}, "causal-lm"),
                         ({"weight_only": True, "weight_bits": 4, "group_size": 128}, "causal-lm")):
        stage = QuantizeStage(**fields)
        again = QuantizeStage.model_validate(stage.model_dump(mode="json"))
        assert again.quant_config(task) == stage.quant_config(task), fields
