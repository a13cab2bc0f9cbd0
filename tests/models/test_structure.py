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
