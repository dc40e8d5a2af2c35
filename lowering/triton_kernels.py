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
from torch.library import triton_op, wrap_triton

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
    wrap_triton(_rms_norm_kernel)[(x2.shape[0],)](
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
    wrap_triton(_gated_act_kernel)[grid](
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
    wrap_triton(_rotary_kernel)[(b * h * s,)](
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


# ---------------------------------------------------------------------------------------
# Decode attention (flash-decoding over the valid prefix of a static KV cache)


@triton.jit
def _decode_attn_split_kernel(
    Q,
    K,
    V,
    CP,
    MASK,
    MO,
    MLSE,
    OUT,
    n_cp,
    T,
    scale,
    G,
    HKV,
    NUM_SPLITS,
    sob,
    soh,
    sqb,
    sqh,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    smb,
    smn,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_CP: tl.constexpr,
    IEEE: tl.constexpr,
    DIRECT: tl.constexpr,
    TRIGGER: tl.constexpr,
    SEM,
    BLOCK_S: tl.constexpr,
    MERGE_LAST: tl.constexpr,
):
    # DIRECT: one split covers the cache, so this program writes the final output and
    # no merge kernel runs. MERGE_LAST: the last of a (batch, kv head)'s split programs to
    # finish merges their partial results (counted in SEM[bh], left at 0 for the next
    # launch), so no merge kernel runs either.
    if TRIGGER:  # see _pdl_trigger
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    if HAS_CP:
        # Valid prefix, read on the device: CUDA-graph replays see each step's value.
        valid = tl.load(CP + n_cp - 1).to(tl.int32) + 1
    else:
        valid = T
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, valid)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    q = tl.load(
        Q + b * sqb + (hk * G + g)[:, None] * sqh + d[None, :],
        mask=gm[:, None] & dm[None, :],
        other=0.0,
    )
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        live = nm
        if MASK_KIND == 1:
            keep = tl.load(MASK + b * smb + n * smn, mask=nm, other=0)
            live = nm & (keep != 0)
        elif MASK_KIND == 2:
            madd = tl.load(MASK + b * smb + n * smn, mask=nm, other=float("-inf"))
            madd = madd.to(tl.float32)
            # An additive mask at <= -1e30 (-inf or finfo.min) gives exp() == 0 exactly.
            live = nm & (madd > -1e30)
        # Blocks the mask hides entirely (the unwritten tail of a static cache) are
        # skipped after reading only the mask: no K/V traffic for them.
        if tl.max(live.to(tl.int32), 0) > 0:
            kv_mask = nm[:, None] & dm[None, :]
            k = tl.load(k_base + n[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            if MASK_KIND == 2:
                s = tl.where(nm[None, :], s + madd[None, :], float("-inf"))
            else:
                s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row whose keys are all masked so far keeps m at -inf: subtract 0 (no NaN).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(
            OUT + b * sob + (hk * G + g)[:, None] * soh + d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=gm[:, None] & dm[None, :],
        )
    else:
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        row = b * (HKV * G) + hk * G + g  # flat (batch, query head)
        tl.store(
            MO + (row * NUM_SPLITS + split)[:, None] * BLOCK_D + d[None, :],
            out,
            mask=gm[:, None],
        )
        tl.store(MLSE + row * NUM_SPLITS + split, lse, mask=gm)
        if MERGE_LAST:
            # Every thread's stores are issued before the release below (the pattern of
            # a split-K semaphore: barrier, then one gpu-scope acq_rel atomic).
            tl.debug_barrier()
            done = tl.atomic_add(SEM + bh, 1, sem="acq_rel", scope="gpu")
            if done == NUM_SPLITS - 1:
                _merge_rows(MO, MLSE, OUT, b * (HKV * G) + hk * G, b, hk * G, G, NUM_SPLITS, sob, soh, D, BLOCK_D, BLOCK_S)  # fmt: skip
                tl.atomic_xchg(SEM + bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_rows(MO, MLSE, OUT, row0, b, h0, n_rows, NUM_SPLITS, sob, soh, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """out[b, h0 + i] for i < n_rows: the splits' partial outputs weighted by their
    log-sum-exp. Partials written by other programs are read past L1 (`.cg`)."""
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = s < NUM_SPLITS
    for i in range(0, n_rows):
        row = row0 + i
        lse = tl.load(
            MLSE + row * NUM_SPLITS + s, mask=sm, other=float("-inf"), cache_modifier=".cg"
        )
        m = tl.max(lse, 0)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
        o = tl.load(
            MO + (row * NUM_SPLITS + s)[:, None] * BLOCK_D + d[None, :],
            mask=sm[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(OUT + b * sob + (h0 + i) * soh + d, out.to(OUT.dtype.element_ty), mask=d < D)


@triton.jit
def _decode_attn_merge_kernel(
    MO,
    MLSE,
    OUT,
    HQ,
    NUM_SPLITS,
    sob,
    soh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    if TRIGGER:  # see _pdl_trigger
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    b = row // HQ
    h = row % HQ
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = s < NUM_SPLITS
    lse = tl.load(MLSE + row * NUM_SPLITS + s, mask=sm, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
    o = tl.load(
        MO + (row * NUM_SPLITS + s)[:, None] * BLOCK_D + d[None, :],
        mask=sm[:, None],
        other=0.0,
    )
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * sob + h * soh + d, out.to(OUT.dtype.element_ty), mask=d < D)


def _pdl_trigger() -> bool:
    """Whether the attention kernels let the next kernel launch at once (PDL's
    `launch_dependents`): with YIRAGE_CUDA_PDL on, the o-projection GEMV after them is a
    programmatic dependent launch that streams its weights while attention runs, and
    waits for attention's output before it reads it. A scheduling hint only: results
    are the same either way. Read when the op is traced (compile time)."""
    from .cuda_pdl import pdl_mode

    return pdl_mode() != "off"


def _mask_rows(mask: torch.Tensor | None, b: int) -> tuple[int, int, int]:
    """(kind, batch stride, key stride) of a [B|1, 1, 1, T] mask (or no mask)."""
    if mask is None:
        return 0, 0, 0
    kind = 1 if mask.dtype == torch.bool else 2
    return kind, 0 if mask.shape[0] == 1 else mask.stride(0), mask.stride(-1)


@triton_op("yirage_cuda::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_mask: torch.Tensor | None,
    cache_position: torch.Tensor | None,
    scale: float,
    split: int,
    block_n: int,
    num_warps: int,
    merge_sem: torch.Tensor | None = None,
) -> torch.Tensor:
    """`merge_sem`: int32 zeros, one per (batch, kv head), owned by this call site. Given
    (and the cache in more than one split), the last split program of each (batch, kv
    head) merges the partial results, instead of a second kernel; it leaves them zero."""
    b, hq, _, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    num_splits = triton.cdiv(max_len, split)
    direct = num_splits == 1
    block_d = triton.next_power_of_2(d)
    # [B, Hq, 1, D] with a [B, 1, Hq, D] layout, like yirage::attention's (SDPA's) output.
    out = torch.empty((b, 1, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    if direct:  # the split kernel writes `out`; the partial-result buffers are not read
        mid_o = mid_lse = out
    else:
        mid_o = torch.empty((b * hq, num_splits, block_d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((b * hq, num_splits), dtype=torch.float32, device=q.device)
    mask_kind, smb, smn = _mask_rows(attn_mask, b)
    trigger = _pdl_trigger()
    merge_last = merge_sem is not None and not direct
    if merge_last and (merge_sem.dtype != torch.int32 or merge_sem.numel() < b * hkv):
        raise ValueError(f"merge_sem: expected >= {b * hkv} int32 counters")
    block_s = max(2, triton.next_power_of_2(num_splits))
    launch(
        _decode_attn_split_kernel,
        (b * hkv, num_splits),
        q,
        k_cache,
        v_cache,
        cache_position if cache_position is not None else q,
        attn_mask if attn_mask is not None else q,
        mid_o,
        mid_lse,
        out,
        cache_position.shape[0] if cache_position is not None else 0,
        max_len,
        scale,
        group,
        hkv,
        num_splits,
        out.stride(0),
        out.stride(1),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        smb,
        smn,
        D=d,
        BLOCK_D=block_d,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        SPLIT=split,
        MASK_KIND=mask_kind,
        HAS_CP=cache_position is not None,
        IEEE=q.dtype == torch.float32,
        DIRECT=direct,
        TRIGGER=trigger,
        SEM=merge_sem if merge_last else q,
        BLOCK_S=block_s,
        MERGE_LAST=merge_last,
        num_warps=num_warps,
    )
    if direct or merge_last:
        return out
    launch(
        _decode_attn_merge_kernel,
        (b * hq,),
        mid_o,
        mid_lse,
        out,
        hq,
        num_splits,
        out.stride(0),
        out.stride(1),
        D=d,
        BLOCK_D=block_d,
        BLOCK_S=block_s,
        TRIGGER=trigger,
        num_warps=4,
    )
    return out


# GEMV: decode-shaped matmul, in its own module; imported here so that importing this
# module registers every yirage_cuda op.
from .triton_gemv import gemv, gemv3, gemv3_pdl, gemv_gated, gemv_gated_pdl, gemv_pdl  # noqa: E402
from .triton_kv_write import rotary_kv_write  # noqa: E402

__all__ = [
    "decode_attention",
    "gated_act",
    "gemv",
    "gemv3",
    "gemv3_pdl",
    "gemv_gated",
    "gemv_gated_pdl",
    "gemv_pdl",
    "rms_norm",
    "rms_norm_residual",
    "rotary",
    "rotary_kv_write",
]
