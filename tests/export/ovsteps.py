"""Shared check of the OpenVINO decoder tests: the stateful decoder against the explicit cache."""

import numpy as np
import torch


def stateful_matches_explicit(path, prompt: list[int], steps: int = 4):
    """A prefill then one-token steps through ``OvDecoder(path)`` (cache inside) and
    ``OvDecoder(path, stateful=False)`` (cache in and out): logits > 90 dB apart at every step.

    Returns ``(inner, outer, last ids, inner's past)`` for further checks.
    """
    from slimformer.export.genparity import compare
    from slimformer.export.openvino import OvDecoder

    inner, outer = OvDecoder(path), OvDecoder(path, stateful=False)
    assert inner.stateful and not outer.stateful
    p_in, p_out = inner.empty(1), outer.empty(1)
    ids = np.asarray([prompt], np.int64)
    for _ in range(steps):  # a prefill, then one-token steps
        a, p_in = inner.step(ids, p_in)
        b, p_out = outer.step(ids, p_out)
        assert compare(torch.from_numpy(b), torch.from_numpy(a))["sqnr_db"] > 90
        assert p_in[0].shape[2] == p_out[0].shape[2] and p_in[0].shape[3] == 0
        ids = np.asarray([[int(b[0, -1].argmax())]], np.int64)
    return inner, outer, ids, p_in
