"""Structure discovery on the generality set and the zoo: exact counts and pairings."""

import pytest
import torch

from slimformer.errors import UnsupportedModelError
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover

# name -> (norm sites, norm->linear pairs, foldable norms, attention sites, MLPs, heads, head_dim)
EXPECTED = {
    "bert": (5, 9, 1, 2, 2, 4, 16),
    "bert-eager": (5, 9, 0, 2, 2, 4, 16),  # base model: the last norm is also its output
    "vit": (5, 9, 4, 2, 2, 4, 16),
    "gpt2": (4, 4, 4, 2, 2, 4, 16),
    "t5": (11, 22, 10, 6, 4, 4, 16),  # encoder.final_layer_norm is also an output
    "t5-eager": (11, 22, 10, 6, 4, 4, 16),
    "torch-encoder": (4, 4, 4, 2, 2, 4, 16),
    "torch-encoder-postnorm": (3, 3, 0, 2, 2, 4, 16),
    "timm-vit": (5, 5, 5, 2, 2, 3, 64),
    "llama": (4, 10, 4, 2, 2, 4, 16),
}


def _discover(name):
    lm = load_model(GENERALITY[name])
    return discover(lm.module, lm.example_inputs(2))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts(name):
    s = _discover(name)
    norms, pairs, foldable, attn, mlps, heads, head_dim = EXPECTED[name]
    assert len(s.norms) == norms
    assert s.norm_linear_pairs == pairs
    assert sum(n.foldable for n in s.norms) == foldable
    assert len(s.attention) == attn
    assert len(s.mlps) == mlps
    assert {a.heads for a in s.attention} == {heads}
    assert {a.head_dim for a in s.attention} == {head_dim}


def test_bert_pairings_and_post_norm_consumers():
    s = _discover("bert")
    pre = "bert.encoder.layer.0."
    emb = next(n for n in s.norms if n.module == "bert.embeddings.LayerNorm")
    assert emb.linears == tuple(f"{pre}attention.self.{p}.weight" for p in ("query", "key", "value"))
    assert emb.other_consumers == ("add",) and not emb.foldable  # post-norm: feeds the residual
    a0 = s.attention[0]
    assert a0.kind == "sdpa" and not a0.fused_qkv and not a0.cross
    assert (a0.q, a0.k, a0.v) == ((f"{pre}attention.self.query.weight",),
                                  (f"{pre}attention.self.key.weight",),
                                  (f"{pre}attention.self.value.weight",))
    assert a0.out == (f"{pre}attention.output.dense.weight",)
    m0 = s.mlps[0]
    assert m0.fc1 == (f"{pre}intermediate.dense.weight",)
    assert m0.fc2 == f"{pre}output.dense.weight" and m0.hidden == 128
    # the pooler (dense -> tanh -> classifier) is not an MLP of the residual stream
    assert all("pooler" not in m.fc2 and "classifier" not in m.fc2 for m in s.mlps)


def test_eager_bert_finds_explicit_softmax_with_same_pairings():
    sdpa, eager = _discover("bert"), _discover("bert-eager")
    assert {a.kind for a in eager.attention} == {"softmax"}
    strip = lambda ws: tuple(w.removeprefix("bert.") for w in ws)  # noqa: E731
    assert [strip(a.q + a.k + a.v + a.out) for a in sdpa.attention] == \
        [a.q + a.k + a.v + a.out for a in eager.attention]


def test_gpt2_fused_qkv_through_conv1d_addmm():
    s = _discover("gpt2")
    a = s.attention[0]
    assert a.fused_qkv and a.q == a.k == a.v == ("h.0.attn.c_attn.weight",)
    assert a.out == ("h.0.attn.c_proj.weight",)
    lin = {r.weight: r for r in s.linears}
    assert lin["h.0.attn.c_attn.weight"].op == "addmm"
    assert (lin["h.0.attn.c_attn.weight"].in_features,
            lin["h.0.attn.c_attn.weight"].out_features) == (64, 192)
    assert s.mlps[0].fc1 == ("h.0.mlp.c_fc.weight",) and s.mlps[0].hidden == 256


def test_clip_both_towers():
    s = _discover("clip")
    text = [a for a in s.attention if a.module.startswith("text_model")]
    vision = [a for a in s.attention if a.module.startswith("vision_model")]
    assert len(text) == 2 and len(vision) == 3
    assert {a.heads for a in text} == {4} and {a.heads for a in vision} == {2}
    assert {a.head_dim for a in vision} == {24}
    assert len(s.mlps) == 5 and len(s.norms) == 12
    finals = {n.module: n.linears for n in s.norms}
    assert finals["text_model.final_layer_norm"] == ("text_projection.weight",)
    assert finals["vision_model.post_layernorm"] == ("visual_projection.weight",)


@pytest.mark.parametrize("name", ["t5", "t5-eager"])
def test_t5_rmsnorm_and_cross_attention(name):
    s = _discover(name)
    assert {n.kind for n in s.norms} == {"rmsnorm"}
    cross = [a for a in s.attention if a.cross]
    assert len(cross) == 2
    enc_final = next(n for n in s.norms if n.module == "encoder.final_layer_norm")
    assert enc_final.other_consumers == ("model output",) and not enc_final.foldable
    assert enc_final.linears == tuple(
        f"decoder.block.{i}.layer.1.EncDecAttention.{p}.weight" for i in (0, 1) for p in "kv")
    assert {m.activation for m in s.mlps} == {("relu",)}


def test_torch_encoder_multihead_attention():
    s = _discover("torch-encoder")
    a = s.attention[0]
    assert a.kind == "mha" and a.fused_qkv
    assert a.q == ("encoder.layers.0.self_attn.in_proj_weight",)
    assert a.out == ("encoder.layers.0.self_attn.out_proj.weight",)
    assert s.norms[0].linears == ("encoder.layers.0.self_attn.in_proj_weight",)


def test_post_norm_encoder_norms_also_feed_residual():
    s = _discover("torch-encoder-postnorm")
    assert all(n.other_consumers == ("add",) and not n.foldable for n in s.norms)


def test_llama_gated_mlp_and_grouped_query_attention():
    s = _discover("llama")
    m = s.mlps[0]
    assert m.gated and m.fc1 == ("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight")
    assert m.fc2 == "layers.0.mlp.down_proj.weight" and m.activation == ("silu",)
    a = s.attention[0]
    assert (a.k, a.v) == (("layers.0.self_attn.k_proj.weight",), ("layers.0.self_attn.v_proj.weight",))
    assert {n.kind for n in s.norms} == {"rmsnorm"}


def test_timm_vit():
    s = _discover("timm-vit")
    a = s.attention[0]
    assert a.kind == "sdpa" and a.q == ("blocks.0.attn.qkv.weight",) and a.fused_qkv
    assert a.out == ("blocks.0.attn.proj.weight",)
    assert s.norms[-1].module == "norm" and s.norms[-1].linears == ("head.weight",)


def test_zoo_vit_fmnist():
    lm = load_model(ZooSpec(name="vit-fmnist"))
    s = discover(lm.module, lm.example_inputs(2))
    assert (len(s.norms), len(s.attention), len(s.mlps)) == (13, 6, 6)
    assert all(n.foldable for n in s.norms)
    a = s.attention[0]
    assert (a.kind, a.heads, a.head_dim, a.fused_qkv) == ("softmax", 4, 32, True)
    assert a.q == ("blocks.0.attn.qkv.weight",) and a.out == ("blocks.0.attn.proj.weight",)
    assert s.convs == ["patch"]
    # MACs of one 28x28 image: patch conv + 6 blocks + head, counted by torch's FlopCounterMode
    assert 15e6 < s.macs < 20e6


class _NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def test_model_without_attention_is_unsupported_with_what_was_found():
    with pytest.raises(UnsupportedModelError) as e:
        discover(_NoAttention(), {"x": torch.randn(2, 4, 16)})
    msg = str(e.value)
    assert "no attention found" in msg and "2 Linear(s)" in msg and "1 norm(s)" in msg
    s = discover(_NoAttention(), {"x": torch.randn(2, 4, 16)}, require_attention=False)
    assert len(s.mlps) == 1 and s.norms[0].linears == ("fc1.weight",)


def _zero_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


@pytest.mark.parametrize("grid", [(8, 8), (6, 7)])  # zero-size pad, and a real pad
def test_norm_feeds_qkv_through_pad_roll_and_window_partition(grid):
    from slimformer.models.generic import tile_mixer

    s = discover(tile_mixer(), {"grid": torch.randn(2, *grid, 8)})
    feeds = {n.module: n.linears for n in s.norms}
    for i in (0, 1):  # block 1 also rolls the grid (shifted windows)
        assert feeds[f"groom.{i}"] == tuple(f"sift.{i}.{p}.weight" for p in ("ask", "offer", "carry"))
        assert feeds[f"sheen.{i}"] == (f"churn.{i}.widen.weight",)
    assert (len(s.attention), len(s.mlps), s.norm_linear_pairs) == (2, 2, 8)
    assert {a.q for a in s.attention} == {("sift.0.ask.weight",), ("sift.1.ask.weight",)}


@pytest.mark.parametrize("scale", [1.0, 1e-23, 1e6])
def test_norm_test_is_scale_invariant(scale):
    """Conv + BatchNorm stem without biases: the whole model's activations follow the input scale.

    At 1e-23 a tolerance relative to a fixed floor accepted the GELU module (and any module) as a
    norm, which hid the MLPs.
    """
    from slimformer.models.generic import stem_former

    torch.manual_seed(0)
    model = _zero_biases(stem_former())
    s = discover(model, {"image": torch.randn(2, 3, 16, 16) * scale})
    assert [n.module for n in s.norms] == [f"trunk.{i}.{p}" for i in (0, 1)
                                           for p in ("polish", "tidy")]
    assert {n.kind for n in s.norms} == {"layernorm"}
    assert len(s.mlps) == 2 and {m.activation for m in s.mlps} == {("gelu",)}
    assert len(s.attention) == 2 and s.convs == ["sprout.0", "sprout.3"]


def test_activation_and_attention_modules_are_not_norms():
    from slimformer.models.generic import _Attend, _Feed
    from slimformer.models.structure import _norm_kind
    from slimformer.models.trace import ModuleCall

    x = torch.randn(2, 5, 16) * 1e-23
    for mod in (torch.nn.GELU(), torch.nn.Tanh(), torch.nn.Identity(), _Attend(16, 2),
                _Feed(16, 32), torch.nn.Softmax(-1)):
        with torch.no_grad():
            y = mod(x) if not isinstance(mod, torch.nn.Identity) else x.clone()
        assert _norm_kind(ModuleCall("m", mod, 0, 1, x, y), {}) is None, type(mod).__name__
    for mod, kind in ((torch.nn.LayerNorm(16), "layernorm"), (torch.nn.RMSNorm(16), "rmsnorm"),
                      (torch.nn.LayerNorm(16, elementwise_affine=False), "layernorm")):
        for scale in (1e-23, 1.0, 1e6):
            with torch.no_grad():
                y = mod(x / 1e-23 * scale)
            assert _norm_kind(ModuleCall("m", mod, 0, 1, x / 1e-23 * scale, y), {}) == kind


def test_shared_layer_across_depth_counts_executions():
    from slimformer.models.generic import looped_core

    s = discover(looped_core(depth=3), {"tokens": torch.randn(2, 5, 32)})
    assert [n.module for n in s.norms] == ["cell.polish", "cell.tidy"]  # one site per module
    assert (len(s.attention), len(s.mlps)) == (1, 1)
    assert {r.weight: r.calls for r in s.linears} == {
        f"cell.{m}.weight": 3 for m in ("attend.ask", "attend.offer", "attend.carry",
                                         "attend.merge", "feed.widen", "feed.narrow")}
    assert s.executions["cell.tidy"] == 3 and s.executions["coda"] == 1
    assert set(s.shared) == {"cell.tidy", "cell.polish", "cell.attend.ask", "cell.attend.offer",
                             "cell.attend.carry", "cell.attend.merge", "cell.feed.widen",
                             "cell.feed.narrow"}


def test_two_towers_sharing_a_module():
    from slimformer.models.generic import twin_towers

    s = discover(twin_towers(), {"left": torch.randn(2, 5, 12), "right": torch.randn(2, 4, 20)})
    calls = {r.weight: r.calls for r in s.linears}
    assert calls["port.weight"] == calls["starboard.weight"] == 1
    assert calls["keel.attend.ask.weight"] == 2 and calls["keel.feed.narrow.weight"] == 2
    assert s.shared["mast"] == 2 and "port" not in s.shared
    tidy = next(n for n in s.norms if n.module == "keel.tidy")
    assert tidy.linears == tuple(f"keel.attend.{p}.weight" for p in ("ask", "offer", "carry"))


def test_registered_twice_keeps_first_name():
    """A block listed twice in a ModuleList: names are the first ones, as named_parameters()."""
    from slimformer.models.generic import _Stage

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            blk = _Stage(16, 2, 32)
            self.steps = torch.nn.ModuleList([blk, blk])

        def forward(self, x):
            for b in self.steps:
                x = b(x)
            return x

    model = Twice()
    s = discover(model, {"x": torch.randn(2, 3, 16)})
    params = dict(model.named_parameters())
    assert all(r.weight in params and r.weight.startswith("steps.0.") for r in s.linears)
    assert {r.calls for r in s.linears} == {2}


def test_discovery_leaves_no_autograd_graph_in_module_caches():
    """Recording runs in grad mode: a tensor a module caches must not keep its graph."""
    import copy

    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _NoAttention()
            self.bias = torch.nn.Parameter(torch.zeros(16))
            self.cache = {}

        def forward(self, x):
            if "b" not in self.cache:
                self.cache["b"] = self.bias * 2  # computed once, kept (as some models do)
            return self.inner(x + self.cache["b"])

    model = Cached().eval()
    discover(model, {"x": torch.randn(2, 4, 16)}, require_attention=False)
    assert model.cache["b"].grad_fn is None
    copy.deepcopy(model)  # raised "Only Tensors created explicitly by the user ..." before
