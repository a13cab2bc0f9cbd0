"""Slicing checks on a model that samples in forward (random patch dropout via torch.randperm):
both runs of the check draw the same numbers, so the sliced model is judged like with like."""

import torch
from torch import nn

from slimformer.models.structure import discover
from slimformer.prune.slicing import SliceSpec, compare, masked_reference, slice_model, sliceable


class PatchDropout(nn.Module):
    """Keeps a random half of the tokens in every forward (eval mode too), then a pre-norm MLP
    block with multi-head self-attention; returns the pooled tokens and the kept tokens."""

    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        keep = torch.randperm(x.shape[1])[: x.shape[1] // 2]  # random patches
        h = x[:, keep]
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(torch.relu(self.fc1(self.norm2(h))))
        return {"pooled": h.mean(1), "tokens": h}


def test_sliced_stochastic_model_passes_its_check():
    torch.manual_seed(0)
    model = PatchDropout().eval()
    x = {"x": torch.randn(2, 12, 16)}
    with torch.no_grad():
        assert not torch.equal(model(**x)["tokens"], model(**x)["tokens"])  # it does sample
    s = discover(model, x)
    assert len(s.mlps) == 1
    found = sliceable(model, s, x, kinds=("heads", "mlp"))
    assert found["heads"] == {} and found["mlp"] == {}
    spec = SliceSpec({0: (1,)}, {0: tuple(range(0, 32, 2))})
    state = torch.random.get_rng_state()
    sliced = slice_model(model, s, spec, check_inputs=x)  # the check runs inside
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG did not move
    assert sliced.fc1.out_features == 16 and sliced.attn.num_heads == 1
    assert compare(sliced, masked_reference(model, s, spec), x) is None
    # a real difference is still found
    with torch.no_grad():
        sliced.fc2.bias.add_(0.1)
    assert "output pooled differs" in compare(sliced, masked_reference(model, s, spec), x)
