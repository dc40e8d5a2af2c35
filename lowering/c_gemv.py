"""CPU decode GEMVs: `mm(x[M <= 4, K], t(W))` as a C++/OpenMP kernel of the graph's library
(and `addmm(bias, x, t(W))`: a Linear with bias, e.g. Qwen2's q/k/v, the bias added to
each finished dot product).

before:                                   after:
    wt = t(W)         # W: [N, K] weight       y = gemv_0(x, wt)   # one-node region
    y = aten.mm(x, wt)                                            # (like attention)

Why not MKL: a decode token is ~120 such products that only stream weights (a 135M fp32
model reads ~540 MB per token). On the 2-core VM, a token's worth of them ran at
26.1–26.8 GB/s through `torch.mm` and at 28.6–29.7 GB/s through this kernel (about 8%
faster; diag run of all SmolLM-135M shapes, weights cycled through 513 MB as in decode).
The kernel is also called through the fast-call trampoline (~0.3 µs, not the Python
argument parser and dispatcher of `torch.mm`).

Kernel: each OpenMP thread takes a contiguous range of 4-row blocks of W (static
schedule: one long sequential stream per thread, which the hardware prefetcher follows).
A block's 4 rows are read once into 4 independent 16-float accumulators (compiler
vector types: AVX-512, AVX2 or NEON code from one source), and reused for each of the M
rows of x (from L1). Sums are fp32, in a different order from MKL's (as any blocked GEMV).

Handled: fp32 x, W and y, static shapes, x rows contiguous, W row-major (the transpose of
an nn.Linear weight, frozen or not: the launcher checks its strides at run time, other
layouts run `aten.mm`). Anything else stays an `aten.mm` call (the report says why).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .c_ops import RenderedKernel, Unsupported, region_graph, region_module
from .c_renderer import CRenderer, Signature

aten = torch.ops.aten
ENABLE_ENV = "YIRAGE_CPU_GEMV"
REGION_TAG = "yirage_cpu_gemv"
# Decode batch x 1 token; a larger M is a GEMM (MKL/oneDNN's job: it reuses W from cache).
GEMV_MAX_M = 4
# Multiply-adds below which the kernel stays serial (an OpenMP fork/join costs ~1-2 µs).
PARALLEL_WORK = 1 << 16

_IMPL = r"""
#ifndef YIRAGE_GEMV_IMPL
#define YIRAGE_GEMV_IMPL
namespace ygemv {
// y[m * ys + n] = sum_k x[m * xs + k] * w[n * K + k] (+ bias[n] with B) for rows n0..n0+3.
template <int M, bool B>
static inline void block4(const float* __restrict x, int64_t xs, const float* __restrict w,
                          int64_t K, float* __restrict y, int64_t ys, int64_t n0,
                          const float* __restrict bias) {
  const float* w0 = w + n0 * K;
  const float* w1 = w0 + K;
  const float* w2 = w1 + K;
  const float* w3 = w2 + K;
  for (int m = 0; m < M; ++m) {
    const float* xm = x + m * xs;
    y_vf16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const y_vf16 xv = y_load16(xm + k);
      a0 += y_load16(w0 + k) * xv;
      a1 += y_load16(w1 + k) * xv;
      a2 += y_load16(w2 + k) * xv;
      a3 += y_load16(w3 + k) * xv;
    }
    float s0 = y_hsum16(a0), s1 = y_hsum16(a1), s2 = y_hsum16(a2), s3 = y_hsum16(a3);
    for (; k < K; ++k) {
      const float xv = xm[k];
      s0 += w0[k] * xv; s1 += w1[k] * xv; s2 += w2[k] * xv; s3 += w3[k] * xv;
    }
    if (B) { s0 += bias[n0]; s1 += bias[n0 + 1]; s2 += bias[n0 + 2]; s3 += bias[n0 + 3]; }
    float* ym = y + m * ys + n0;
    ym[0] = s0; ym[1] = s1; ym[2] = s2; ym[3] = s3;
  }
}

template <int M, bool B>
static inline void row1(const float* __restrict x, int64_t xs, const float* __restrict w,
                        int64_t K, float* __restrict y, int64_t ys, int64_t n,
                        const float* __restrict bias) {
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += w[n * K + k] * x[m * xs + k];
    y[m * ys + n] = B ? s + bias[n] : s;
  }
}

// B: add bias[n] (aten.addmm(bias, x, t(W)), a Linear with bias) after the dot product.
template <int M, bool B = false>
static void run(const float* __restrict x, int64_t xs, const float* __restrict w, int64_t N,
                int64_t K, float* __restrict y, int64_t ys, bool parallel,
                const float* __restrict bias = nullptr) {
  const int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t b = 0; b < blocks; ++b) block4<M, B>(x, xs, w, K, y, ys, 4 * b, bias);
  for (int64_t n = 4 * blocks; n < N; ++n) row1<M, B>(x, xs, w, K, y, ys, n, bias);
}
}  // namespace ygemv
#endif
"""


def is_gemv_region(region: Any) -> bool:
    return getattr(region, "meta", {}).get(REGION_TAG, False) if region is not None else False


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, Node) else x


def _static(v: torch.Tensor) -> bool:
    return not any(isinstance(s, torch.SymInt) for s in (*v.shape, *v.stride()))


def _operands(node: Node) -> tuple[Any, Any, Any] | None:
    """(x, W^T, bias or None) of mm(x, wt) / addmm(bias, x, wt) with default beta/alpha."""
    if node.kwargs:
        return None
    if node.target is aten.mm.default and len(node.args) == 2:
        return node.args[0], node.args[1], None
    if node.target is aten.addmm.default and len(node.args) == 3:
        return node.args[1], node.args[2], node.args[0]
    return None


def why_not(node: Node) -> str | None:
    """Why this aten.mm / addmm node stays an ATen call (None when it becomes a GEMV)."""
    ops = _operands(node)
    if ops is None:
        return "unexpected arguments"
    x, wt, bias = ops
    if x is wt:
        return "x is its own weight"
    if bias is not None:
        bv = _val(bias)
        if bias is x or bias is wt or not isinstance(bv, torch.Tensor):
            return "bias is not a tensor of its own"
        if bv.dim() != 1 or bv.dtype != torch.float32 or bv.device.type != "cpu":
            return "bias is not a 1-D fp32 CPU tensor"
        if not _static(bv) or bv.shape[0] != _val(node).shape[-1] or bv.stride() != (1,):
            return "bias is not a contiguous [N] vector"
    xv, wv, yv = _val(x), _val(wt), _val(node)
    if not all(isinstance(t, torch.Tensor) for t in (xv, wv, yv)):
        return "operands without fake values"
    if any(t.dtype != torch.float32 for t in (xv, wv, yv)):
        return f"dtypes {xv.dtype}/{wv.dtype} (fp32 only)"
    if any(t.device.type != "cpu" for t in (xv, wv, yv)):
        return "not CPU tensors"
    if not all(_static(t) for t in (xv, wv, yv)):
        return "symbolic sizes"
    m, k = xv.shape
    n = wv.shape[1]
    if m > GEMV_MAX_M or m == 0 or n == 0 or k == 0:
        return f"M={m} (a GEMM: M > {GEMV_MAX_M})"
    if n > 1 and wv.stride()[1] != k or k > 1 and wv.stride()[0] != 1:
        return "weight is not the transpose of a row-major [N, K] matrix"
    if k > 1 and xv.stride()[1] != 1:
        return "x rows are not contiguous"
    if n > 1 and yv.stride()[1] != 1:
        return "output rows are not contiguous"
    return None


def outline_gemvs(gm: GraphModule, ctx: Any) -> int:
    """Replace each eligible decode-shaped aten.mm by a one-node call_module region.

    YIRAGE_CPU_GEMV=0 turns this off (every mm stays an ATen call)."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        why = why_not(node)
        if why is not None:
            ops = _operands(node)
            xv = _val(ops[0]) if ops is not None else None
            small = isinstance(xv, torch.Tensor) and xv.dim() == 2 and xv.shape[0] == 1
            if small:  # a GEMM (prefill) staying on MKL is not news
                ctx.report.notes.append(f"mm {node.name} stays an ATen call: {why}")
            continue
        sub, env = region_graph(list(node.args))
        env[node] = sub.node_copy(node, env.__getitem__)
        sub.output(env[node])
        name, region = region_module(gm, sub, "gemv", count, REGION_TAG)
        gm.add_submodule(name, region)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, tuple(node.args))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
        ctx.report.count_pattern("cpu_gemv", count)
    return count


def render_gemv(region: GraphModule) -> RenderedKernel:
    """The kernel of a region made by `outline_gemvs` (see the module docstring)."""
    r = CRenderer()
    nodes = list(region.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    node = next(n for n in nodes if n.op == "call_function")
    why = why_not(node)
    if why is not None:
        raise Unsupported(why)
    x, wt, bias = _operands(node)
    xv, wv, yv = _val(x), _val(wt), _val(node)
    m, k = xv.shape
    n = wv.shape[1]
    name = {ph: f"p{i}" for i, ph in enumerate(placeholders)}
    signature = Signature(r)
    for i, ph in enumerate(placeholders):
        signature.tensor(i, _val(ph), "const float*")
    signature.output(0, "float*")
    symbol_sources = signature.symbols(placeholders)
    xs, ys = xv.stride()[0], yv.stride()[0]
    parallel = "true" if m * n * k >= PARALLEL_WORK and n >= 8 else "false"
    body = _IMPL + "\n".join(
        [
            f'extern "C" void FUNC({", ".join(signature.sig)}) {{',
            f"  ygemv::run<{m}>({name[x]}, {xs}, {name[wt]}, {n}, {k}, o0, {ys}, {parallel});"
            if bias is None
            else f"  ygemv::run<{m}, true>({name[x]}, {xs}, {name[wt]}, {n}, {k}, o0, {ys}, "
            f"{parallel}, {name[bias]});",
            "}",
            "",
        ]
    )
    shape = "(" + "".join(f"{s}, " for s in yv.shape) + ")"
    stride = "(" + "".join(f"{s}, " for s in yv.stride()) + ")"
    return signature.kernel(body, nodes, [(shape, stride, yv.dtype)], symbol_sources)
