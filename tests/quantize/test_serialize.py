"""Saved quantized folders: codes packed at their bit-width, no float copies, identical outputs."""

import json

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset, get_dataset
from slimformer.errors import ModelLoadError
from slimformer.models.evaluate import model_size
from slimformer.models.loading import load_model
from slimformer.models.spec import HfDirSpec, ZooSpec
from slimformer.models.structure import discover
from slimformer.prune.slicing import SliceSpec, slice_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference
from slimformer.quantize.pack import pack_codes, packed_bytes, unpack_codes
from slimformer.quantize.serialize import TENSORS, load_quantized, save_quantized
from slimformer.store.integrity import seal

DIGITS = ZooSpec(name="vit-digits-seq")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_round_trip_at_every_width(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    codes[0] = 2**bits - 1  # the largest code survives
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, (n,)), codes)


def test_pack_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match=r"outside \[0, 7\]"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ModelLoadError, match=r"uint8 \[2\] expected for 4 3-bit codes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, (2, 2))


def _file_data_bytes(path) -> int:
    """Bytes of a safetensors file's tensor data (the file less its JSON header)."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def _check_round_trip(model, folder, spec, x, slice_spec=None):
    """Save, load, compare outputs bit for bit; returns (loaded model, manifest)."""
    save_quantized(model, folder, spec, slice_spec)
    again = load_quantized(folder)
    with torch.no_grad():
        assert torch.equal(again(**x), model(**x))
    meta = json.loads((folder / "slimformer.json").read_text())
    stored = set(meta["tensors"])
    for lq in model.quant.linears.values():  # no float copy of a weight its codes give
        assert "model." + lq.name not in stored
    assert all(r["param"] for r in meta["codes"].values())
    return again, meta


def _digits_x(n=64):
    return {"x": get_dataset("digits-seq", "test").inputs["x"][:n]}


@pytest.mark.parametrize(("wbits", "abits"), [(4, 4), (8, 8), (3, 8)])
def test_digits_codes_packed_outputs_identical(tmp_path, wbits, abits):
    lm = load_model(DIGITS)
    res = quantize(lm.module, QuantConfig(method="repq", weight_bits=wbits, act_bits=abits),
                   get_dataset("digits-seq", "calib", limit=64))
    model = to_inference(res.model)
    again, meta = _check_round_trip(model, tmp_path / "q", DIGITS, _digits_x())
    for key, lq in model.quant.linears.items():
        rec = meta["codes"][f"quant.linears.{key}.int_weight"]
        assert rec["bits"] == wbits and meta["tensors"][f"quant.linears.{key}.int_weight"] == {
            "dtype": "U8", "shape": [packed_bytes(lq.int_weight.numel(), wbits)]}
        assert torch.equal(again.quant.linears[key].int_weight, lq.int_weight)
    # the data is what the report counts (this model is tiny: its JSON header is not)
    assert _file_data_bytes(tmp_path / "q" / TENSORS) <= 1.1 * model_size(model)["bytes"]


def test_simulated_form_and_pruned_model_round_trip(tmp_path):
    lm = load_model(DIGITS)
    x = _digits_x(2)
    spec = SliceSpec(heads={0: (0,)}, mlp={1: tuple(range(0, 32, 2))}, dims={})
    slice_model(lm.module, discover(lm.module, x), spec, inplace=True, check_inputs=x)
    res = quantize(lm.module, QuantConfig(method="minmax", weight_bits=4, act_bits=8),
                   get_dataset("digits-seq", "calib", limit=64))
    for form, model in (("sim", res.model), ("inf", to_inference(res.model))):
        again, meta = _check_round_trip(model, tmp_path / form, DIGITS, _digits_x(), spec)
        assert meta["inference_form"] == (form == "inf") == again.inference
        assert again.quant.linears["blocks_1_fc1_weight"].matrix().shape == (16, 16)


def test_embedding_tables_are_packed(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, vocab_size=500, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(tmp_path / "hf")
    spec = HfDirSpec(path=str(tmp_path / "hf"))
    lm = load_model(spec)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (48, 16), generator=g)
    data = TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                             torch.zeros(48, dtype=torch.long))
    res = quantize(lm.module, QuantConfig(method="minmax", weight_bits=4, act_bits=8,
                                          embedding_bits=4), data)
    model = to_inference(res.model)
    assert model.quant.embeddings
    x = {"input_ids": ids[:8], "attention_mask": torch.ones_like(ids[:8])}
    save_quantized(model, tmp_path / "q", spec)
    again = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(**x).last_hidden_state, model(**x).last_hidden_state)
    stored = json.loads((tmp_path / "q" / "slimformer.json").read_text())["tensors"]
    for key, eq in model.quant.embeddings.items():
        assert "model." + eq.name not in stored
        assert stored[f"quant.embeddings.{key}.int_weight"]["shape"] == [
            packed_bytes(eq.int_weight.numel(), 4)]
    assert _file_data_bytes(tmp_path / "q" / TENSORS) <= 1.1 * model_size(model)["bytes"]


def test_code_record_that_disagrees_with_the_model_is_refused(tmp_path):
    lm = load_model(DIGITS)
    res = quantize(lm.module, QuantConfig(method="minmax", weight_bits=4, act_bits=8),
                   get_dataset("digits-seq", "calib", limit=64))
    q = tmp_path / "q"
    save_quantized(to_inference(res.model), q, DIGITS)
    meta = json.loads((q / "slimformer.json").read_text())
    meta["codes"]["quant.linears.head_weight.int_weight"]["bits"] = 8
    (q / "slimformer.json").write_text(json.dumps(seal(meta, q, [TENSORS])))
    with pytest.raises(ModelLoadError, match=r"does not fit the rebuilt model .*head_weight"
                                             r"\.int_weight: 8-bit codes of \[\d+, 16\] recorded"):
        load_quantized(q)


@pytest.mark.slow
@pytest.mark.parametrize(("wbits", "abits"), [(4, 4), (8, 8)])
def test_vit_fmnist_file_is_the_reported_size(tmp_path, wbits, abits):
    spec = ZooSpec(name="vit-fmnist")
    lm = load_model(spec)
    res = quantize(lm.module, QuantConfig(method="repq", weight_bits=wbits, act_bits=abits),
                   get_dataset("fashion-mnist", "calib", limit=64))
    model = to_inference(res.model)
    x = {"pixel_values": get_dataset("fashion-mnist", "test", limit=32).inputs["pixel_values"]}
    _check_round_trip(model, tmp_path / "q", spec, x)
    size = (tmp_path / "q" / TENSORS).stat().st_size
    assert size <= 1.1 * model_size(model)["bytes"], (size, model_size(model))
