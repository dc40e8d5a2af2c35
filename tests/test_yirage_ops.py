"""Each yirage op against an independent formulation, across shapes, dtypes and layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import yirage_dynamo.ops  # noqa: F401 - registers torch.ops.yirage

yi = torch.ops.yirage
DTYPES = [torch.float32, torch.bfloat16]
# bf16 keeps 8 mantissa bits: one rounding of an O(1) value is ~4e-3 relative.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
OPCHECK = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _hf_rms_norm(x, w, eps):
    """transformers LlamaRMSNorm.forward, verbatim."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_rms_norm_matches_hf_llama_formula(dtype, contiguous):
    torch.manual_seed(0)
    x = torch.randn(3, 64, 7, dtype=dtype).transpose(1, 2)  # [3, 7, 64], strided
    if contiguous:
        x = x.contiguous()
    w = torch.randn(64, dtype=dtype)
    out = yi.rms_norm(x, w, 1e-6, False)
    torch.testing.assert_close(out, _hf_rms_norm(x, w, 1e-6), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_gemma_weight_in_fp32(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 32, dtype=dtype), torch.randn(32, dtype=dtype)
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)) * (1.0 + w.float())
    out = yi.rms_norm(x, (1.0 + w.float()), 1e-5, True)
    torch.testing.assert_close(out, ref.to(dtype), atol=0, rtol=0)
    assert out.dtype == dtype


def test_rms_norm_without_weight_and_residual_variant():
    torch.manual_seed(0)
    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    xf = x.float()
    torch.testing.assert_close(
        yi.rms_norm(x, None, 1e-6, False),
        xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6),
    )
    out, new_res = yi.rms_norm_residual(x, r, w, 1e-6, False)
    torch.testing.assert_close(new_res, r + x, atol=0, rtol=0)
    torch.testing.assert_close(out, _hf_rms_norm(r + x, w, 1e-6), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "act,fn",
    [
        ("silu", lambda g: g * torch.sigmoid(g)),
        ("gelu_tanh", lambda g: F.gelu(g, approximate="tanh")),
        ("gelu", lambda g: 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))),
    ],
)
def test_gated_act_matches_formula(dtype, act, fn):
    torch.manual_seed(0)
    gate = torch.randn(2, 6, 40, dtype=dtype)
    up = torch.randn(2, 40, 6, dtype=dtype).transpose(1, 2)  # a strided operand
    ref = (fn(gate.float()) * up.float()).to(dtype)
    torch.testing.assert_close(yi.gated_act(gate, up, act), ref, **TOL[dtype])


def test_gated_act_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        yi.gated_act(torch.ones(2), torch.ones(2), "relu")


def _hf_rotary(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _cos_sin(b, s, d, dtype, interleaved=False):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.arange(s).float()[None, :, None] + torch.arange(b).float()[:, None, None]
    freqs = pos * inv  # [B, S, D/2]
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_rotate_half_matches_hf(dtype, head_dim):
    torch.manual_seed(0)
    q = torch.randn(2, 5, 8, head_dim, dtype=dtype).transpose(1, 2)  # HF layout: strided
    k = torch.randn(2, 5, 2, head_dim, dtype=dtype).transpose(1, 2)
    cos, sin = _cos_sin(2, 5, head_dim, dtype)
    rq, rk = _hf_rotary(q, k, cos, sin)
    oq, ok = yi.rotary(q, k, cos.unsqueeze(1), sin.unsqueeze(1), False)
    torch.testing.assert_close(oq, rq, atol=0, rtol=0)
    torch.testing.assert_close(ok, rk, atol=0, rtol=0)


def test_rotary_interleaved_matches_complex_rotation():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 64), torch.randn(2, 2, 5, 64)
    cos, sin = _cos_sin(2, 5, 64, torch.float32, interleaved=True)
    angle = torch.polar(torch.ones_like(cos[..., ::2]), torch.atan2(sin[..., ::2], cos[..., ::2]))

    def rot(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * angle.unsqueeze(1)).flatten(-2)

    oq, ok = yi.rotary(q, k, cos.unsqueeze(1), sin.unsqueeze(1), True)
    torch.testing.assert_close(oq, rot(q), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok, rot(k), atol=1e-5, rtol=1e-5)


def test_rotary_partial_rotation_passes_the_rest_through():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 3, 32), torch.randn(1, 2, 3, 32)
    cos, sin = _cos_sin(1, 3, 16, torch.float32)
    oq, ok = yi.rotary(q, k, cos.unsqueeze(1), sin.unsqueeze(1), False)
    rq, rk = _hf_rotary(q[..., :16], k[..., :16], cos, sin)
    torch.testing.assert_close(oq, torch.cat((rq, q[..., 16:]), -1))
    torch.testing.assert_close(ok, torch.cat((rk, k[..., 16:]), -1))


def _attention_ref(q, k, v, mask, scale):
    """Plain math with repeat_kv materialised, in fp32."""
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, 1)
    v = v.float().repeat_interleave(groups, 1)
    s = q.float() @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    return (s.softmax(-1) @ v).to(q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "float", "cache_position"])
def test_attention_gqa_matches_repeat_kv_reference(dtype, heads, head_dim, mask_kind):
    torch.manual_seed(0)
    hq, hkv = heads
    b, s, t = 2, 5, 9
    q = torch.randn(b, s, hq, head_dim, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, hkv, t, head_dim, dtype=dtype)
    v = torch.randn(b, hkv, t, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    kv_idx = torch.arange(t)
    kwargs = {}
    if mask_kind == "causal":  # top-left aligned, as SDPA's is_causal
        visible = kv_idx[None, :] <= torch.arange(s)[:, None]
        kwargs["is_causal"] = True
    elif mask_kind == "cache_position":  # a static cache of length t, valid up to pos
        pos = torch.arange(2, 2 + s)
        visible = kv_idx[None, :] <= pos[:, None]
        kwargs["cache_position"] = pos
    else:
        visible = torch.rand(b, 1, s, t) > 0.3
        visible[..., 0] = True
        if mask_kind == "bool":
            kwargs["attn_mask"] = visible
        else:
            kwargs["attn_mask"] = torch.zeros(b, 1, s, t, dtype=dtype).masked_fill(
                ~visible, float("-inf")
            )
    out = yi.attention(q, k, v, scale=scale, **kwargs)
    ref = _attention_ref(q, k, v, visible.expand(b, 1, s, t), scale)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    # HF reads the output as transpose(1, 2).view(B, S, -1): it must stay a view.
    assert out.transpose(1, 2).is_contiguous()


def test_attention_per_head_mask_and_decode_step():
    torch.manual_seed(0)
    q = torch.randn(1, 8, 1, 64)
    k, v = torch.randn(1, 2, 12, 64), torch.randn(1, 2, 12, 64)
    mask = torch.rand(1, 8, 1, 12) > 0.5
    mask[..., 0] = True
    out = yi.attention(q, k, v, mask)
    torch.testing.assert_close(out, _attention_ref(q, k, v, mask, 64**-0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_formula(dtype, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 32, dtype=dtype)
    w, a, bb = (
        torch.randn(48, 32, dtype=dtype),
        torch.randn(8, 32, dtype=dtype),
        torch.randn(48, 8, dtype=dtype),
    )
    b = torch.randn(48, dtype=dtype) if bias else None
    ref = x.float() @ w.float().T + (b.float() if bias else 0)
    ref = ref + 0.5 * (x.float() @ a.float().T) @ bb.float().T
    out = yi.lora_linear(x, w, b, a, bb, 0.5)
    torch.testing.assert_close(
        out, ref.to(dtype), atol=0.1 if dtype == torch.bfloat16 else 1e-4, rtol=2e-2
    )


def _opcheck_cases():
    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 1, 3, 16), torch.randn(2, 1, 3, 16)
    x, w = torch.randn(2, 3, 16), torch.randn(16)
    return [
        (yi.rms_norm.default, (x, w, 1e-6, False)),
        (yi.rms_norm_residual.default, (x, x.clone(), w, 1e-6, True)),
        (yi.gated_act.default, (x, x.clone(), "gelu_tanh")),
        (yi.rotary.default, (q, torch.randn(2, 2, 3, 16), cos, sin, False)),
        (yi.attention.default, (q, k, v, None, None, True, None)),
        (yi.attention.default, (q, k, v, None, 0.3, False, torch.arange(2, 5))),
        (
            yi.lora_linear.default,
            (x, torch.randn(8, 16), None, torch.randn(4, 16), torch.randn(8, 4), 2.0),
        ),
    ]


@pytest.mark.parametrize("case", range(7))
def test_fake_impl_agrees_with_reference_under_dynamic_shapes(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK)
