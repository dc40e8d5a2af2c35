"""CPU decode attention: `yirage::attention` as a C++/OpenMP kernel of the graph's library.

The reference (SDPA with enable_gqa) costs ~25 µs of host time per call at decode shapes,
more than the work. Here each eligible attention node is outlined into a one-node region
(`call_module`, like a fused region) whose kernel is rendered below, compiled with the
other kernels (lowering/cpu.py) and called through `cpp_build.make_launcher`: the
fast call path, stride guards (other strides run the region, i.e. the op's reference),
`out=` into the memory plan, and the whole-graph cache all work as for fused regions.

Kernel: one work item per (batch, kv head, query position) computes all G = Hq / Hkv query
heads of that group, so each K/V row is read once per group (GQA without repeat_kv).
Scores are fp32 (bf16/fp16 are converted on load), softmax is the safe one (max, then
exp-sum), accumulators are fp32. Keys hidden by a bool mask, a -inf additive mask, the
causal rule or cache_position are skipped without reading K/V. Keys under a huge negative
additive mask (HF's finfo.min for unwritten static-cache slots) are skipped too when the
row has an ordinary score, because their exp underflows to exactly 0 against that max; if
the row has none they are computed, so the result matches the reference either way. A row
with no visible key gives zeros, as the ATen CPU kernels do.

Not handled (the node keeps its ATen reference; the report says why): dtypes other than
fp32/bf16/fp16 (or q/k/v of different dtypes), masks that do not broadcast to
[B, Hq, S, T], non-constant scale, k/v batch or head-dim mismatches.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.fx import GraphModule, Node

from yirage_dynamo import ops

from .c_attention_graph import output_views, strip_repeat_kv
from .c_ops import RenderedKernel, Unsupported, region_graph, region_module
from .c_renderer import CRenderer, Signature

ATTENTION = ops.OPS["attention"]
_FLOAT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_STORAGE = {torch.float32: "float", torch.bfloat16: "uint16_t", torch.float16: "uint16_t"}
# Mask kinds: 0 none, 1 bool, 2 + float kind (additive).  cache_position kinds: 0 none,
# 1 int64, 2 int32.
_CP_KIND = {torch.int64: 1, torch.int32: 2}
_CP_STORAGE = {torch.int64: "int64_t", torch.int32: "int32_t"}
# Work (multiply-adds, at full cache length) below which the kernel stays serial: an
# OpenMP fork/join costs more than a small decode step.
PARALLEL_WORK = 1 << 19
REGION_TAG = "yirage_cpu_attention"
# The kernel keeps a group's scaled queries and accumulators (G x head dim floats each)
# on the stack.
MAX_GROUP_FLOATS = 8192

_IMPL = r"""
#ifndef YIRAGE_ATTN_IMPL
#define YIRAGE_ATTN_IMPL
#include <cstdlib>
namespace yattn {
template <int K> static inline float ld(const void* p, int64_t i) {
  if (K == 0) return ((const float*)p)[i];
  if (K == 1) return y_bf16_to_f(((const uint16_t*)p)[i]);
  return y_f16_to_f(((const uint16_t*)p)[i]);
}
template <int K> static inline void st(void* p, int64_t i, float v) {
  if (K == 0) ((float*)p)[i] = v;
  else if (K == 1) ((uint16_t*)p)[i] = y_f_to_bf16(v);
  else ((uint16_t*)p)[i] = y_f_to_f16(v);
}
// exp for softmax (x <= 0): Cephes-style polynomial, ~2 ulp, vectorisable (libm's expf
// is a call per element); below -87 it flushes to 0 where expf gives a denormal.
static inline float fexp(float x) {
  const float c = x < -87.0f ? -87.0f : x;
  const float n = std::floor(c * 1.44269504088896341f + 0.5f);
  const float r = c - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float p2 = __builtin_bit_cast(float, ((int32_t)n + 127) << 23);
  return y * p2 * (float)(x >= -87.0f);  // a multiply, not a branch: it vectorises
}
// y_vf16 etc.: the prelude's compiler vectors.
typedef y_vf16 vf16;
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));
// fexp on 16 lanes (same polynomial; NaN stays NaN).
static inline vf16 fexp16(vf16 x) {
  const vf16 zero = {};
  const vf16 c = x < -87.0f ? zero - 87.0f : x;  // max(x, -87); NaN compares false
  // Nearest integer of c / ln2 by the 1.5 * 2^23 trick (c >= -87: far inside its range);
  // it differs from the scalar floor(x + 0.5) only at exact halves, where either n keeps
  // the reduced argument within the polynomial's range.
  const vf16 n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vf16 r = c - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf16 y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  const vf16 res = y * (vf16)e;
  return x != x ? x : (x < -87.0f ? zero : res);
}
// q . k over D features. With an `omp simd` reduction GCC finishes each dot lane by lane,
// in order, through memory (16 dependent adds): explicit vectors with a tree reduction are
// several times faster. Other layouts take the plain loop.
template <int QK, int D>
static inline float dot(const float* qj, const void* k, int64_t kr, int64_t ks) {
  if constexpr (D % 16 == 0 && QK != 2) {
    if (ks == 1) {
      vf16 a = {};
      for (int d = 0; d < D; d += 16) {
        vf16 kv;
        if (QK == 0) {
          kv = y_load16((const float*)k + kr + d);
        } else {  // bf16: the high half of an fp32
          vh16 h;
          __builtin_memcpy(&h, (const uint16_t*)k + kr + d, 32);
          kv = (vf16)(__builtin_convertvector(h, vi16) << 16);
        }
        a += y_load16(qj + d) * kv;
      }
      return y_hsum16(a);
    }
  }
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int d = 0; d < D; ++d) acc += qj[d] * ld<QK>(k, kr + d * ks);
  return acc;
}
struct Geo {
  int64_t B, Hq, Hkv, S, T, D, Dv;
  int64_t q[4], k[4], v[4], m[4], o[4], cp;
  float scale;
  bool causal;
};
// Additive mask values below this are "huge negative" (finfo.min-style padding); their
// scores are deferred, marked kDeferred (no computed score can be that low).
static constexpr float kHuge = -1e30f;
static constexpr float kDeferred = -3.4028234663852886e38f;

// One (batch, kv head, query position) item: the G query heads of the group.
template <int QK, int MK, int CK, int G, int D, int Dv>
static inline __attribute__((always_inline)) void item(
    const Geo& g, const void* q, const void* k, const void* v, const void* m,
    const void* cp, void* o, int64_t it, float* buf) {
  const int64_t T = g.T;
  const int64_t s = it % g.S, h = (it / g.S) % g.Hkv, b = it / (g.S * g.Hkv);
  int64_t lim = T;  // keys [0, lim) may be visible
  if (CK) {
    const int64_t c = CK == 1 ? ((const int64_t*)cp)[s * g.cp] : ((const int32_t*)cp)[s * g.cp];
    lim = c + 1 < lim ? c + 1 : lim;
  } else if (g.causal) {
    lim = s + 1 < lim ? s + 1 : lim;
  }
  if (lim < 0) lim = 0;
  const int64_t mb = b * g.m[0] + s * g.m[2];
  // Mask checks once per key when the mask is shared by the group's heads.
  const int64_t mh = g.m[1] == 0 ? 1 : G;
  if (MK != 0) {
    // Trim the hidden tail (e.g. unwritten static-cache slots): keys after the last one
    // with an ordinary mask value add exactly 0 once the row has an ordinary score.
    int64_t hi = lim;
    for (bool hidden = true; hidden && hi > 0;) {
      for (int64_t j = 0; j < mh && hidden; ++j) {
        const int64_t mi = mb + (h * G + j) * g.m[1] + (hi - 1) * g.m[3];
        if (MK == 1) hidden = !((const bool*)m)[mi];
        else hidden = !(ld<(MK >= 2 ? MK - 2 : 0)>(m, mi) >= kHuge);
      }
      if (hidden) --hi;
    }
    if (hi > 0 || MK == 1) lim = hi;  // no ordinary key at all: the general path decides
  }
  // G, D, Dv are compile-time: the head loops unroll, each K/V row is loaded once for
  // the group and the accumulators can stay in registers.
  float* sc = buf;  // [G, T] scores (-inf: not visible)
  float qf[G * D], acc[G * Dv], mx[G], sum[G];
  bool huge_any = false;
  for (int64_t j = 0; j < G; ++j) {
    const int64_t qb = b * g.q[0] + (h * G + j) * g.q[1] + s * g.q[2];
    for (int64_t d = 0; d < D; ++d) qf[j * D + d] = ld<QK>(q, qb + d * g.q[3]) * g.scale;
    mx[j] = -INFINITY;
  }
  const int64_t kb = b * g.k[0] + h * g.k[1], vb = b * g.v[0] + h * g.v[1];
  for (int64_t t = 0; t < lim; ++t) {
    const int64_t kr = kb + t * g.k[2];
    float add = 0.0f;
    int state = 0;  // 0: compute the score, 1: hidden, 2: deferred (huge negative mask)
    for (int64_t j = 0; j < G; ++j) {
      if (MK != 0 && (j == 0 || mh != 1)) {
        const int64_t mi = mb + (h * G + j) * g.m[1] + t * g.m[3];
        if (MK == 1) {
          state = ((const bool*)m)[mi] ? 0 : 1;
        } else {
          add = ld<(MK >= 2 ? MK - 2 : 0)>(m, mi);
          state = add == -INFINITY ? 1 : (add < kHuge ? 2 : 0);
        }
      }
      if (state == 1) { sc[j * T + t] = -INFINITY; continue; }
      if (state == 2) { sc[j * T + t] = kDeferred; huge_any = true; continue; }
      sc[j * T + t] = dot<QK, D>(qf + j * D, k, kr, g.k[3]) + add;
    }
  }
  for (int64_t j = 0; j < G; ++j) {
    float m_ = -INFINITY;  // kDeferred is below every computed score
#pragma omp simd reduction(max : m_)
    for (int64_t t = 0; t < lim; ++t) m_ = sc[j * T + t] > m_ ? sc[j * T + t] : m_;
    mx[j] = m_ == kDeferred ? -INFINITY : m_;
    // Deferred huge-negative keys: exactly 0 after exp against an ordinary max; computed
    // (they decide the result) only when the row has no ordinary score.
    const bool compute_huge = huge_any && !(mx[j] > kHuge * 0.1f);
    for (int64_t t = 0; t < lim; ++t) {
      float x = sc[j * T + t];
      if (x != kDeferred) continue;
      if (!compute_huge) { sc[j * T + t] = -INFINITY; continue; }
      const float add = ld<(MK >= 2 ? MK - 2 : 0)>(m, mb + (h * G + j) * g.m[1] + t * g.m[3]);
      x = dot<QK, D>(qf + j * D, k, kb + t * g.k[2], g.k[3]) + add;
      sc[j * T + t] = x;
      mx[j] = x > mx[j] ? x : mx[j];
    }
    float s_ = 0.0f;
    const float mj = mx[j] == -INFINITY ? 0.0f : mx[j];  // all hidden: every p is 0
    float* __restrict__ row = sc + j * T;
    const int n = (int)lim;
    int t0 = 0;
    t0 = n - n % 16;  // GCC leaves fexp's loop scalar: 16 lanes by hand
    for (int t = 0; t < t0; t += 16) y_store16(row + t, fexp16(y_load16(row + t) - mj));
    for (int t = t0; t < n; ++t) row[t] = fexp(row[t] - mj);
#pragma omp simd reduction(+ : s_)
    for (int t = 0; t < n; ++t) s_ += row[t];
    sum[j] = s_;
    for (int64_t d = 0; d < Dv; ++d) acc[j * Dv + d] = 0.0f;
  }
  for (int64_t t = 0; t < lim; ++t) {
    const int64_t vr = vb + t * g.v[2];
    for (int64_t j = 0; j < G; ++j) {
      const float p = sc[j * T + t];
      if (p == 0.0f) continue;  // hidden key: its V row is never read
      float* a = acc + j * Dv;
      if (QK == 0 && g.v[3] == 1) {
        const float* vr0 = (const float*)v + vr;
#pragma omp simd
        for (int64_t d = 0; d < Dv; ++d) a[d] += p * vr0[d];
      } else {
#pragma omp simd
        for (int64_t d = 0; d < Dv; ++d) a[d] += p * ld<QK>(v, vr + d * g.v[3]);
      }
    }
  }
  for (int64_t j = 0; j < G; ++j) {
    // No visible key: zeros, as ATen's CPU attention kernels give.
    const float inv = sum[j] > 0.0f ? 1.0f / sum[j] : 0.0f;
    const int64_t ob = b * g.o[0] + (h * G + j) * g.o[1] + s * g.o[2];
    for (int64_t d = 0; d < Dv; ++d) st<QK>(o, ob + d * g.o[3], acc[j * Dv + d] * inv);
  }
}

template <int QK, int MK, int CK, int G, int D, int Dv>
static inline __attribute__((always_inline)) void run(
    const Geo& g, const void* q, const void* k, const void* v, const void* m,
    const void* cp, void* o, int64_t parallel_work) {
  const int64_t items = g.B * g.Hkv * g.S;
  const size_t need = (size_t)(G * g.T);
  if (items > 1 && items * G * g.T * (g.D + g.Dv) >= parallel_work) {
#pragma omp parallel
    {
      float* buf = (float*)std::malloc(need * sizeof(float));
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) item<QK, MK, CK, G, D, Dv>(g, q, k, v, m, cp, o, it, buf);
      std::free(buf);
    }
  } else {  // small (decode) steps never enter the OpenMP runtime
    static thread_local float* buf = nullptr;
    static thread_local size_t cap = 0;
    if (cap < need) {
      std::free(buf);
      buf = (float*)std::malloc(need * sizeof(float));
      cap = need;
    }
    for (int64_t it = 0; it < items; ++it) item<QK, MK, CK, G, D, Dv>(g, q, k, v, m, cp, o, it, buf);
  }
}
}  // namespace yattn
#endif
"""


def is_attention_region(region: Any) -> bool:
    return getattr(region, "meta", {}).get(REGION_TAG, False) if region is not None else False


def _args(node: Node) -> dict[str, Any]:
    names = ("q", "k", "v", "attn_mask", "scale", "is_causal", "cache_position")
    defaults = (None, None, None, None, None, False, None)
    a = dict(zip(names, defaults))
    a.update(zip(names, node.args))
    a.update(node.kwargs)
    return a


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, Node) else x


# Encoder-style attention at or past this many query x key pairs goes to ATen: measured
# inside compiled graphs (2 threads), our speed over ATen at batch 16, 12 heads, head dim 32,
# bool padding mask: 1.86x at 16 x 16, 0.94x at 32 x 32, 0.55x at 64 x 64, 0.46x at 128.
ENCODER_ATEN_MIN = 64 * 64


def why_not(node: Node) -> str | None:
    """Why this yirage::attention node cannot run the C++ kernel (None when it can)."""
    r = CRenderer()
    a = _args(node)
    q, k, v = _val(a["q"]), _val(a["k"]), _val(a["v"])
    mask, cp = _val(a["attn_mask"]), _val(a["cache_position"])
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q/k/v are not tensors"
    if q.dtype not in _FLOAT_KIND or len({q.dtype, k.dtype, v.dtype}) != 1:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (fp32, bf16 or fp16 of one dtype only)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q/k/v are not 4-D"
    if any(t.device.type != "cpu" for t in (q, k, v)):
        return "not CPU tensors"
    b, hq, _, d = q.shape
    if not (r.same(k.shape[0], b) and r.same(v.shape[0], b) and r.same(k.shape[3], d)):
        return "k/v batch or head dim differ from q"
    # Key and value lengths may be different size symbols (Dynamo gives a static cache's
    # K and V their own): the launcher then checks that they are equal at run time.
    symbolic_t = isinstance(k.shape[2], torch.SymInt) and isinstance(v.shape[2], torch.SymInt)
    if not (r.same(k.shape[1], v.shape[1]) and (symbolic_t or r.same(k.shape[2], v.shape[2]))):
        return "k and v shapes differ"
    if isinstance(hq, torch.SymInt) or isinstance(k.shape[1], torch.SymInt):
        return "symbolic head counts"
    if hq % k.shape[1]:
        return "query heads not a multiple of kv heads"
    dims = (d, v.shape[3])
    if any(isinstance(x, torch.SymInt) for x in dims):
        return "symbolic head dim"
    if hq // k.shape[1] * max(dims) > MAX_GROUP_FLOATS:
        return f"group too large (G * head dim > {MAX_GROUP_FLOATS}: stack arrays)"
    if a["scale"] is not None and not isinstance(a["scale"], float | int):
        return "non-constant scale"
    if not isinstance(a["is_causal"], bool):
        return "non-constant is_causal"
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() > 4:
            return "attn_mask is not a tensor of at most 4 dims"
        if mask.dtype != torch.bool and mask.dtype not in _FLOAT_KIND:
            return f"attn_mask dtype {mask.dtype}"
        target = (b, hq, q.shape[2], k.shape[2])
        for ms, ts in zip(reversed(mask.shape), reversed(target)):
            if not (r.is_one(ms) or r.same(ms, ts)):
                return f"attn_mask {tuple(mask.shape)} does not broadcast to [B, Hq, S, T]"
    if cp is not None:
        if not isinstance(cp, torch.Tensor) or cp.dtype not in _CP_KIND or cp.dim() != 1:
            return "cache_position is not a 1-D int32/int64 tensor"
        if not (r.is_one(cp.shape[0]) or r.same(cp.shape[0], q.shape[2])):
            return "cache_position length differs from the query length"
    lq, lk = q.shape[2], k.shape[2]
    dense = not a["is_causal"] and cp is None and isinstance(lq, int) and isinstance(lk, int)
    if dense and lq * lk >= ENCODER_ATEN_MIN:
        # Encoder attention: every query over every key, nothing to skip. ATen's flash
        # kernel works in GEMM-sized blocks; this kernel, made for decode (a few queries
        # over a cache it reads only up to the written prefix), is slower there.
        return f"{lq} queries x {lk} keys, no causal or cache bound: ATen's blocked SDPA"
    return None


# Benchmark/debug switch: "0" keeps yirage::attention on its ATen reference.
ENABLE_ENV = "YIRAGE_CPU_ATTENTION"


def outline_attention(gm: GraphModule, ctx: Any) -> int:
    """Replace each eligible yirage::attention node by a call_module one-node region.

    YIRAGE_CPU_ATTENTION=0 turns this off (every node keeps its ATen reference)."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not ATTENTION:
            continue
        strip_repeat_kv(gm, node)
        why = why_not(node)
        if why is not None:
            ctx.report.notes.append(f"attention {node.name} left to its ATen reference: {why}")
            continue
        a = _args(node)
        inputs = [a[n] for n in ("q", "k", "v", "attn_mask", "cache_position")]
        inputs = [x for x in inputs if isinstance(x, Node)]
        sub, env = region_graph(inputs)
        env[node] = sub.node_copy(node, env.__getitem__)
        chain = output_views(node)
        for v in chain:
            env[v] = sub.node_copy(v, env.__getitem__)
        sub.output(env[chain[-1] if chain else node])
        name, region = region_module(gm, sub, "attention", count, REGION_TAG)
        try:
            render_attention(region)  # e.g. size symbols no input binds: keep the node
        except Unsupported as exc:
            ctx.report.notes.append(f"attention {node.name} left to its ATen reference: {exc}")
            continue
        gm.add_submodule(name, region)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, tuple(inputs))
        end = chain[-1] if chain else node
        new.meta = dict(end.meta)
        end.replace_all_uses_with(new)
        for n in [*reversed(chain), node]:
            gm.graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


def render_attention(region: GraphModule) -> RenderedKernel:
    """The kernel of a region made by `outline_attention` (see the module docstring)."""
    r = CRenderer()
    nodes = list(region.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    # A cache grown by cat (HF's dynamic cache) has length s0 + s1: read it as one size.
    r.bind_derived_sizes(placeholders)
    node = next(n for n in nodes if n.op == "call_function")
    # The region's result: the attention output itself, or a contiguous view chain of it
    # (`output_views`): the kernel writes with the attention strides either way.
    final = next(n for n in nodes if n.op == "output").args[0]
    a = _args(node)
    q, k, v = _val(a["q"]), _val(a["k"]), _val(a["v"])
    mask, cp, out = _val(a["attn_mask"]), _val(a["cache_position"]), _val(node)
    b, hq, s, d = q.shape
    hkv, t, dv = k.shape[1], k.shape[2], v.shape[3]
    target = (b, hq, s, t)

    def strides(x: torch.Tensor, shape: tuple) -> list[str]:
        # Size-1 and broadcast dims are read at index 0: stride 0.
        lead = len(shape) - x.dim()
        st = list(x.stride())
        return [
            "0" if i < lead or r.is_one(x.shape[i - lead]) else r.size(st[i - lead])
            for i in range(len(shape))
        ]

    geo = [r.size(x) for x in (b, hq, hkv, s, t, d, dv)]
    arrays = [strides(q, q.shape), strides(k, k.shape), strides(v, v.shape)]
    arrays.append(strides(mask, target) if mask is not None else ["0"] * 4)
    arrays.append(strides(out, out.shape))
    cp_stride = strides(cp, cp.shape)[0] if cp is not None else "0"
    # As the reference: 1/sqrt(D) in double, then one rounding to float.
    scale = float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(d)
    qk = _FLOAT_KIND[q.dtype]
    mk = 0 if mask is None else (1 if mask.dtype == torch.bool else 2 + _FLOAT_KIND[mask.dtype])
    ck = 0 if cp is None else _CP_KIND[cp.dtype]

    signature = Signature(r)
    ptr = {}
    for i, ph in enumerate(placeholders):
        pv = _val(ph)
        ct = _CP_STORAGE.get(pv.dtype) or ("bool" if pv.dtype == torch.bool else None)
        signature.tensor(i, pv, "const " + (ct or _STORAGE[pv.dtype]) + "*")
        ptr[ph] = f"p{i}"
    signature.output(0, f"{_STORAGE[out.dtype]}*")
    guards = []
    if not r.same(t, v.shape[2]):  # the kernel reads V over K's length (see why_not)
        guards.append(f"{r.py_size(t)} == {r.py_size(v.shape[2])}")
    symbol_sources = signature.symbols(placeholders)

    def p(x: Any) -> str:
        return ptr[x] if isinstance(x, Node) else "nullptr"

    init = ", ".join(geo) + ", " + ", ".join("{" + ", ".join(arr) + "}" for arr in arrays)
    init += f", {cp_stride}, (float){scale!r}, {'true' if a['is_causal'] else 'false'}"
    call = ", ".join(
        ["g", p(a["q"]), p(a["k"]), p(a["v"]), p(a["attn_mask"]), p(a["cache_position"])]
    )
    body = _IMPL + "\n".join(
        [
            f'extern "C" void FUNC({", ".join(signature.sig)}) {{',
            f"  const yattn::Geo g{{{init}}};",
            f"  yattn::run<{qk}, {mk}, {ck}, {hq // hkv}, {d}, {dv}>({call}, o0, {PARALLEL_WORK});",
            "}",
            "",
        ]
    )
    fv = _val(final)
    shape = "(" + "".join(r.py_size(x) + ", " for x in fv.shape) + ")"
    stride = "(" + "".join(r.py_size(x) + ", " for x in fv.stride()) + ")"
    return signature.kernel(
        body, nodes, [(shape, stride, out.dtype)], symbol_sources, guards=guards
    )
