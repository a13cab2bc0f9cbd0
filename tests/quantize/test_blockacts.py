"""Block-wise activation calibration: as good as the whole-model path, bounded, checked per block."""

import math
import re

import pytest
import torch

import slimformer.quantize.phases as phases
from slimformer.data.datasets import get_dataset
from slimformer.errors import ConfigError
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.quantize.api import quantize
from slimformer.quantize.check import site_errors
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.spill import Spill, parse_bytes


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return 10 * math.log10(float((ref**2).sum()) / max(float(((ref - got) ** 2).sum()), 1e-30))


@pytest.fixture(scope="module")
def digits():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    return lm, get_dataset("digits-seq", "calib"), get_dataset("digits-seq", "test")


def _test_sqnr(lm, res, test) -> float:
    x = test.inputs["x"][:256]
    with torch.no_grad():
        return sqnr_db(lm.module(x=x), res.model(x=x))


@pytest.mark.parametrize("method", ["minmax", "repq"])
def test_blockwise_matches_or_beats_whole_model_calibration(digits, method, monkeypatch):
    lm, calib, test = digits
    cfg = QuantConfig(method=method, weight_bits=4, act_bits=6, calib_samples=64, smooth="off")
    monkeypatch.setattr(phases, "BLOCKWISE", ("minmax", "percentile", "repq"))  # repq: opt-in
    block = quantize(lm.module, cfg.model_copy(update={"max_memory": "1TB"}), calib)
    assert any("blocks calibrated one at a time" in n for n in block.notes)
    monkeypatch.setattr(phases, "BLOCKWISE", ())  # the whole-model path, as before
    whole = quantize(lm.module, cfg, calib)
    assert not any("blocks calibrated one at a time" in n for n in whole.notes)
    # on test rows no calibration saw: later blocks calibrated on earlier blocks' quantized
    # outputs lose no more than 0.5 dB against ranges observed on the float model
    assert _test_sqnr(lm, block, test) > _test_sqnr(lm, whole, test) - 0.5


def test_freed_blocks_keep_their_site_check(digits):
    lm, calib, _ = digits
    res = quantize(lm.module, QuantConfig(method="minmax", act_bits=8, calib_samples=32,
                                          smooth="off", max_memory="1TB"), calib)
    acts = [a for a in res.model.quant.acts.values()]
    assert acts and not any(a.observed for a in acts)  # every block's rows were freed
    _, db = site_errors(res.model.quant)
    assert all(a.name in db for a in acts)  # their SQNR was kept when their block was done
    assert min(db[a.name] for a in acts) > 20  # 8-bit activations: a real check, not a default


def test_max_memory_spills_to_disk_with_identical_results(digits):
    lm, calib, test = digits
    cfg = QuantConfig(method="minmax", weight_bits=8, act_bits=8, calib_samples=32,
                      smooth="off", max_memory="1TB")  # a budget: block-wise, nothing spilled
    free = quantize(lm.module, cfg, calib)
    assert not any("memory-mapped file" in n for n in free.notes)
    weights = sum(p.numel() * p.element_size() for p in lm.module.parameters()) + \
        sum(b.numel() * b.element_size() for b in lm.module.buffers())
    tight = quantize(lm.module, cfg.model_copy(update={"max_memory": f"{weights + 1}B"}), calib)
    assert any("memory-mapped file" in n for n in tight.notes)  # the process is over the budget
    x = test.inputs["x"][:128]
    with torch.no_grad():
        assert torch.equal(free.model(x=x), tight.model(x=x))


def test_max_memory_below_the_weights_is_refused(digits):
    lm, calib, _ = digits
    with pytest.raises(ConfigError, match="below the model's own weights.*at least"):
        quantize(lm.module, QuantConfig(method="minmax", max_memory="1KB", smooth="off"), calib)


def test_spill_files_are_removed_and_sizes_parse(tmp_path):
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("4 parsecs")
    t = torch.randn(64, 33)
    with Spill(1) as spill:
        kept = spill.keep(t)
        folder = spill.dir
        assert torch.equal(kept, t) and kept.data_ptr() != t.data_ptr()
    assert folder is not None and not __import__("os").path.exists(folder)
    assert torch.equal(kept, t)  # still readable: mapped


def _massive_in_last_block(lm, factor=1e4):
    """A copy of the model with one massive channel out of a norm of its last block.

    Same float function (the norm's gain and shift of channel 0 times ``factor``, the Linear it
    feeds divides that column by it), as :func:`tests.quantize.test_fallback._massive`.
    """
    import copy

    from slimformer.models.structure import discover

    model = copy.deepcopy(lm.module)
    norms = [n for n in discover(model, lm.example_inputs(2)).norms
             if len(n.linears) == 1 and re.search(r"\.\d+\.", n.module)]  # inside a block
    norm = norms[-1]
    params, mods = dict(model.named_parameters()), dict(model.named_modules())
    with torch.no_grad():
        mods[norm.module].weight[0] *= factor
        mods[norm.module].bias[0] *= factor
        for w in norm.linears:
            params[w][:, 0] /= factor
    return model, f"norm:{norm.module}:8"


def test_a_collapse_is_handed_to_the_fallback_in_the_block_it_happens(digits):
    """A massive channel out of one norm collapses its block at W8A8: found right there."""
    from tests.quantize.test_fallback import _out_db

    lm, calib, test = digits
    model, site = _massive_in_last_block(lm)
    block = re.match(r"(.*\.\d+)\.", site.split(":")[1]).group(1)  # blocks.1.norm1 -> blocks.1
    index = int(block.rpartition(".")[2])
    assert index >= 1  # a block after the first: earlier blocks pass, this one collapses
    ticks = []
    res = quantize(model, QuantConfig(method="minmax", smooth="off", max_memory="1TB"), calib,
                   progress=lambda *t: ticks.append(t))
    found = [n for n in res.notes if "found as it was calibrated" in n]
    assert len(found) == 1 and f"block {block} " in found[0], res.notes
    assert "handed to the fallback at once" in found[0]
    # found while that block was calibrated: the blocks before it were done, none after it
    steps = [s for s, d, t in ticks if s == "precision ranking" or s == "calibrate" and d]
    assert steps[:steps.index("precision ranking")].count("calibrate") == index
    # that one site kept float, recorded for a rebuild, and the floor holds on unseen rows
    assert res.float_activations == [site] and res.model.config.float_activations == [site]
    x = {"x": test.inputs["x"][:128]}
    assert res.output_sqnr_db >= 10 and _out_db(model, res.model, x) >= 10
    # without the per-block check the same model misses the floor (the check is what holds it)
    off = quantize(model, QuantConfig(method="minmax", smooth="off", max_memory="1TB",
                                      min_output_sqnr_db=None), calib)
    assert off.output_sqnr_db < 10 and not off.float_activations


@pytest.mark.parametrize("how", ["w8a8", "int4"])
def test_progress_inside_calibration_per_block_and_per_site(how):
    """Block-wise calibration ticks once per block and, inside each block, per Linear (GPTQ)."""
    from tests.tiny_lm import tiny_llama

    model = tiny_llama(64, 64, 3, pad_token_id=0)
    ids = torch.randint(2, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    from slimformer.data.datasets import TensorDictDataset

    data = TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    cfg = QuantConfig(method="minmax", smooth="off", max_memory="1TB", calib_batch_size=8,
                      min_output_sqnr_db=None) if how == "w8a8" else \
        QuantConfig(weight_only=True, method="gptq", weight_bits=4, group_size=32,
                    calib_batch_size=8)
    ticks = []
    quantize(model, cfg, data, progress=lambda *t: ticks.append(t))
    blocks = [(d, t) for s, d, t in ticks if s == "calibrate"]
    assert blocks[0] == (0, 4) and blocks[-1] == (4, 4)  # 3 blocks and the tail
    assert [d for d, _ in blocks] == sorted(d for d, _ in blocks)
    if how == "int4":  # every block's 7 Linears, one tick each, between its block ticks
        inner = [i for i, (s, d, t) in enumerate(ticks) if s == "gptq: Linears of the block"]
        assert len(inner) == 3 * 8 and {ticks[i][2] for i in inner} == {7}
        ends = [i for i, (s, d, t) in enumerate(ticks) if s == "calibrate" and d]
        for k, end in enumerate(ends[:3]):  # block k's Linears finish before block k is done
            assert sum(inner_i < end for inner_i in inner) == 8 * (k + 1)
