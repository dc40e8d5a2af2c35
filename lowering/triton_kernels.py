"""Triton kernels for the yirage fused ops, registered as `torch.library.triton_op`s.

This module imports Triton at the top, so it is imported lazily (by lowering/cuda.py, on a
machine with a GPU) and never from the package's import path: importing it registers the
`yirage_cuda::*` operators, which is why that only happens on demand.

Ops (all CUDA, all functional; B batch, S sequence, H heads, D head dim). Each implements
the yirage op of the same name (schemas in yirage_dynamo/ops.py) with the same rounding steps
as its ATen reference, plus launch parameters chosen by lowering/kernel_tuning.py:
  rms_norm(x[..., N], weight[N]?, eps, weight_fp32, num_warps) -> y
  rms_norm_residual(x, residual, weight?, eps, weight_fp32, num_warps) -> (y, x + residual)
  gated_act(gate[..., N], up[..., N], act, block, num_warps) -> act(gate) * up
      act 0: silu, 1: gelu_tanh. Row strides are free: gate/up may be halves of one GEMM.
  rotary(q[B, Hq, S, D], k[B, Hkv, S, D], cos[B|1, (1,) S, D], sin) -> (q', k')
      rotate-half layout, full rotary dim: x * cos + rotate_half(x) * sin.
      With the KV-cache write fused in: lowering/triton_kv_write.py.
  decode_attention(q[B, Hq, 1, D], k_cache[B, Hkv, L, D], v_cache, attn_mask[B|1,1,1,L]?,
                   cache_position[Sq]?, scale, split, block_n, num_warps) -> o[B, Hq, 1, D]
      Flash-decoding over the valid prefix of a static cache, bounded at run time on the
      device (no host sync, CUDA-graph safe): by cache_position[-1] + 1 when given, and by
      the mask otherwise: a key block the mask hides entirely (HF's decode mask hides every
      slot past cache_position) is skipped after reading only its mask values, never its
      K/V. The cache is cut into `split`-long chunks; one program per (batch, kv head, chunk)
      handles all Hq/Hkv query heads of its group (GQA without repeat_kv); a second kernel
      merges the chunks' partial softmax results by their log-sum-exp, or, given
      `merge_sem` (a call site's zeroed counters), the last chunk program to finish does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .triton_pool import launch

# ---------------------------------------------------------------------------------------
# RMSNorm (optionally with the residual add fused in front)


@triton.jit
def _rms_norm_kernel(
    X,
    R,
    W,
    Y,
    H,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    WEIGHT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    normed = xf * (1.0 / tl.sqrt(var + eps))
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if WEIGHT_FP32:
            y = normed * w
        else:
            # HF (Llama) rounds to the input dtype before the weight multiply.
            y = w * normed.to(x.dtype).to(tl.float32)
    else:
        y = normed
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _norm_out_dtype(x: torch.Tensor, weight: torch.Tensor | None, weight_fp32: bool):
    if weight is None or weight_fp32:
        return x.dtype
    return torch.promote_types(x.dtype, weight.dtype)


def _launch_rms(x, residual, weight, eps, weight_fp32, num_warps):
    n = x.shape[-1]
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    y = torch.empty(x.shape, dtype=_norm_out_dtype(x, weight, weight_fp32), device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else y
    y2, h2 = y.view(-1, n), h.view(-1, n)
    launch(
        _rms_norm_kernel,
        (x2.shape[0],),
        x2,
        r2,
        weight if weight is not None else x2,
        y2,
        h2,
        x2.stride(0),
        r2.stride(0),
        y2.stride(0),
        h2.stride(0),
        n,
        eps,
        HAS_RES=residual is not None,
        HAS_W=weight is not None,
        WEIGHT_FP32=weight_fp32,
        BLOCK_N=triton.next_power_of_2(n),
        num_warps=num_warps,
    )
    return y, h


@triton_op("yirage_cuda::rms_norm", mutates_args=())
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_fp32: bool, num_warps: int
) -> torch.Tensor:
    return _launch_rms(x, None, weight, eps, weight_fp32, num_warps)[0]


@triton_op("yirage_cuda::rms_norm_residual", mutates_args=())
def rms_norm_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    weight_fp32: bool,
    num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_rms(x, residual, weight, eps, weight_fp32, num_warps)


# ---------------------------------------------------------------------------------------
# Gated MLP activation: act(gate) * up


@triton.jit
def _gated_act_kernel(
    G, U, Y, N, stride_g, stride_u, stride_y, ACT: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    # Eager rounds act(gate) to the activation dtype before the multiply: do the same.
    a = a.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton_op("yirage_cuda::gated_act", mutates_args=())
def gated_act(
    gate: torch.Tensor, up: torch.Tensor, act: int, block: int, num_warps: int
) -> torch.Tensor:
    n = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    y2 = y.view(-1, n)
    grid = (g2.shape[0], triton.cdiv(n, block))
    launch(
        _gated_act_kernel,
        grid,
        g2,
        u2,
        y2,
        n,
        g2.stride(0),
        u2.stride(0),
        y2.stride(0),
        ACT=act,
        BLOCK=block,
        num_warps=num_warps,
    )
    return y


# ---------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half layout)


@triton.jit
def _rotate_row(x_ptr, y_ptr, c_ptr, s_ptr, d, m, HALF: tl.constexpr):
    """One row: y = x * cos + rotate_half(x) * sin, with eager's rounding (shared by the
    rotary kernels here and in lowering/triton_kv_write.py, so they write the same bits)."""
    x1 = tl.load(x_ptr + d, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + d, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(c_ptr + d, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + HALF + d, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + d, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + HALF + d, mask=m, other=0.0).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    # Eager: (x * cos) + (rotate_half(x) * sin), each product rounded to x's dtype.
    o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(y_ptr + d, o1.to(dt), mask=m)
    tl.store(y_ptr + HALF + d, o2.to(dt), mask=m)


@triton.jit
def _rotary_kernel(
    X,
    C,
    S_,
    Y,
    H,
    S,
    sxb,
    sxh,
    sxs,
    scb,
    scs,
    ssb,
    sss,
    syb,
    syh,
    sys,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    s = pid % S
    h = (pid // S) % H
    b = pid // (S * H)
    d = tl.arange(0, BLOCK_HALF)
    m = d < HALF
    x_ptr = X + b * sxb + h * sxh + s * sxs
    y_ptr = Y + b * syb + h * syh + s * sys
    _rotate_row(x_ptr, y_ptr, C + b * scb + s * scs, S_ + b * ssb + s * sss, d, m, HALF)


def _bcast_stride(t: torch.Tensor, dim: int) -> int:
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    b, h, s, d = x.shape
    y = torch.empty((b, h, s, d), dtype=x.dtype, device=x.device)
    launch(
        _rotary_kernel,
        (b * h * s,),
        x,
        cos,
        sin,
        y,
        h,
        s,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        _bcast_stride(cos, 0),
        cos.stride(1),
        _bcast_stride(sin, 0),
        sin.stride(1),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        HALF=d // 2,
        BLOCK_HALF=triton.next_power_of_2(d // 2),
        num_warps=1,
    )
    return y


def _seq_major(t: torch.Tensor) -> torch.Tensor:
    # cos/sin as [B|1, S, D]: HF passes them unsqueezed to [B|1, 1, S, D].
    t = t.select(1, 0) if t.dim() == 4 else t
    return t if t.stride(-1) == 1 else t.contiguous()


@triton_op("yirage_cuda::rotary", mutates_args=())
def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = _seq_major(cos), _seq_major(sin)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


# Decode attention and GEMV (decode-shaped matmul), each in its own module; imported here
# so that importing this module registers every yirage_cuda op.
from .triton_attention import decode_attention  # noqa: E402
from .triton_gemv import gemv, gemv3, gemv3_pdl, gemv_gated, gemv_gated_pdl, gemv_pdl  # noqa: E402
from .triton_kv_write import KvCommitTable, kv_commit, rotary_kv_stage, rotary_kv_write  # noqa: E402

__all__ = [
    "KvCommitTable",
    "decode_attention",
    "gated_act",
    "gemv",
    "gemv3",
    "gemv3_pdl",
    "gemv_gated",
    "gemv_gated_pdl",
    "gemv_pdl",
    "kv_commit",
    "rms_norm",
    "rms_norm_residual",
    "rotary",
    "rotary_kv_stage",
    "rotary_kv_write",
]
