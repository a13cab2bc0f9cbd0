"""The generality set: small random-weight models of many families, for tests (not accuracy).

BERT (sdpa and eager attention), ViT, CLIP, GPT-2, T5 (sdpa and eager), Llama (RMSNorm, rotary,
grouped-query attention, gated MLP), ``torch.nn.TransformerEncoder`` (pre- and post-norm) and a
timm ViT; ALBERT (one layer shared across depth), DistilBERT, DeBERTa-v2 (disentangled
relative attention), Qwen2 (rotary, grouped-query), Phi-3 (fused q/k/v and gate/up), BART,
Whisper and Speech2Text (audio encoder-decoders with a conv front-end), Swin (windowed,
hierarchical), MobileViT (conv + BatchNorm + attention), LeViT (BatchNorm after its Linears, no
LayerNorm), ViLT (single-stream vision-language, samples patches in ``forward``), SigLIP (two
towers, several outputs) and hand-written models with unusual names (:mod:`generic`): windowed
TileMixer, conv-stem StemFormer, depth-looped LoopedCore, TwinTowers sharing a block, BraidNet
with fused projections.

Each is a model spec; every stage must run on all of them without model-specific code.
"""

from __future__ import annotations

from slimformer.models import spec as S

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              vocab_size=500)
_SEQ2SEQ = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=500,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0)
_DEC_IDS = S.InputSpec(shape=[1, 8], dtype="int64", high=500)
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
    "albert": S.HfConfigSpec(model_type="albert", config=_SMALL | {"embedding_size": 16}),
    "distilbert": S.HfConfigSpec(model_type="distilbert", task="sequence-classification", config=dict(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=500)),
    "deberta-v2": S.HfConfigSpec(model_type="deberta-v2", config=_SMALL | dict(
        relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16)),
    "qwen2": S.HfConfigSpec(model_type="qwen2", task="causal-lm", config=_SMALL | dict(
        num_key_value_heads=2, max_position_embeddings=64)),
    "phi3": S.HfConfigSpec(model_type="phi3", config=_SMALL | dict(
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
    "bart": S.HfConfigSpec(model_type="bart", config=_SEQ2SEQ | {"max_position_embeddings": 64}),
    "whisper": S.HfConfigSpec(model_type="whisper", config=_SEQ2SEQ | dict(
        num_mel_bins=16, max_source_positions=16, max_target_positions=32), inputs={
        "input_features": S.InputSpec(shape=[1, 16, 32]), "decoder_input_ids": _DEC_IDS}),
    "speech2text": S.HfConfigSpec(model_type="speech_to_text", config=_SEQ2SEQ | dict(
        input_feat_per_channel=16, input_channels=1, conv_channels=32, max_source_positions=64,
        max_target_positions=32), inputs={
        "input_features": S.InputSpec(shape=[1, 32, 16]), "decoder_input_ids": _DEC_IDS}),
    "swin": S.HfConfigSpec(model_type="swin", config=dict(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 1], num_heads=[2, 4],
        window_size=4, mlp_ratio=2.0)),
    "mobilevit": S.HfConfigSpec(model_type="mobilevit", config=dict(
        image_size=32, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 96],
        num_attention_heads=2, patch_size=2,
        initializer_range=0.2)),  # at std 0.02 the output vanishes (1e-45) through its convs
    "levit": S.HfConfigSpec(model_type="levit", config=dict(
        image_size=32, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 2, 2],
        depths=[1, 1, 1], key_dim=[8, 8, 8],
        down_ops=[["Subsample", 8, 4, 4, 2, 2], ["Subsample", 8, 6, 4, 2, 2]])),
    "vilt": S.HfConfigSpec(model_type="vilt", config=_SMALL | dict(
        image_size=32, patch_size=8, max_image_length=8, modality_type_vocab_size=2,
        max_position_embeddings=40)),
    "siglip": S.HfConfigSpec(model_type="siglip", config=dict(
        text_config=_SMALL | dict(max_position_embeddings=16, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=8))),
    "tile-mixer": S.FactorySpec(factory="slimformer.models.generic:tile_mixer",
                                inputs={"grid": S.InputSpec(shape=[1, 8, 8, 8])}),
    "stem-former": S.FactorySpec(factory="slimformer.models.generic:stem_former",
                                 inputs={"image": S.InputSpec(shape=[1, 3, 16, 16])}),
    "looped-core": S.FactorySpec(factory="slimformer.models.generic:looped_core",
                                 inputs={"tokens": S.InputSpec(shape=[1, 8, 32])}),
    "twin-towers": S.FactorySpec(factory="slimformer.models.generic:twin_towers", inputs={
        "left": S.InputSpec(shape=[1, 6, 12]), "right": S.InputSpec(shape=[1, 6, 20])}),
    "braid-net": S.FactorySpec(factory="slimformer.models.generic:braid_net",
                               inputs={"strands": S.InputSpec(shape=[1, 8, 10])}),
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
