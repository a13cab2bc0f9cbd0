"""Tiny random causal LMs built from a config, shared by the quantize and export tests."""

import torch


def tiny_llama(vocab: int, hidden: int = 64, layers: int = 2, positions: int = 64, **config):
    """A seeded random ``LlamaForCausalLM``: 4 heads, 2 kv heads, MLP width ``2 * hidden``.

    ``config``: further ``LlamaConfig`` fields (``pad_token_id``, ``eos_token_id``, ...).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=positions, **config)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab: int, hidden: int = 64, layers: int = 2, positions: int = 64, **config):
    """A seeded random ``GPT2LMHeadModel`` with 4 heads; ``config``: further GPT2Config fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                     n_positions=positions, **config)
    return GPT2LMHeadModel(cfg).eval()
