"""Triton GEMV kernels for decode-shaped matmuls, registered as `torch.library.triton_op`s.

x[M, K] @ W^T with W an nn.Linear weight [N, K] and M tiny (batch x 1 token):
  gemv(x, w_t, bias?, block_n, block_k, num_warps) -> y[M, N]
  gemv_gated(x, wg_t, wu_t, act, block_n, block_k, num_warps) -> act(x @ Wg^T) * (x @ Wu^T)
  gemv3(x, wq_t, wk_t, wv_t, block_n, block_k, num_warps) -> (q, k, v), one launch
  gemv_pdl / gemv_gated_pdl / gemv3_pdl: the same three as opaque custom ops launched with
    programmatic dependent launch (Hopper+), the first weight tile read before waiting
    for the previous kernel (YIRAGE_CUDA_PDL, lowering/cuda_gemv.py)
Optional fusions (lowering/cuda_gemv_fusion.py inserts them):
  norm_weight, eps: x is first RMS-normalised, rms_norm(x, norm_weight, eps) @ W^T
    (prologue: every program accumulates sum(x^2) while it streams K, and applies the
    row's 1/rms once to its dot products, since it is a per-row scalar)
  residual: gemv only, y = residual + x @ W^T (epilogue: the decoder layer's skip add)
Imported only through lowering/triton_kernels.py (Triton at the top: never on a CPU import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .triton_pool import launch


@triton.jit
def _load_w(w_ptrs, w2_ptrs, k0, K, rk, nm, EVEN: tl.constexpr, GATED: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] weight tile(s) at k0, read once per step (evict_first).
    Without W2, w stands in for it. EVEN: K and N are multiples of the blocks."""
    if EVEN:
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        if GATED:
            w2 = tl.load(w2_ptrs, eviction_policy="evict_first")
        else:
            w2 = w
    else:
        wmask = nm[:, None] & ((rk + k0) < K)[None, :]
        w = tl.load(w_ptrs, mask=wmask, other=0.0, eviction_policy="evict_first")
        if GATED:
            w2 = tl.load(w2_ptrs, mask=wmask, other=0.0, eviction_policy="evict_first")
        else:
            w2 = w
    return w, w2


@triton.jit
def _load_x(
    x_ptrs,
    nw_ptrs,
    k0,
    K,
    rk,
    mm,
    EVEN: tl.constexpr,
    NORM: tl.constexpr,
    ROWS: tl.constexpr,
):
    """The input at k0 (ROWS: [BLOCK_M, BLOCK_K], rows past M read as 0; else one
    [BLOCK_K] row) and the norm weight (x stands in for it without NORM)."""
    if EVEN:
        if ROWS:
            x = tl.load(x_ptrs, mask=mm[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs)
        if NORM:
            nw = tl.load(nw_ptrs)
        else:
            nw = x
    else:
        km = (rk + k0) < K
        if ROWS:
            x = tl.load(x_ptrs, mask=mm[:, None] & km[None, :], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=km, other=0.0)
        if NORM:
            nw = tl.load(nw_ptrs, mask=km, other=0.0)
        else:
            nw = x
    return x, nw


@triton.jit
def _row_step(acc, acc2, ss, x, w, w2, nw, GATED: tl.constexpr, NORM: tl.constexpr):
    """Batch-1 accumulation of one K tile: acc[n, k] += W[n, k] * x[k] (and W2 for the
    gated form); with NORM, x is scaled by the norm weight and sum(x^2) accumulated."""
    x1 = x.to(tl.float32)
    if NORM:
        # reduced per tile: a [BLOCK_K] accumulator would cost registers
        ss += tl.sum(x1 * x1, axis=0, keep_dims=True)
        x1 = x1 * nw.to(tl.float32)
    xf = x1[None, :]
    acc += w.to(tl.float32) * xf
    if GATED:
        acc2 += w2.to(tl.float32) * xf
    return acc, acc2, ss


@triton.jit
def _gemv_kernel(
    X,
    W,
    W2,
    B,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_w2n,
    stride_ym,
    WB,
    WC,
    YB,
    YC,
    NB,
    NC,
    stride_wbn,
    stride_wcn,
    stride_ybm,
    stride_ycm,
    NW,
    R,
    stride_rm,
    eps,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    RES: tl.constexpr,
    GATED: tl.constexpr,
    GROUP3: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr,
    PDL: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), fp32 accumulation, one rounding.

    One program owns BLOCK_N output rows (all M inputs) and streams their weight rows in
    [BLOCK_N, BLOCK_K] tiles: K is contiguous, so each thread issues 16-byte loads, marked
    evict_first (each weight byte is read once per step; x stays in L1/L2). Products are
    accumulated element-wise and reduced across K once, after the loop (no per-tile
    shuffles). GATED: W2 is the up-projection; y = act(x @ W^T) * (x @ W2^T), each GEMV
    result rounded to the output dtype first, as the unfused graph would. GROUP3: three
    GEMVs of one input (q/k/v projections) in one launch: programs past W's blocks take
    WB's rows (into YB), then WC's (into YC).
    NORM: the input row is RMS-normalised with weight NW first. x_k * NW_k enters the dot
    products and sum(x_k^2) is accumulated alongside; out *= rsqrt(mean + eps) at the end.
    The normalised row is not rounded to the input dtype before the products (one
    rounding, at the output), as in Inductor's fused kernels.
    RES: y = R + round(x @ W^T): the skip connection, rounded as the unfused add would.
    """
    pid = tl.program_id(0)
    if GROUP3:
        nb_a = tl.cdiv(N, BLOCK_N)
        nb_b = tl.cdiv(NB, BLOCK_N)
        if pid >= nb_a + nb_b:
            pid = pid - nb_a - nb_b
            W = WC
            Y = YC
            N = NC
            stride_wn = stride_wcn
            stride_ym = stride_ycm
        elif pid >= nb_a:
            pid = pid - nb_a
            W = WB
            Y = YB
            N = NB
            stride_wn = stride_wbn
            stride_ym = stride_ybm
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    nm = rn < N
    mm = rm < M
    w_ptrs = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    w2_ptrs = W2 + rn.to(tl.int64)[:, None] * stride_w2n + rk[None, :]
    if BLOCK_M == 1:
        # Batch-1 decode: 2-D tiles, the accumulator is [BLOCK_N, BLOCK_K].
        x_ptrs = X + rk
        nw_ptrs = NW + rk
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        ss = tl.zeros((1,), tl.float32)
        if PDL:
            # Launched before the previous kernel has finished (programmatic dependent
            # launch): the weights never depend on it, so this program's first tile
            # streams in while it drains; only then wait for its results (x, and every
            # buffer it may still read: nothing is stored before the wait).
            w, w2 = _load_w(w_ptrs, w2_ptrs, 0, K, rk, nm, EVEN, GATED)
            tl.extra.cuda.gdc_wait()
            # Our successor may now launch and stream its own weights meanwhile.
            tl.extra.cuda.gdc_launch_dependents()
            x, nw = _load_x(x_ptrs, nw_ptrs, 0, K, rk, mm, EVEN, NORM, False)
            acc, acc2, ss = _row_step(acc, acc2, ss, x, w, w2, nw, GATED, NORM)
            w_ptrs += BLOCK_K
            w2_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            nw_ptrs += BLOCK_K
        for k0 in range(BLOCK_K * PDL, K, BLOCK_K):
            x, nw = _load_x(x_ptrs, nw_ptrs, k0, K, rk, mm, EVEN, NORM, False)
            w, w2 = _load_w(w_ptrs, w2_ptrs, k0, K, rk, nm, EVEN, GATED)
            acc, acc2, ss = _row_step(acc, acc2, ss, x, w, w2, nw, GATED, NORM)
            w_ptrs += BLOCK_K
            w2_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            nw_ptrs += BLOCK_K
        out = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
        up = tl.sum(acc2, axis=1)[None, :]
        if NORM:
            r = tl.rsqrt(ss / K + eps)
            out = out * r
            up = up * r
    else:
        # A few rows (batched decode): [BLOCK_M, BLOCK_N, BLOCK_K] accumulator.
        x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
        nw_ptrs = NW + rk
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
        ss = tl.zeros((BLOCK_M,), tl.float32)
        if PDL:  # no prefetch for a few rows: wait for the previous kernel first
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for k0 in range(0, K, BLOCK_K):
            x, nw = _load_x(x_ptrs, nw_ptrs, k0, K, rk, mm, EVEN, NORM, True)
            w, w2 = _load_w(w_ptrs, w2_ptrs, k0, K, rk, nm, EVEN, GATED)
            x1 = x.to(tl.float32)
            if NORM:
                ss += tl.sum(x1 * x1, axis=1)
                x1 = x1 * nw.to(tl.float32)[None, :]
            xf = x1[:, None, :]
            acc += w.to(tl.float32)[None, :, :] * xf
            if GATED:
                acc2 += w2.to(tl.float32)[None, :, :] * xf
            w_ptrs += BLOCK_K
            w2_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            nw_ptrs += BLOCK_K
        out = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
        up = tl.sum(acc2, axis=2)
        if NORM:
            r = tl.rsqrt(ss / K + eps)[:, None]
            out = out * r
            up = up * r
    dt = Y.dtype.element_ty
    if HAS_BIAS:
        out += tl.load(B + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    if GATED:
        g = out.to(dt).to(tl.float32)
        u = up.to(dt).to(tl.float32)
        if ACT == 0:
            a = g * tl.sigmoid(g)
        else:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
        out = a.to(dt).to(tl.float32) * u
    omask = mm[:, None] & nm[None, :]
    if RES:
        res = tl.load(R + rm[:, None] * stride_rm + rn[None, :], mask=omask, other=0.0)
        out = out.to(dt).to(tl.float32) + res.to(tl.float32)
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], out.to(dt), mask=omask)


def _weight_rows(w_t: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight (K contiguous) behind mm's [K, N] operand `w_t` (= W.t())."""
    w = w_t.t()
    return w if w.stride(-1) == 1 else w.contiguous()


def _launch_gemv(
    x,
    w_t,
    w2_t,
    bias,
    act,
    block_n,
    block_k,
    num_warps,
    group=(),
    norm=None,
    residual=None,
    pdl=False,
):
    """One launch: y = x @ w_t (+ bias), or the gated form with w2_t, or with `group` two
    more weights (w_b, w_c) whose outputs follow y: returns the list of outputs.
    `norm` = (weight, eps) RMS-normalises x first; `residual` [M, N] is added to y.
    `pdl`: a programmatic dependent launch (Hopper+) through Triton's own launcher, the
    first weight tile read before waiting for the previous kernel (see the kernel)."""
    m, k = x.shape
    n = w_t.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = _weight_rows(w_t)
    w2 = _weight_rows(w2_t) if w2_t is not None else w
    ws = [_weight_rows(g) for g in group] or [w, w]
    ns = [g.shape[1] for g in group] or [0, 0]
    ys = [torch.empty((m, nn), dtype=x.dtype, device=x.device) for nn in [n, *ns[: len(group)]]]
    yb, yc = (ys[1], ys[2]) if group else (ys[0], ys[0])
    block_m = triton.next_power_of_2(m)
    # The accumulator is [BLOCK_M, BLOCK_N, BLOCK_K] per program: keep it in registers.
    bk = max(32, block_k // block_m)
    blocks = sum(triton.cdiv(nn, block_n) for nn in [n, *ns[: len(group)]])
    even = k % bk == 0 and all(nn % block_n == 0 for nn in [n, *ns])
    nw, eps = norm if norm is not None else (x, 0.0)
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    res = residual if residual is not None else ys[0]
    launch(
        _gemv_kernel,
        (blocks,),
        x,
        w,
        w2,
        bias if bias is not None else x,
        ys[0],
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        w2.stride(0),
        ys[0].stride(0),
        ws[0],
        ws[1],
        yb,
        yc,
        ns[0],
        ns[1],
        ws[0].stride(0),
        ws[1].stride(0),
        yb.stride(0),
        yc.stride(0),
        nw,
        res,
        res.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        NORM=norm is not None,
        RES=residual is not None,
        GATED=w2_t is not None,
        GROUP3=bool(group),
        ACT=act,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=bk,
        EVEN=even,
        PDL=pdl,
        num_warps=num_warps,
        **({"launch_pdl": True, "traced": False} if pdl else {}),
    )
    return ys


@triton_op("yirage_cuda::gemv", mutates_args=())
def gemv(
    x: torch.Tensor,
    w_t: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    num_warps: int,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`aten.mm(x, w_t)` / `aten.addmm(bias, x, w_t)` for x [M, K] with M tiny and w_t the
    transposed view [K, N] of an nn.Linear weight [N, K]; with `norm_weight`,
    rms_norm(x, norm_weight, eps) @ w_t; with `residual` [M, N], residual + that."""
    norm = (norm_weight, eps) if norm_weight is not None else None
    return _launch_gemv(
        x, w_t, None, bias, 0, block_n, block_k, num_warps, norm=norm, residual=residual
    )[0]


@triton_op("yirage_cuda::gemv_gated", mutates_args=())
def gemv_gated(
    x: torch.Tensor,
    wg_t: torch.Tensor,
    wu_t: torch.Tensor,
    act: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """act(x @ wg_t) * (x @ wu_t) in one pass over both weights (gated MLP of decode);
    with `norm_weight`, of rms_norm(x, norm_weight, eps)."""
    norm = (norm_weight, eps) if norm_weight is not None else None
    return _launch_gemv(x, wg_t, wu_t, None, act, block_n, block_k, num_warps, norm=norm)[0]


@triton_op("yirage_cuda::gemv3", mutates_args=())
def gemv3(
    x: torch.Tensor,
    wa_t: torch.Tensor,
    wb_t: torch.Tensor,
    wc_t: torch.Tensor,
    block_n: int,
    block_k: int,
    num_warps: int,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x @ wa_t, x @ wb_t, x @ wc_t) in one launch: the q/k/v projections of decode
    without concatenating their weights (no extra weight memory); with `norm_weight`,
    of rms_norm(x, norm_weight, eps)."""
    norm = (norm_weight, eps) if norm_weight is not None else None
    ya, yb, yc = _launch_gemv(
        x, wa_t, None, None, 0, block_n, block_k, num_warps, (wb_t, wc_t), norm=norm
    )
    return ya, yb, yc


# Opaque twins of the three ops for programmatic dependent launch (YIRAGE_CUDA_PDL,
# lowering/cuda_gemv.py). A triton_op's kernel is launched by Inductor's generated code,
# whose user-kernel launches carry no launch_pdl (torch 2.11 and 2.13); a custom op is an
# extern call that launches the kernel itself. Its Python runs once, when the step's CUDA
# graph is captured; replays launch the recorded kernels with their PDL edges.
@torch.library.custom_op("yirage_cuda::gemv_pdl", mutates_args=())
def gemv_pdl(
    x: torch.Tensor,
    w_t: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    num_warps: int,
) -> torch.Tensor:
    """`gemv` launched with programmatic dependent launch."""
    return _launch_gemv(x, w_t, None, bias, 0, block_n, block_k, num_warps, pdl=True)[0]


@gemv_pdl.register_fake
def _(x, w_t, bias, block_n, block_k, num_warps):
    return x.new_empty((x.shape[0], w_t.shape[1]))


@torch.library.custom_op("yirage_cuda::gemv_gated_pdl", mutates_args=())
def gemv_gated_pdl(
    x: torch.Tensor,
    wg_t: torch.Tensor,
    wu_t: torch.Tensor,
    act: int,
    block_n: int,
    block_k: int,
    num_warps: int,
) -> torch.Tensor:
    """`gemv_gated` launched with programmatic dependent launch."""
    return _launch_gemv(x, wg_t, wu_t, None, act, block_n, block_k, num_warps, pdl=True)[0]


@gemv_gated_pdl.register_fake
def _(x, wg_t, wu_t, act, block_n, block_k, num_warps):
    return x.new_empty((x.shape[0], wg_t.shape[1]))


@torch.library.custom_op("yirage_cuda::gemv3_pdl", mutates_args=())
def gemv3_pdl(
    x: torch.Tensor,
    wa_t: torch.Tensor,
    wb_t: torch.Tensor,
    wc_t: torch.Tensor,
    block_n: int,
    block_k: int,
    num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gemv3` launched with programmatic dependent launch."""
    ya, yb, yc = _launch_gemv(
        x, wa_t, None, None, 0, block_n, block_k, num_warps, (wb_t, wc_t), pdl=True
    )
    return ya, yb, yc


@gemv3_pdl.register_fake
def _(x, wa_t, wb_t, wc_t, block_n, block_k, num_warps):
    m = x.shape[0]
    return tuple(x.new_empty((m, w.shape[1])) for w in (wa_t, wb_t, wc_t))


__all__ = ["gemv", "gemv3", "gemv3_pdl", "gemv_gated", "gemv_gated_pdl", "gemv_pdl"]
