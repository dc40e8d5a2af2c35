"""Hugging Face models: logits match eager; generate() with a static cache works."""

from __future__ import annotations

import pytest
import torch

import yirage_dynamo

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype=torch.float32):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_llama_logits_match_eager(dtype):
    model = tiny_llama(dtype)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend="yirage", options={"fallback": "error"})
        actual = compiled(ids).logits
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(actual, expected, **tol)
    assert not yirage_dynamo.last_report().fallbacks


def test_generate_with_static_cache_and_compile_config_matches_eager(monkeypatch):
    from transformers.generation import CompileConfig

    # torch.compile refuses mode= together with options=, and CompileConfig always passes
    # mode="reduce-overhead": environment overrides are how HF users set yirage options.
    monkeypatch.setenv("YIRAGE_FALLBACK", "error")
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        expected = model.generate(
            ids, max_new_tokens=6, do_sample=False, cache_implementation="static"
        )
        config = CompileConfig(backend="yirage")
        config._compile_all_devices = True  # HF compiles on CPU only when asked
        yirage_dynamo.clear_reports()
        actual = model.generate(
            ids,
            max_new_tokens=6,
            do_sample=False,
            cache_implementation="static",
            compile_config=config,
        )
    assert torch.equal(actual, expected)
    reports = yirage_dynamo.reports()
    assert reports, "generate() did not compile through yirage"
    assert all(r.mode == "reduce-overhead" for r in reports)
    reinplaced = sum(p.matches for r in reports for p in r.passes if p.name.startswith("reinplace"))
    # K and V cache writes per layer, in place: in a compiled program, or in a layer that
    # re-armed one (regional compilation: one decoder-layer program serves every layer).
    rearmed = sum(r.graph_cache.startswith("re-armed") for r in reports)
    assert reinplaced + 2 * rearmed >= 2 * model.config.num_hidden_layers


def test_horizontal_gemm_fusion_repacks_module_weights_without_copies():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    before = attn.q_proj.weight.detach().clone()
    ids = torch.randint(0, 256, (1, 5))
    yirage_dynamo.clear_reports()
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend="yirage", options={"fallback": "error"})
        torch.testing.assert_close(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)
        # q/k/v now live in one concatenated buffer; values unchanged, eager still right.
        q, k = attn.q_proj.weight, attn.k_proj.weight
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
        torch.testing.assert_close(attn.q_proj.weight, before, atol=0, rtol=0)
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
    # One match per layer, whether the graph compiled whole or by layers (a re-armed
    # layer's report carries its program's matches).
    qkv = sum(r.patterns.get("horizontal_gemm.qkv", 0) for r in yirage_dynamo.reports())
    assert qkv == model.config.num_hidden_layers
