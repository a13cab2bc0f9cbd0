"""The generality set: small random-weight models of many families, for tests (not accuracy).

BERT (sdpa and eager attention), ViT, CLIP, GPT-2, T5 (sdpa and eager), Llama (RMSNorm, rotary,
grouped-query attention, gated MLP), ``torch.nn.TransformerEncoder`` (pre- and post-norm) and a
timm ViT.

Each is a model spec; every stage must run on all of them without model-specific code.
"""

from __future__ import annotations

from slimformer.models import spec as S

_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=1000)

GENERALITY: dict[str, object] = {
    "bert": S.HfConfigSpec(model_type="bert", config=_TEXT, task="sequence-classification"),
    "bert-eager": S.HfConfigSpec(model_type="bert", config=_TEXT, attn_implementation="eager"),
    "vit": S.HfConfigSpec(model_type="vit", config=dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8)),
    "clip": S.HfConfigSpec(model_type="clip", config=dict(
        text_config=_TEXT | {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        vision_config=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=96, image_size=32, patch_size=8),
        projection_dim=32)),
    "gpt2": S.HfConfigSpec(model_type="gpt2", config=dict(
        n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0,
        eos_token_id=0)),
    "t5": S.HfConfigSpec(model_type="t5", config=dict(
        d_model=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16, d_ff=128,
        vocab_size=1000)),
    "t5-eager": S.HfConfigSpec(model_type="t5", attn_implementation="eager", config=dict(
        d_model=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16, d_ff=128,
        vocab_size=1000)),
    "llama": S.HfConfigSpec(model_type="llama", config=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64)),
    "torch-encoder": S.FactorySpec(factory="slimformer.models.generic:torch_encoder",
                                   inputs={"src": S.InputSpec(shape=[1, 8, 64])}),
    "torch-encoder-postnorm": S.FactorySpec(
        factory="slimformer.models.generic:torch_encoder", kwargs={"norm_first": False},
        inputs={"src": S.InputSpec(shape=[1, 8, 64])}),
    "timm-vit": S.TimmSpec(name="vit_tiny_patch16_224", kwargs=dict(
        img_size=32, patch_size=8, depth=2, num_classes=10)),
}


def fan_in_init(model, inputs: dict, seed: int = 0):
    """Re-initialize every Linear weight of ``model`` in place with std ``1 / sqrt(fan_in)``.

    With the default std-0.02 init of many families the residual branches are tiny and
    quantization error is invisible (W4A4 cosine reads 1.0000 whatever the quantizer does); with
    fan-in scaled weights every branch matters. Linears are found by structure discovery on
    ``inputs`` (so GPT-2's ``(in, out)`` Conv1D gets its true fan-in); packed attention
    projections (``nn.MultiheadAttention``) use their second axis. Returns ``model``.
    """
    import math

    import torch

    from slimformer.models.structure import discover

    smap = discover(model, inputs, require_attention=False)
    fan_in = {r.weight: r.in_features for r in smap.linears}
    for site in smap.attention:
        for w in (*site.q, *site.k, *site.v, *site.out):
            fan_in.setdefault(w, None)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(fan_in):
            p = params.get(name)
            if p is None or p.dim() != 2:
                continue
            n = fan_in[name] or p.shape[1]
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(n))
    return model
