"""CUDA lowering: its CPU-side logic, and the Triton kernels vs references.

Kernel tests compare each yirage_cuda Triton op with the ATen reference of the yirage op
it replaces (yirage_dynamo/ops.py) on fresh random inputs: fp32 at tight tolerances, bf16
within a couple of bf16 rounding steps. Everything here skips cleanly without a GPU; the
CPU-side config cache runs anywhere; the lowering's choices: tests/test_cuda_choices.py.
The CUDA-graph runner and HF generate() end to end: tests/test_cuda_generate.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cuda_tol as _tol
from conftest import needs_triton
from yirage_dynamo.lowering.kernel_tuning import ConfigCache, bucket, search, shape_key

from yirage_dynamo.options import parse_options

pytestmark = pytest.mark.cuda


# --------------------------------------------------------------------------- CPU-side logic


def test_config_search_measures_once_then_hits_cache(tmp_path):
    calls = []

    def bench(cfg):
        calls.append(cfg["w"])
        return {1: 3.0, 2: 1.0, 4: 2.0}[cfg["w"]]

    stats: dict[str, int] = {}
    key = shape_key("k", "GPU X", n=bucket(3000), dt="bf16")
    cands = [{"w": 1}, {"w": 2}, {"w": 4}]
    assert search(ConfigCache(tmp_path), key, cands, bench, stats) == {"w": 2}
    assert calls == [1, 2, 4]
    # A fresh cache object (another process) reads the file: no re-measurement.
    assert search(ConfigCache(tmp_path), key, cands, bench, stats) == {"w": 2}
    assert calls == [1, 2, 4] and stats == {"misses": 1, "hits": 1}
    saved = json.loads((tmp_path / "triton_configs.json").read_text())
    assert saved["configs"][key]["w"] == 2 and "n4096" in key and "GPU X" in key


def test_config_search_skips_failing_candidates(tmp_path):
    def bench(cfg):
        if cfg["w"] == 1:
            raise RuntimeError("out of resources")
        return float(cfg["w"])

    assert search(ConfigCache(tmp_path), "k", [{"w": 1}, {"w": 8}], bench) == {"w": 8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inline_reference_turns_yirage_ops_into_aten_with_same_results(dtype):
    """The CUDA lowering's default for norm/rotary/activation ops: splice the reference's
    ATen ops into the graph (Inductor then fuses them). Runs on CPU: no kernels involved."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from yirage_dynamo.lowering.cuda_ops import inline_reference

    from yirage_dynamo import ops  # noqa: F401 - registers yirage::*

    def block(x, res, w, q, k, cos, sin, gate, up):
        h, new_res = torch.ops.yirage.rms_norm_residual(x, res, w, 1e-6)
        y = torch.ops.yirage.rms_norm(h, w, 1e-6, True)
        q2, k2 = torch.ops.yirage.rotary(q, k, cos, sin)
        act = torch.ops.yirage.gated_act(gate, up, "gelu_tanh")
        y2 = torch.ops.yirage.rms_norm(x, w, 1e-6, True)  # same signature: shared trace
        return y, new_res, q2, k2, act, y2

    args = [
        torch.randn(2, 3, 64, dtype=dtype),
        torch.randn(2, 3, 64, dtype=dtype),
        torch.randn(64, dtype=dtype),
        torch.randn(2, 3, 4, 16, dtype=dtype).transpose(1, 2),
        torch.randn(2, 3, 2, 16, dtype=dtype).transpose(1, 2),
        torch.randn(1, 1, 3, 16, dtype=dtype),
        torch.randn(1, 1, 3, 16, dtype=dtype),
        torch.randn(2, 3, 96, dtype=dtype),
        torch.randn(2, 3, 96, dtype=dtype),
    ]
    gm = make_fx(block, tracing_mode="fake")(*args)
    nodes = [n for n in gm.graph.nodes if getattr(n.target, "namespace", "") == "yirage"]
    assert len(nodes) == 5
    memo: dict = {}
    assert all(inline_reference(gm, n, memo) for n in nodes)
    assert len(memo) == 4
    gm.graph.lint()
    gm.recompile()
    assert not [n for n in gm.graph.nodes if getattr(n.target, "namespace", "") == "yirage"]
    for got, want in zip(gm(*args), block(*args)):
        torch.testing.assert_close(got, want, **_tol(dtype))


def test_ops_inserted_by_passes_are_decomposed_the_way_inductor_expects():
    """A pass may insert ops (aten.t) that AOTAutograd would have decomposed; Inductor
    refuses those, so the CUDA lowering re-decomposes them before handing over."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from yirage_dynamo.lowering.base import Capabilities
    from yirage_dynamo.lowering.cuda_ops import decompose_for_inductor
    from yirage_dynamo.passes.context import PassContext

    from yirage_dynamo.report import CompileReport

    def f(x, w):
        wt = torch.ops.aten.t.default(w)
        return x.mm(wt) + wt.sum()

    x, w = torch.randn(3, 4), torch.randn(5, 4)
    gm = make_fx(f, tracing_mode="fake")(x, w)
    ctx = PassContext(parse_options({}), CompileReport(), Capabilities("cuda"), [])
    assert decompose_for_inductor(gm, ctx) == 1
    gm.graph.lint()
    gm.recompile()
    assert torch.ops.aten.t.default not in {n.target for n in gm.graph.nodes}
    torch.testing.assert_close(gm(x, w), f(x, w))


# --------------------------------------------------------------------------- kernels

DTYPES = [torch.float32, torch.bfloat16]


def _ops():
    from yirage_dynamo.lowering import triton_kernels

    from yirage_dynamo import ops  # noqa: F401 - registers yirage::*

    return triton_kernels


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4096), (2, 5, 1000), (1, 64)])
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_triton_rms_norm_matches_reference(dtype, shape, weight_fp32):
    k = _ops()
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(shape[-1], device="cuda", dtype=dtype)
    ref = torch.ops.yirage.rms_norm(x, w, 1e-6, weight_fp32)
    out = k.rms_norm(x, w, 1e-6, weight_fp32, 4)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **_tol(dtype))
    # Non-contiguous rows (a strided view) and no weight.
    xs = torch.randn((*shape[:-1], 2 * shape[-1]), device="cuda", dtype=dtype)[..., ::2]
    torch.testing.assert_close(
        k.rms_norm(xs, None, 1e-5, False, 2),
        torch.ops.yirage.rms_norm(xs, None, 1e-5),
        **_tol(dtype),
    )


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rms_norm_residual_matches_reference(dtype):
    k = _ops()
    x, r = (torch.randn(2, 7, 2048, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.randn(2048, device="cuda", dtype=dtype)
    out, res = k.rms_norm_residual(x, r, w, 1e-5, False, 8)
    ref_out, ref_res = torch.ops.yirage.rms_norm_residual(x, r, w, 1e-5)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, **_tol(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_triton_gated_act_matches_reference(dtype, act):
    k = _ops()
    fused = torch.randn(3, 5, 2 * 1376, device="cuda", dtype=dtype)
    gate, up = fused.chunk(2, dim=-1)  # halves of one GEMM output: strided rows
    code = {"silu": 0, "gelu_tanh": 1}[act]
    out = k.gated_act(gate, up, code, 1024, 4)
    torch.testing.assert_close(out, torch.ops.yirage.gated_act(gate, up, act), **_tol(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_cos", [1, 2])
def test_triton_rotary_matches_reference(dtype, batch_cos):
    k = _ops()
    b, s, hq, hkv, d = 2, 5, 8, 2, 128
    # HF layout: projections viewed as [B, S, H, D] then transposed (non-contiguous).
    q = torch.randn(b, s, hq, d, device="cuda", dtype=dtype).transpose(1, 2)
    kk = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype).transpose(1, 2)
    ang = torch.randn(batch_cos, s, d // 2, device="cuda")
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(dtype).unsqueeze(1), ang.sin().to(dtype).unsqueeze(1)
    q2, k2 = k.rotary(q, kk, cos, sin)
    rq, rk = torch.ops.yirage.rotary(q, kk, cos, sin)
    torch.testing.assert_close(q2, rq, **_tol(dtype))
    torch.testing.assert_close(k2, rk, **_tol(dtype))


def _attention_inputs(b, hq, hkv, d, max_len, dtype, pos):
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype)
    kc = torch.randn(b, hkv, max_len, d, device="cuda", dtype=dtype)
    vc = torch.randn(b, hkv, max_len, d, device="cuda", dtype=dtype)
    # Poison the cache beyond the valid prefix: the kernel must never read it.
    kc[:, :, pos + 1 :] = float("nan")
    vc[:, :, pos + 1 :] = float("nan")
    return q, kc, vc, torch.tensor([pos], device="cuda")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(32, 32, 128), (32, 8, 64), (8, 1, 128), (12, 4, 80)])
@pytest.mark.parametrize("pos", [0, 37, 511])
def test_triton_decode_attention_matches_reference(dtype, hq, hkv, d, pos):
    k = _ops()
    b, max_len = 2, 512
    q, kc, vc, cp = _attention_inputs(b, hq, hkv, d, max_len, dtype, pos)
    scale = 1 / math.sqrt(d)
    # Reference on the valid prefix only (its own masking would multiply NaN by 0).
    ref = torch.ops.yirage.attention(
        q, kc[:, :, : pos + 1], vc[:, :, : pos + 1], None, scale, False, cp
    )
    counters = torch.zeros(b * hkv, dtype=torch.int32, device="cuda")
    for split, block_n, nw in [(64, 32, 2), (256, 64, 4), (1024, 128, 4)]:
        out = k.decode_attention(q, kc, vc, None, cp, scale, split, block_n, nw)
        assert out.shape == ref.shape
        # Same memory layout (strides of size-1 dims carry no information).
        assert [st for st, n in zip(out.stride(), out.shape) if n > 1] == [
            st for st, n in zip(ref.stride(), ref.shape) if n > 1
        ]
        torch.testing.assert_close(out, ref, **_tol(dtype))
        # The last split program merging instead of a merge kernel: same result, and
        # the counters back at zero for the next launch.
        for _ in range(2):
            merged = k.decode_attention(q, kc, vc, None, cp, scale, split, block_n, nw, counters)
            torch.testing.assert_close(merged, ref, **_tol(dtype))
            assert not counters.any()


@needs_triton
def test_triton_decode_attention_reads_no_further_than_the_cache_for_a_later_position():
    """cache_position past the cache's end (HF's counters run on when a step is replayed
    to time it): the valid prefix is the whole cache, and the last split, which reaches
    past the end (100 slots in splits of 64), reads nothing beyond it (NaN there)."""
    k = _ops()
    b, hq, hkv, d, max_len = 1, 8, 2, 64, 100
    q, kbuf, vbuf, _ = _attention_inputs(b, hq, hkv, d, 128, torch.bfloat16, max_len - 1)
    kc, vc = kbuf[:, :, :max_len], vbuf[:, :, :max_len]
    scale = 1 / math.sqrt(d)
    ref = torch.ops.yirage.attention(q, kc, vc, None, scale, False, None)
    out = k.decode_attention(q, kc, vc, None, torch.tensor([max_len + 5], device="cuda"), scale, 64, 32, 2)  # fmt: skip
    torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


@needs_triton
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_triton_decode_attention_applies_padding_mask(mask_dtype):
    k = _ops()
    b, hq, hkv, d, max_len, pos = 2, 8, 2, 64, 256, 100
    q, kc, vc, cp = _attention_inputs(b, hq, hkv, d, max_len, torch.float32, pos)
    keep = torch.ones(b, 1, 1, max_len, dtype=torch.bool, device="cuda")
    keep[0, ..., :10] = False  # left padding of the first sequence
    mask = keep if mask_dtype == torch.bool else torch.zeros_like(keep, dtype=mask_dtype)
    if mask_dtype != torch.bool:
        mask.masked_fill_(~keep, float("-inf"))
    ref = torch.ops.yirage.attention(
        q, kc[..., : pos + 1, :], vc[..., : pos + 1, :], mask[..., : pos + 1], None, False, cp
    )
    # 4 splits and a merge; one split over the whole cache, written directly.
    for split, block_n, nw in [(64, 32, 4), (256, 64, 4)]:
        out = k.decode_attention(q, kc, vc, mask, cp, 1 / math.sqrt(d), split, block_n, nw)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked_value", [float("-inf"), "finfo_min", "bool"])
def test_triton_decode_attention_without_cache_position_skips_masked_tail(dtype, masked_value):
    """HF's static-cache decode: no cache_position on the op, a [1, 1, 1, T] mask hiding
    every slot past the current position. Blocks the mask hides must not be read: the
    cache past the last 128-block holding a valid key is NaN (eager would give NaN)."""
    k = _ops()
    b, hq, hkv, d, max_len, pos = 1, 16, 4, 128, 1024, 300
    q, kc, vc, _ = _attention_inputs(b, hq, hkv, d, max_len, dtype, max_len - 1)
    tail = 384  # first 128-aligned slot after pos
    kc[:, :, pos + 1 : tail] = 1e3  # inside a live block: read, masked out by value
    vc[:, :, pos + 1 : tail] = 1e3
    kc[:, :, tail:] = float("nan")
    vc[:, :, tail:] = float("nan")
    keep = torch.arange(max_len, device="cuda") <= pos
    if masked_value == "bool":
        mask = keep.view(1, 1, 1, -1)
    else:
        fill = torch.finfo(dtype).min if masked_value == "finfo_min" else masked_value
        mask = torch.zeros(1, 1, 1, max_len, dtype=dtype, device="cuda")
        mask.masked_fill_(~keep.view(1, 1, 1, -1), fill)
    ref = torch.ops.yirage.attention(
        q, kc[:, :, :tail], vc[:, :, :tail], mask[..., :tail], None, False, None
    )
    for split, block_n, nw in [(128, 64, 4), (256, 128, 4), (1024, 32, 2)]:
        out = k.decode_attention(q, kc, vc, mask, None, 1 / math.sqrt(d), split, block_n, nw)
        torch.testing.assert_close(out, ref, **_tol(dtype))


@needs_triton
def test_triton_decode_attention_follows_cache_position_under_cuda_graph():
    k = _ops()
    b, hq, hkv, d, max_len = 1, 8, 2, 64, 1024
    q, kc, vc, _ = _attention_inputs(b, hq, hkv, d, max_len, torch.bfloat16, max_len - 1)
    cp = torch.tensor([5], device="cuda")
    counters = torch.zeros(b * hkv, dtype=torch.int32, device="cuda")
    # split + merge kernel; split, merged by the last program; one direct split
    for split, sem in ((128, None), (128, counters), (1024, None)):
        fn = lambda: k.decode_attention(q, kc, vc, None, cp, 0.125, split, 64, 4, sem)  # noqa: B023, E731
        cp.fill_(5)
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        for pos in (5, 300, 1023):
            cp.fill_(pos)
            graph.replay()
            ref = torch.ops.yirage.attention(
                q, kc[:, :, : pos + 1], vc[:, :, : pos + 1], None, 0.125, False, cp
            )
            torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


# --------------------------------------------------------------------------- GEMV


def test_gemv_candidates_fit_the_shape():
    from yirage_dynamo.lowering.cuda_gemv import _gemv_candidates

    cands = _gemv_candidates(4096, 4096)
    assert cands[0]["impl"] == "triton" and len(cands) == len({str(c) for c in cands})
    small = _gemv_candidates(3, 100)
    assert all(c["block_n"] <= 4 and c["block_k"] <= 128 for c in small)
    assert len(small) == len({str(c) for c in small})


def test_gemv_eligibility_on_a_decode_graph(monkeypatch):
    """Which mm/addmm nodes the GEMV substitution accepts (device-independent checks: the
    device test is pointed at CPU here)."""
    from yirage_dynamo.lowering import cuda_gemv

    aten = torch.ops.aten
    monkeypatch.setattr(cuda_gemv, "_GEMV_DEVICE", "cpu")
    root = torch.nn.Module()
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    root.register_buffer("w_t", w.t(), persistent=False)  # t(W): a frozen Linear weight
    root.register_buffer("w_rowmajor", w.t().contiguous(), persistent=False)
    g = torch.fx.Graph()
    x, big, x32 = g.placeholder("x"), g.placeholder("big"), g.placeholder("x32")
    wt, wr = g.get_attr("w_t"), g.get_attr("w_rowmajor")
    vals = {
        x: torch.randn(1, 32, dtype=torch.bfloat16),
        big: torch.randn(16, 32, dtype=torch.bfloat16),
        x32: torch.randn(2, 32),
        wt: root.w_t,
        wr: root.w_rowmajor,
    }
    nodes = {
        "ok": g.call_function(aten.mm.default, (x, wt)),
        "gemm": g.call_function(aten.mm.default, (big, wt)),
        "fp32": g.call_function(aten.mm.default, (x32, wt)),
        "layout": g.call_function(aten.mm.default, (x, wr)),
        "activation_weight": g.call_function(aten.mm.default, (x, x)),
    }
    g.output(tuple(nodes.values()))
    gm = torch.fx.GraphModule(root, g)
    for n, v in vals.items():
        n.meta["val"] = v
    got = {k: cuda_gemv._gemv_operands(gm, n) for k, n in nodes.items()}
    assert isinstance(got["ok"], tuple) and got["ok"][:3] == (x, wt, None)
    assert "GEMM" in got["gemm"]
    assert "fp16/bf16" in got["fp32"]
    assert "row-major" in got["layout"]
    assert "frozen constant" in got["activation_weight"]


def _gemv_inputs(m, n, k, dtype, bias):
    x = (torch.randn(m, k, device="cuda") / math.sqrt(k)).to(dtype)
    w = torch.randn(n, k, device="cuda").to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    return x, w, b


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m,n,k,bias",
    [(1, 4096, 4096, False), (1, 1000, 3000, True), (2, 37, 520, False), (2, 11008, 4096, True)]
    + [(1, 5, 100, False), (4, 300, 1111, False), (3, 64, 64, True)],
)
def test_triton_gemv_matches_mm(dtype, m, n, k, bias):
    from yirage_dynamo.lowering.cuda_gemv import _gemv_candidates

    kk = _ops()
    x, w, b = _gemv_inputs(m, n, k, dtype, bias)
    ref = torch.addmm(b, x, w.t()) if bias else torch.mm(x, w.t())
    for c in _gemv_candidates(n, k):
        out = kk.gemv(x, w.t(), b, c["block_n"], c["block_k"], c["num_warps"])
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
        torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))
    # A strided input row (a view of a wider activation) is read correctly too.
    xs = torch.cat([x, x], dim=1)[:, :k]
    torch.testing.assert_close(kk.gemv(xs, w.t(), b, 4, 512, 4), ref, **_tol(torch.bfloat16))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("m,n,k", [(1, 11008, 4096), (2, 1000, 3000), (1, 96, 256)])
def test_triton_gemv_gated_matches_reference(dtype, act, m, n, k):
    kk = _ops()
    x, wg, _ = _gemv_inputs(m, n, k, dtype, False)
    wu = torch.randn(n, k, device="cuda").to(dtype)
    ref = torch.ops.yirage.gated_act(x @ wg.t(), x @ wu.t(), act)
    code = {"silu": 0, "gelu_tanh": 1}[act]
    for bn, bk, nw in [(4, 512, 4), (2, 1024, 4), (16, 256, 4)]:
        out = kk.gemv_gated(x, wg.t(), wu.t(), code, bn, bk, nw)
        torch.testing.assert_close(out, ref, **_tol(torch.bfloat16))


@needs_triton
@pytest.mark.parametrize("m,ns,k", [(1, (4096, 1024, 1024), 4096), (2, (70, 33, 40), 300)])
def test_triton_gemv3_matches_three_mms(m, ns, k):
    kk = _ops()
    x = (torch.randn(m, k, device="cuda") / math.sqrt(k)).to(torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for n in ns]
    for bn, bk, nw in [(4, 2048, 4), (8, 512, 4), (1, 2048, 4)]:
        outs = kk.gemv3(x, *(w.t() for w in ws), bn, bk, nw)
        for out, w in zip(outs, ws):
            assert out.shape == (m, w.shape[0]) and out.is_contiguous()
            torch.testing.assert_close(out, x @ w.t(), **_tol(torch.bfloat16))


def _rms(x, w, eps=1e-6):
    return torch.ops.yirage.rms_norm(x, w, eps)


@needs_triton
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (2, 300, 1111), (3, 64, 96)])
def test_triton_gemvs_with_rms_norm_prologue_match_norm_then_matmul(m, n, k):
    """norm_weight=w: the GEMV reads the un-normalised row and applies RMSNorm itself."""
    kk = _ops()
    dt = torch.bfloat16
    x = (torch.randn(m, k, device="cuda") * 3 + 1).to(dt)
    wn = (torch.rand(k, device="cuda") + 0.5).to(dt)
    ws = [(torch.randn(n, k, device="cuda") / math.sqrt(k)).to(dt) for _ in range(3)]
    y = _rms(x, wn)
    tol = _tol(dt)
    for bn, bk, nw in [(4, 512, 4), (1, 2048, 4), (8, 256, 4)]:
        out = kk.gemv(x, ws[0].t(), None, bn, bk, nw, norm_weight=wn, eps=1e-6)
        torch.testing.assert_close(out, y @ ws[0].t(), **tol)
        outs = kk.gemv3(x, *(w.t() for w in ws), bn, bk, nw, norm_weight=wn, eps=1e-6)
        for o, w in zip(outs, ws):
            torch.testing.assert_close(o, y @ w.t(), **tol)
        g = kk.gemv_gated(x, ws[0].t(), ws[1].t(), 0, bn, bk, nw, norm_weight=wn, eps=1e-6)
        ref = torch.ops.yirage.gated_act(y @ ws[0].t(), y @ ws[1].t(), "silu")
        torch.testing.assert_close(g, ref, **tol)


@needs_triton
@pytest.mark.parametrize("m,n,k,bias", [(1, 4096, 11008, False), (2, 100, 300, True)])
def test_triton_gemv_with_residual_epilogue_matches_add(m, n, k, bias):
    kk = _ops()
    dt = torch.bfloat16
    x, w, b = _gemv_inputs(m, n, k, dt, bias)
    r = torch.randn(m, n, device="cuda").to(dt)
    mm = torch.addmm(b, x, w.t()) if bias else torch.mm(x, w.t())
    out = kk.gemv(x, w.t(), b, 4, 512, 4, residual=r)
    # The same two roundings as the unfused graph (mm, then the add): equal up to the
    # accumulation order inside the dot products.
    torch.testing.assert_close(out, r + mm, **_tol(dt))
    wide = torch.randn(m, 2 * n, device="cuda").to(dt)[:, ::2]  # strided residual rows
    torch.testing.assert_close(
        kk.gemv(x, w.t(), b, 4, 512, 4, residual=wide), wide + mm, **_tol(dt)
    )


@needs_triton
def test_gemv_compiled_in_the_workers_is_the_kernel_its_launch_runs():
    """Recorded GEMV launches compile in forked workers; the real launches then load those
    binaries from Triton's cache (same hashes) instead of compiling again."""
    from yirage_dynamo.lowering import triton_gemv, triton_pool

    kk = _ops()
    x, w, _ = _gemv_inputs(1, 768, 1536, torch.float16, False)
    cfgs = [(2, 256, 2), (1, 256, 2)]  # launched by no other test: not compiled here yet
    with triton_pool.recording() as launches:
        for cfg in cfgs:
            kk.gemv(x, w.t(), None, *cfg)
    assert len(launches) == 2 and {spec[1] for spec in launches} == {"_gemv_kernel"}
    hashes = triton_pool.precompile(launches)
    assert len(hashes) == 2
    for cfg in cfgs:
        out = kk.gemv(x, w.t(), None, *cfg)
        torch.testing.assert_close(out, x @ w.t(), **_tol(torch.bfloat16))
    compiled = triton_gemv._gemv_kernel.device_caches[torch.cuda.current_device()][0]
    assert set(hashes) <= {k.hash for k in compiled.values()}


@needs_triton
def test_workers_also_build_the_launchers_so_the_first_launch_only_loads_them(
    monkeypatch, tmp_path
):
    """Triton launches through a C extension it builds per argument signature (~0.3 s of
    gcc on a kernel's first launch): the forked workers build it into the cache too."""
    import sys

    import triton.runtime.build as build
    from yirage_dynamo.lowering import triton_pool

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # no launcher built yet
    builds: list = []
    real = build._build

    def counting(*args, **kwargs):
        builds.append(args[0] if args else kwargs.get("name"))
        return real(*args, **kwargs)

    for mod in (build, sys.modules.get("triton.backends.nvidia.driver")):
        if hasattr(mod, "_build"):
            monkeypatch.setattr(mod, "_build", counting)
    kk = _ops()
    x, w, _ = _gemv_inputs(1, 768, 1536, torch.float16, False)
    cfgs = [(2, 128, 4), (1, 128, 4)]  # launched by no other test; one alone is not forked
    with triton_pool.recording() as launches:
        for cfg in cfgs:
            kk.gemv(x, w.t(), None, *cfg)
    assert len(triton_pool.precompile(launches)) == 2
    assert list(tmp_path.rglob("__triton_launcher*")), "no launcher in the fresh cache"
    for cfg in cfgs:
        out = kk.gemv(x, w.t(), None, *cfg)
        torch.testing.assert_close(out, x @ w.t(), **_tol(torch.bfloat16))
    assert builds == []  # the workers' builds ran in their own processes


@needs_triton
def test_triton_gemv_replays_under_cuda_graph():
    kk = _ops()
    x, w, _ = _gemv_inputs(1, 2048, 2048, torch.bfloat16, False)
    kk.gemv(x, w.t(), None, 4, 512, 4)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kk.gemv(x, w.t(), None, 4, 512, 4)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, x @ w.t(), **_tol(torch.bfloat16))
