"""Sliced models (heads, head dims where sliceable, MLP units) export to ONNX; ONNX Runtime
reproduces them (relative error < 1e-4).

T5 is left out: its unpruned model already fails the dynamo exporter (FX decomposition).
"""

import numpy as np
import pytest
import torch

from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover
from slimformer.prune.slicing import SliceSpec, head_groups, slice_model, sliceable


def _sliced(name):
    lm = load_model(GENERALITY[name] if name in GENERALITY else ZooSpec(name=name))
    x = lm.example_inputs(2)
    s = discover(lm.module, x)
    bad = sliceable(lm.module, s, x, kinds=("heads", "mlp", "dims"))
    groups = head_groups(lm.module, s)
    heads = {i: tuple(range(a.heads - g)) for i, (a, g) in
             enumerate(zip(s.attention, groups, strict=True)) if i not in bad["heads"]}
    mlp = {i: tuple(range(1, m.hidden, 3)) for i, m in enumerate(s.mlps)}
    dims = {i: (tuple(range(0, s.attention[i].head_dim, 2)),) * 2 for i in bad["dims_mode"]}
    return slice_model(lm.module, s, SliceSpec(heads, mlp, dims), check_inputs=x).eval(), x


def _first(out) -> torch.Tensor:
    flat = out.to_tuple() if hasattr(out, "to_tuple") else out
    return [t for t in torch.utils._pytree.tree_flatten(flat)[0] if isinstance(t, torch.Tensor)
            and t.is_floating_point()][0]


class _FirstOutput(torch.nn.Module):
    """The model's first floating output only (HF caches are not exportable outputs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            model.config.use_cache = False

    def forward(self, **kw):
        return _first(self.model(**kw))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit-fmnist", "vit-digits-seq", "torch-encoder", "bert", "vit",
                                  "gpt2", "llama", "timm-vit", "clip"])
def test_sliced_model_exports(name, tmp_path):
    import onnxruntime as ort

    model, x = _sliced(name)
    model = _FirstOutput(model).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (), str(path), kwargs=x, dynamo=True, external_data=False,
                      verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    got = sess.run(None, feed)
    with torch.no_grad():
        want = model(**x).numpy()
    a = np.asarray(got[0], dtype=np.float64)
    assert a.shape == want.shape
    assert np.linalg.norm(a - want) / np.linalg.norm(want) < 1e-4
