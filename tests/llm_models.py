"""Tiny Hugging Face models with random weights (no network) for the pattern tests."""

from __future__ import annotations

import torch

VOCAB = 128


def build(name: str, attn: str = "sdpa", layers: int = 2, dtype: torch.dtype = torch.float32):
    """A tiny `name` model in eval mode; random weights seeded for reproducibility."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, attn_implementation=attn)
    decoder = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        **common,
    )
    configs = {
        "llama": lambda: (tf.LlamaConfig(**decoder), tf.LlamaForCausalLM),
        "qwen2": lambda: (tf.Qwen2Config(**decoder), tf.Qwen2ForCausalLM),
        "mistral": lambda: (
            tf.MistralConfig(sliding_window=None, **decoder),
            tf.MistralForCausalLM,
        ),
        "phi3": lambda: (tf.Phi3Config(**decoder), tf.Phi3ForCausalLM),
        "gemma": lambda: (tf.GemmaConfig(head_dim=16, **decoder), tf.GemmaForCausalLM),
        "gpt2": lambda: (
            tf.GPT2Config(
                n_embd=64,
                n_head=4,
                n_positions=64,
                **{"vocab_size": VOCAB, "n_layer": layers, "attn_implementation": attn},
            ),
            tf.GPT2LMHeadModel,
        ),
        "bert": lambda: (
            tf.BertConfig(
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                max_position_embeddings=64,
                **common,
            ),
            tf.BertForMaskedLM,
        ),
    }
    config, cls = configs[name]()
    torch.manual_seed(0)
    model = cls(config).eval().to(dtype)
    # Random (not the default constant) norm weights, so a dropped weight cannot pass.
    with torch.no_grad():
        for mod_name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in mod_name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model
