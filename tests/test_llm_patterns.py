"""LLM pattern passes on real transformers models: exact match counts and eager parity."""

from __future__ import annotations

import pytest
import torch
from llm_models import VOCAB, build

from yirage_dynamo import clear_reports, reports

pytest.importorskip("transformers")

PATTERN_KEYS = (
    "rms_norm",
    "rms_norm.residual_fused",
    "gated_act",
    "rotary",
    "attention",
    "horizontal_gemm",
    "horizontal_gemm.qkv",
    "horizontal_gemm.gate_up",
    "horizontal_gemm.other",
    "lora_linear",
)
# bf16 logits: eager rounds Q@K^T and the probabilities to bf16, the fused attention keeps
# them in fp32, and a GEMM over concatenated weights may block its reduction differently;
# with O(1) logits that is a few bf16 ulps (2^-8 = 3.9e-3 each). Measured max: 4.4e-3.
BF16 = dict(atol=2e-2, rtol=2e-2)


def _options() -> dict:
    # The default pipeline: later passes (region fusion, memory planning) see the rewrites.
    # One graph, so that one report holds every layer's matches (regional compilation's
    # pieces are checked in test_regional.py).
    return {"fallback": "error", "verify": True, "regional": False}


def _decoder(layers: int, qkv: bool = True, gate_up: bool = True) -> dict[str, int]:
    counts = {
        "rms_norm": 2 * layers + 1,  # input + post-attention norm per layer, final norm
        "rms_norm.residual_fused": 2 * layers - 1,  # all but the first layer's input norm
        "gated_act": layers,
        "rotary": layers,
        "attention": layers,
    }
    if qkv or gate_up:
        counts["horizontal_gemm"] = layers * (qkv + gate_up)
    if qkv:
        counts["horizontal_gemm.qkv"] = layers
    if gate_up:
        counts["horizontal_gemm.gate_up"] = layers
    return counts


# Phi-3 ships fused qkv_proj / gate_up_proj weights: nothing left to fuse horizontally.
# GPT-2: LayerNorm + GELU (not gated) + Conv1D c_attn (already one GEMM): attention only.
EXPECTED = {
    "llama": _decoder(4),
    "qwen2": _decoder(2),
    "mistral": _decoder(2),
    "phi3": _decoder(2, qkv=False, gate_up=False),
    "gemma": _decoder(2),
    "gpt2": {"attention": 2},
    "bert": {"attention": 2, "horizontal_gemm": 2, "horizontal_gemm.qkv": 2},
}
LAYERS = {"llama": 4}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    clear_reports()
    yield
    torch._dynamo.reset()


def _counts(report) -> dict[str, int]:
    return {k: v for k, v in report.patterns.items() if k in PATTERN_KEYS}


def _ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _run(model, ids, **compile_kw):
    kw = {} if model.config.model_type == "bert" else {"use_cache": False}
    compiled = torch.compile(model, backend="yirage", options=_options(), **compile_kw)
    with torch.no_grad():
        return compiled(ids, **kw).logits, model(ids, **kw).logits


@pytest.mark.parametrize("name", list(EXPECTED))
def test_prefill_fp32_sdpa_exact_counts_and_logits(name):
    model = build(name, "sdpa", layers=LAYERS.get(name, 2))
    out, ref = _run(model, _ids())
    (report,) = reports()
    assert _counts(report) == EXPECTED[name], report.rejected
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert not report.fallbacks


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_prefill_bf16_eager_attention_counts_and_logits(name):
    model = build(name, "eager", dtype=torch.bfloat16)
    out, ref = _run(model, _ids())
    (report,) = reports()
    expected = EXPECTED[name] if name != "llama" else _decoder(2)
    assert _counts(report) == expected, report.rejected
    torch.testing.assert_close(out.float(), ref.float(), **BF16)


def _generate(model, compiled: bool, **kw):
    if compiled:
        model.forward = torch.compile(model.forward, backend="yirage", options=_options(), **kw)
    with torch.no_grad():
        return model.generate(
            _ids(1, 6),
            max_new_tokens=3,
            do_sample=False,
            cache_implementation="static",
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )


@pytest.mark.parametrize("name,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_static_cache_generate_prefill_and_decode(name, attn):
    model = build(name, attn)
    ref = _generate(model, compiled=False)
    out = _generate(model, compiled=True)
    graphs = [r for r in reports() if r.kind == "inference"]
    assert len(graphs) == 2  # prefill (6 tokens) and decode (1 token)
    for report in graphs:
        assert _counts(report) == _decoder(2), report.rejected
        # index_copy_ into the cache stays in place; attention reads the cache directly.
        assert "reinplace_input_mutations" in [p.name for p in report.passes]
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dynamic_sequence_length_one_graph_all_patterns():
    model = build("mistral", "sdpa")
    compiled = torch.compile(model, backend="yirage", options=_options())
    with torch.no_grad():
        for seq in (5, 9, 12):
            ids = _ids(2, seq)
            torch._dynamo.mark_dynamic(ids, 1)
            out = compiled(ids, use_cache=False).logits
            torch.testing.assert_close(
                out, model(ids, use_cache=False).logits, atol=1e-4, rtol=1e-4
            )
    (report,) = reports()
    assert _counts(report) == _decoder(2)


def test_unspecialized_float_eps_is_rejected_with_reason_and_stays_correct():
    # dynamic=True makes Dynamo pass float module attributes (eps, attention scaling) as
    # runtime tensors: the rewrite would bake in a value, so the sites are rejected.
    model = build("llama", "sdpa")
    out, ref = _run(model, _ids(), dynamic=True)
    (report,) = reports()
    assert any(r.startswith("rms_norm:") and "eps not constant" in r for r in report.rejected)
    assert "rms_norm" not in report.patterns
    assert report.patterns.get("rotary") == 2
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_report_notes_reference_implementations_for_ops_without_native_kernels():
    from yirage_dynamo.lowering import choose_lowering

    model = build("qwen2", "sdpa")
    _run(model, _ids())
    (report,) = reports()
    native = choose_lowering(report.device)[0].capabilities.native_custom_ops
    notes = "\n".join(report.notes)
    for op in ("rms_norm", "rms_norm_residual", "gated_act", "rotary", "attention"):
        has_note = f"yirage::{op} runs its ATen reference implementation" in notes
        assert has_note == (op not in native), (op, notes)
    text = str(report)
    assert "patterns: " in text and "rotary=2" in text


def test_training_graph_keeps_projections_unfused_and_grads_match():
    model = build("llama", "sdpa").train()
    ids = _ids()
    compiled = torch.compile(model, backend="yirage", options=_options())
    loss = compiled(ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids, labels=ids, use_cache=False).loss.backward()
    forward = [r for r in reports() if r.kind == "forward"]
    assert forward and all("horizontal_gemm" not in r.patterns for r in forward)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


class _DecomposedMLP(torch.nn.Module):
    """SwiGLU as core-ATen decompositions emit it: silu(g) spelled g * sigmoid(g)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(16, 32, bias=False)
        self.up = torch.nn.Linear(16, 32, bias=False)

    def forward(self, x):
        g = self.gate(x)
        return torch.sigmoid(g) * g * self.up(x)


def test_decomposed_silu_gate_matches_and_fuses_gate_up():
    torch.manual_seed(0)
    mlp = _DecomposedMLP().eval()
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(mlp, backend="yirage", options=_options())
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, mlp(x), atol=1e-5, rtol=1e-5)
    (report,) = reports()
    assert report.patterns.get("gated_act") == 1
    assert report.patterns.get("horizontal_gemm.gate_up") == 1


class _LoraLinear(torch.nn.Module):
    """PEFT lora.Linear in eval: base(x) + lora_B(lora_A(x)) * scaling."""

    def __init__(self, k: int, n: int, r: int, bias: bool) -> None:
        super().__init__()
        self.base = torch.nn.Linear(k, n, bias=bias)
        self.lora_a = torch.nn.Linear(k, r, bias=False)
        self.lora_b = torch.nn.Linear(r, n, bias=False)
        self.scaling = 2.0

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scaling


class _LoraAttentionProj(torch.nn.Module):
    """q/v with LoRA adapters next to a plain k projection (PEFT's default targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = _LoraLinear(32, 32, 4, bias=True)
        self.k = torch.nn.Linear(32, 32)
        self.v = _LoraLinear(32, 16, 4, bias=False)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_rewrite_matches_eager(dtype):
    torch.manual_seed(0)
    mod = _LoraAttentionProj().eval().to(dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    compiled = torch.compile(mod, backend="yirage", options=_options())
    with torch.no_grad():
        outs, refs = compiled(x), mod(x)
    (report,) = reports()
    assert report.patterns.get("lora_linear") == 2
    # The adapters' GEMMs are not concatenated into a horizontal group with k.
    assert "horizontal_gemm" not in report.patterns
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else BF16
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, **tol)


class _DecomposedRMSNorm(torch.nn.Module):
    """RMSNorm as a full core-ATen decomposition spells it: x*x, sum / H, rsqrt."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(hidden))
        self.hidden = hidden

    def forward(self, x):
        xf = x.float()
        var = (xf * xf).sum(-1, keepdim=True) / self.hidden
        return self.weight * (xf * torch.rsqrt(var + 1e-5)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decomposed_rms_norm_matches(dtype):
    torch.manual_seed(0)
    norm = _DecomposedRMSNorm().eval().to(dtype)
    x = torch.randn(2, 3, 24, dtype=dtype).transpose(0, 1)  # strided input
    compiled = torch.compile(norm, backend="yirage", options=_options())
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, norm(x), atol=1e-5, rtol=1e-5)
    (report,) = reports()
    assert report.patterns.get("rms_norm") == 1


class _LowPrecisionRMSNorm(torch.nn.Module):
    """An RMSNorm that never upcasts: the fp32 op would change its numerics."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(24))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def test_rms_norm_in_reduced_precision_is_rejected_with_reason():
    norm = _LowPrecisionRMSNorm().eval().to(torch.bfloat16)
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    compiled = torch.compile(norm, backend="yirage", options=_options())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), norm(x), **BF16)
    (report,) = reports()
    assert "rms_norm" not in report.patterns
    assert any("computed in torch.bfloat16, not fp32" in r for r in report.rejected)
    assert "rejected rms_norm:" in str(report)


@pytest.fixture
def inductor_decompositions(monkeypatch):
    """Make the CPU lowering ask AOTAutograd for Inductor's decomposition table, as the
    CUDA lowering does (t -> permute, silu -> x / (1 + exp(-x)), softmax decomposed)."""
    from torch._inductor.decomposition import select_decomp_table
    from yirage_dynamo.lowering import choose_lowering

    lowering = choose_lowering("cpu")[0]
    monkeypatch.setattr(type(lowering), "decompositions", lambda self: select_decomp_table())


@pytest.mark.parametrize(
    "name,attn,dtype",
    [
        ("llama", "eager", torch.float32),
        ("qwen2", "sdpa", torch.bfloat16),
        ("gemma", "sdpa", torch.float32),
    ],
)
def test_patterns_match_inductor_decomposed_graphs(inductor_decompositions, name, attn, dtype):
    model = build(name, attn, dtype=dtype)
    out, ref = _run(model, _ids())
    (report,) = reports()
    assert _counts(report) == _decoder(2), report.rejected
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else BF16
    torch.testing.assert_close(out, ref, **tol)


def _sdpa_bool_mask_inputs(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g, dtype=dtype) for _ in range(3))
    keep = torch.rand(2, 1, 5, 5, generator=g) > 0.4
    keep[..., 0] = True  # every query row sees at least one key
    return q, k, v, keep


class _SdpaBoolMask(torch.nn.Module):
    def forward(self, q, k, v, keep):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_bool_mask_is_read_as_bool_without_a_conversion_kernel(dtype):
    # AOTAutograd lowers SDPA's bool mask to where(keep, 0, -inf): the attention op reads
    # `keep` instead, and the conversion leaves the program.
    inputs = _sdpa_bool_mask_inputs(dtype)
    compiled = torch.compile(_SdpaBoolMask(), backend="yirage", options=_options())
    with torch.no_grad():
        out, ref = compiled(*inputs), _SdpaBoolMask()(*inputs)
    (report,) = reports()
    assert report.patterns.get("attention") == 1
    assert report.patterns.get("attention_bool_mask") == 1, report.rejected
    origins = [o for kernel in report.kernels for o in kernel.origins]
    assert not [o for o in origins if "where" in o], origins
    tol = BF16 if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_additive_float_mask_with_small_values_is_kept():
    # A float mask the caller computed (-5 does not hide a key) is not a bool mask.
    q, k, v, keep = _sdpa_bool_mask_inputs()
    bias = torch.where(keep, 0.0, -5.0)
    compiled = torch.compile(_SdpaBoolMask(), backend="yirage", options=_options())
    with torch.no_grad():
        out, ref = compiled(q, k, v, bias), _SdpaBoolMask()(q, k, v, bias)
    (report,) = reports()
    assert report.patterns.get("attention") == 1
    assert "attention_bool_mask" not in report.patterns
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
