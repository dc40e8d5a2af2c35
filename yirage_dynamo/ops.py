"""yirage custom ops: the fused LLM building blocks the pattern passes rewrite into.

Importing this module registers the ops (namespace ``yirage``) with torch.library; nothing
else imports it at package import time (the pattern passes import it lazily). Every op has
a reference implementation in ATen ops (correct on every device; it runs as an extern call
until a lowering lists the op in ``Capabilities.native_custom_ops`` and brings a kernel)
and a fake implementation that is valid under SymInts.

Schemas (stable: device lowerings implement exactly these):

  yirage::rms_norm(Tensor x, Tensor? weight, float eps, bool weight_fp32=False) -> Tensor
      xf = x.float(); y = xf * rsqrt(mean(xf * xf, -1, keepdim) + eps)
      weight_fp32=False (Llama):  out = weight * y.to(x.dtype)   (dtype: promote(weight, x))
      weight_fp32=True  (Gemma):  out = (y * weight.float()).to(x.dtype)
      weight=None:                out = y.to(x.dtype)

  yirage::rms_norm_residual(Tensor x, Tensor residual, Tensor? weight, float eps,
                            bool weight_fp32=False) -> (Tensor out, Tensor new_residual)
      new_residual = residual + x (in x.dtype); out = rms_norm(new_residual, weight, eps, ...)

  yirage::gated_act(Tensor gate, Tensor up, str act="silu") -> Tensor
      act(gate) * up; act in {"silu", "gelu_tanh", "gelu"}  (SwiGLU / GeGLU MLP activation)

  yirage::rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved=False)
      -> (Tensor q_out, Tensor k_out)
      cos/sin broadcast against q and k (HF: [B, 1, S, rot_dim]); the first rot_dim =
      cos.shape[-1] features of the last dim are rotated, the rest pass through.
      interleaved=False: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
      interleaved=True:  pairs (x[2i], x[2i+1]) rotate (GPT-J layout; cos/sin repeat_interleaved)

  yirage::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float? scale=None,
                    bool is_causal=False, Tensor? cache_position=None) -> Tensor
      q [B, Hq, S, D], k/v [B, Hkv, T, D(v)] with Hq % Hkv == 0 (GQA/MQA without repeat_kv).
      attn_mask: bool (True = attend) or additive float, broadcastable to [B, Hq, S, T].
      is_causal: top-left aligned like SDPA (query i sees keys j <= i).
      cache_position [S] (int): query i sees keys j <= cache_position[i] (static KV cache of
      length T read in place; implies causal).  scale defaults to 1/sqrt(D).
      Output [B, Hq, S, Dv] laid out as contiguous [B, S, Hq, Dv] (like the SDPA kernels),
      so that transpose(1, 2) + view — what HF emits — stays a view.

  yirage::lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b,
                      float scale) -> Tensor
      x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T   (nn.Linear / PEFT layouts:
      weight [N, K], lora_a [R, K], lora_b [N, R])
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

LIB = "yirage"
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

# --------------------------------------------------------------------------- rms_norm


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_fp32: bool):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        out = y.to(x.dtype)
    elif weight_fp32:
        out = (y * weight.float()).to(x.dtype)
    else:
        out = weight * y.to(x.dtype)
    # Outputs are contiguous whatever the input strides, as the fake implementations say.
    return out.contiguous()


def _rms_out_dtype(x: torch.Tensor, weight: torch.Tensor | None, weight_fp32: bool):
    if weight is None or weight_fp32:
        return x.dtype
    return torch.promote_types(weight.dtype, x.dtype)


@torch.library.custom_op(f"{LIB}::rms_norm", mutates_args=())
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_fp32: bool = False
) -> torch.Tensor:
    return _rms_norm_ref(x, weight, eps, weight_fp32)


@rms_norm.register_fake
def _(x, weight, eps, weight_fp32=False):
    shape = torch.broadcast_shapes(x.shape, weight.shape) if weight is not None else x.shape
    return x.new_empty(shape, dtype=_rms_out_dtype(x, weight, weight_fp32))


@torch.library.custom_op(f"{LIB}::rms_norm_residual", mutates_args=())
def rms_norm_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = (residual + x).contiguous()
    return _rms_norm_ref(new_residual, weight, eps, weight_fp32), new_residual


@rms_norm_residual.register_fake
def _(x, residual, weight, eps, weight_fp32=False):
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    res = x.new_empty(shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    out_shape = torch.broadcast_shapes(shape, weight.shape) if weight is not None else shape
    return res.new_empty(out_shape, dtype=_rms_out_dtype(res, weight, weight_fp32)), res


# --------------------------------------------------------------------------- gated_act


@torch.library.custom_op(f"{LIB}::gated_act", mutates_args=())
def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    if act == "silu":
        return (F.silu(gate) * up).contiguous()
    if act == "gelu_tanh":
        return (F.gelu(gate, approximate="tanh") * up).contiguous()
    if act == "gelu":
        return (F.gelu(gate) * up).contiguous()
    raise ValueError(f"yirage::gated_act: unknown activation {act!r}; expected {ACTIVATIONS}")


@gated_act.register_fake
def _(gate, up, act="silu"):
    torch._check(act in ACTIVATIONS, lambda: f"unknown activation {act!r}")
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return gate.new_empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype))


# --------------------------------------------------------------------------- rotary


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        half = rot // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    if x_pass.shape[-1] == 0:
        return out.contiguous()
    return torch.cat((out, x_pass), dim=-1)


def _rotary_shape(x, cos, sin):
    # Broadcast of x * cos + rotated * sin (pass-through features keep x's last dim).
    lead = torch.broadcast_shapes(x.shape[:-1], cos.shape[:-1], sin.shape[:-1])
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return (*lead, x.shape[-1]), dtype


@torch.library.custom_op(f"{LIB}::rotary", mutates_args=())
def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


@rotary.register_fake
def _(q, k, cos, sin, interleaved=False):
    qs, qd = _rotary_shape(q, cos, sin)
    ks, kd = _rotary_shape(k, cos, sin)
    return q.new_empty(qs, dtype=qd), k.new_empty(ks, dtype=kd)


# --------------------------------------------------------------------------- attention


def _visibility(
    s: int, t: int, is_causal: bool, cache_position: torch.Tensor | None, device
) -> torch.Tensor | None:
    """[S, T] bool (True = attend) from causality / cache positions, or None."""
    kv = torch.arange(t, device=device)
    if cache_position is not None:
        return kv.unsqueeze(0) <= cache_position.to(device).reshape(-1, 1)
    if is_causal:
        return kv.unsqueeze(0) <= torch.arange(s, device=device).unsqueeze(1)
    return None


def _combine_mask(attn_mask, visible, dtype):
    if visible is None:
        return attn_mask
    if attn_mask is None:
        return visible
    if attn_mask.dtype == torch.bool:
        return attn_mask & visible
    return attn_mask.masked_fill(~visible, float("-inf")).to(dtype)


@torch.library.custom_op(f"{LIB}::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    cache_position: torch.Tensor | None = None,
) -> torch.Tensor:
    b, hq, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    groups = hq // hkv
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    mask = _combine_mask(attn_mask, _visibility(s, t, is_causal, cache_position, q.device), q.dtype)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
    # enable_gqa: SDPA reads each K/V head once for its group of query heads (no repeat_kv).
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1
    )
    # Pin the output layout to [B, S, H, D] (a no-op for the SDPA kernels that produce it).
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@attention.register_fake
def _(q, k, v, attn_mask=None, scale=None, is_causal=False, cache_position=None):
    b, hq, s, _ = q.shape
    torch._check(hq % k.shape[1] == 0, lambda: "query heads must be a multiple of kv heads")
    return q.new_empty((b, s, hq, v.shape[-1])).transpose(1, 2)


# --------------------------------------------------------------------------- lora_linear


@torch.library.custom_op(f"{LIB}::lora_linear", mutates_args=())
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    base = F.linear(x, weight, bias)
    return (base + F.linear(F.linear(x, lora_a), lora_b) * scale).contiguous()


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


OPS: dict[str, torch._ops.OpOverload] = {
    "rms_norm": torch.ops.yirage.rms_norm.default,
    "rms_norm_residual": torch.ops.yirage.rms_norm_residual.default,
    "gated_act": torch.ops.yirage.gated_act.default,
    "rotary": torch.ops.yirage.rotary.default,
    "attention": torch.ops.yirage.attention.default,
    "lora_linear": torch.ops.yirage.lora_linear.default,
}


@functools.cache
def direct_impls() -> dict:
    """OpOverload -> its plain Python reference implementation.

    Generated wrappers call these directly: going through the dispatcher into a
    torch.library custom op costs ~50 µs per call on CPU, more than the decode-time work.
    The functions are exactly what the dispatcher would run for the op's CPU/CUDA kernel.
    """
    out = {}
    for op in (rms_norm, rms_norm_residual, gated_act, rotary, attention, lora_linear):
        fn = getattr(op, "_init_fn", None)
        if fn is not None:
            out[getattr(torch.ops.yirage, op._name).default] = fn
    return out
