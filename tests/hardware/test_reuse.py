"""reuse_factor auto: the default fits the part's DSP and LUT budget by the estimate."""

from slimformer.data.datasets import get_dataset
from slimformer.hardware import HlsConfig, build_hls
from slimformer.hardware.estimate import part_resources
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.quantize import QuantConfig, quantize, to_inference


def test_auto_reuse_fits_the_part(tmp_path):
    model = load_model(ZooSpec(name="vit-digits-seq")).module
    calib = get_dataset("digits-seq", "calib")
    q = to_inference(quantize(model, QuantConfig(method="minmax", softmax="none",
                                                 power_of_two_scales=True), calib).model)
    cfg = HlsConfig()
    assert cfg.reuse_factor == "auto"
    res = build_hls(q, cfg, tmp_path / "p", calib, None, compile=False)
    dsp, lut = part_resources(cfg.part)
    assert res.estimate.dsp <= 0.9 * dsp and res.estimate.lut <= 0.9 * lut
    note = next(n for n in res.notes if n.startswith("reuse factor auto:"))
    r = int(note.split(":")[1].split()[0])
    one = build_hls(q, HlsConfig(reuse_factor=1), tmp_path / "one", calib, None, compile=False)
    if r > 1:  # reuse 1 would not fit: that is why auto chose more
        assert one.estimate.dsp > 0.9 * dsp or one.estimate.lut > 0.9 * lut
