"""CPU lowering: yirage::attention as a C++ kernel (lowering/c_attention.py)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import wrapper_call_of

import yirage_dynamo
from yirage_dynamo import ops  # noqa: F401 - registers torch.ops.yirage

OPTS = {"fallback": "error", "graph_cache": False, "device": "cpu"}


def _attn(q, k, v, mask=None, scale=None, is_causal=False, cache_position=None):
    return torch.ops.yirage.attention(q, k, v, mask, scale, is_causal, cache_position)


def _eager_sdpa(q, k, v, mask=None, scale=None, is_causal=False, cache_position=None):
    """Plain SDPA with repeated K/V and the visibility folded into a bool/float mask."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s, t = q.shape[2], k.shape[2]
    vis = None
    if cache_position is not None:
        vis = torch.arange(t) <= cache_position.reshape(-1, 1).long()
    elif is_causal:
        vis = torch.arange(t) <= torch.arange(s).reshape(-1, 1)
    if vis is not None:
        if mask is None:
            mask = vis
        elif mask.dtype == torch.bool:
            mask = mask & vis
        else:
            mask = mask.masked_fill(~vis, float("-inf"))
    scores = (q.float() @ k.float().transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf"))
            if mask.dtype == torch.bool
            else (scores + mask.float())
        )
    # Rows with no visible key give zeros (what ATen's CPU kernels do).
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return (p @ v.float()).to(q.dtype)


def _run(args: tuple, kwargs: dict | None = None, dtype=torch.float32, expect_kernel=True):
    kwargs = kwargs or {}
    torch._dynamo.reset()
    yirage_dynamo.clear_reports()
    compiled = torch.compile(_attn, backend="yirage", options=OPTS, dynamic=False)
    out = compiled(*args, **kwargs)
    ref = _attn(*args, **kwargs)
    eager = _eager_sdpa(*args, **kwargs)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out, eager, **tol)
    assert out.transpose(1, 2).is_contiguous()  # the pinned [B, S, H, D] layout
    report = yirage_dynamo.last_report()
    used = [k for k in report.kernels if any("yirage.attention" in o for o in k.origins)]
    assert bool(used) == expect_kernel, (report.kernels, report.notes)
    return out, report


def _qkv(b, hq, hkv, s, t, d, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("mask_kind", ["none", "float", "bool"])
def test_decode_matches_reference(dtype, heads, mask_kind):
    hq, hkv = heads
    q, k, v = _qkv(2, hq, hkv, 1, 37, 64, dtype)  # T = 37: no block size divides it
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 1, 37, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        # HF static cache: written slots 0, unwritten ones finfo.min.
        mask = torch.zeros(2, 1, 1, 37, dtype=dtype)
        mask[0, ..., 20:] = torch.finfo(dtype).min
        mask[1, ..., 30:] = float("-inf")
    _run((q, k, v, mask), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_causal_and_float_mask(dtype):
    q, k, v = _qkv(1, 6, 2, 5, 5, 32, dtype)
    _run((q, k, v, None, None, True), dtype=dtype)
    mask = torch.randn(1, 1, 5, 5).to(dtype)
    _run((q, k, v, mask, 0.3, True), dtype=dtype)


def test_cache_position_and_per_head_bool_mask():
    q, k, v = _qkv(1, 4, 2, 3, 19, 16)
    cp = torch.tensor([4, 5, 6])
    _run((q, k, v, None, None, False, cp))
    mask = torch.rand(1, 4, 3, 19, generator=torch.Generator().manual_seed(2)) > 0.5
    _run((q, k, v, mask, None, False, cp))
    _run((q, k, v, None, None, False, cp.to(torch.int32)))


def test_non_contiguous_query_and_broadcast_mask():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 6, 32, generator=g).transpose(1, 2)  # [B, H, S, D] view of BSHD
    k = torch.randn(2, 3, 11, 32, generator=g)
    v = torch.randn(2, 3, 11, 32, generator=g)
    assert not q.is_contiguous()
    mask = torch.randn(3, 11, generator=g)  # [S, T]: broadcast over batch and heads
    _run((q, k, v, mask))


def test_fully_masked_rows():
    q, k, v = _qkv(1, 4, 2, 2, 9, 16)
    bool_mask = torch.ones(1, 1, 2, 9, dtype=torch.bool)
    bool_mask[..., 0, :] = False
    out, _ = _run((q, k, v, bool_mask))
    assert out[:, :, 0].abs().max() == 0
    inf_mask = torch.zeros(1, 1, 2, 9).masked_fill(~bool_mask, float("-inf"))
    _run((q, k, v, inf_mask))
    # A row of finfo.min only is not hidden: softmax of equal scores (the deferred path).
    huge = torch.zeros(1, 1, 2, 9).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    out, _ = _run((q, k, v, huge))
    assert out[:, :, 0].abs().max() > 0
    _run((q, k, v, None, None, False, torch.tensor([-1, 3])))


def test_unsupported_case_keeps_reference_with_note():
    q, k, v = _qkv(1, 4, 2, 2, 9, 16)
    cp = torch.tensor([3, 4], dtype=torch.int16)
    _, report = _run((q, k, v, None, None, False, cp), expect_kernel=False)
    assert any("left to its ATen reference" in n and "cache_position" in n for n in report.notes)


def test_encoder_sized_attention_goes_to_atens_sdpa_and_smaller_stays_ours():
    """Every query over every key with no causal or cache bound: from 64 x 64 pairs on,
    ATen's blocked SDPA is faster than this decode-shaped kernel (RESULTS.md)."""
    mask = torch.rand(2, 1, 1, 64) > 0.2
    mask[..., 0] = True
    q, k, v = _qkv(2, 4, 4, 64, 64, 32)
    _, report = _run((q, k, v, mask), expect_kernel=False)
    assert any("64 queries x 64 keys" in n and "ATen" in n for n in report.notes), report.notes
    # Causal, cache-bounded or smaller attention keeps the kernel.
    _run((q, k, v, None, None, True))
    q16, k16, v16 = _qkv(2, 4, 4, 16, 16, 32)
    _run((q16, k16, v16, mask[..., :16]))
    _run((q[:, :, :1], k, v, None, None, False, torch.tensor([40])))


def test_dynamic_sizes():
    torch._dynamo.reset()
    yirage_dynamo.clear_reports()

    # A symbolic key length (and query length); head counts stay static (dynamic=True
    # makes them symbolic too, and that case keeps the reference).
    # k and v come from one tensor so that their lengths are one symbol (separate inputs
    # get separate symbols, and that case keeps the reference).
    def fn(q, kv, bias):
        return _attn(q, kv[0], kv[1], bias[..., : kv.shape[3]])

    compiled = torch.compile(fn, backend="yirage", options=OPTS)
    bias = torch.randn(1, 1, 1, 32)
    for s, t in ((3, 7), (4, 12)):
        q, k, v = _qkv(1, 4, 2, s, t, 16)
        kv = torch.stack([k, v])
        torch._dynamo.mark_dynamic(q, 2)
        torch._dynamo.mark_dynamic(kv, 3)
        expected = _attn(q, k, v, bias[..., :t])
        torch.testing.assert_close(compiled(q, kv, bias), expected)
    kernels = [k for r in yirage_dynamo.reports() for k in r.kernels]
    assert any(any("yirage.attention" in o for o in k.origins) for k in kernels)


def _check_dynamic_lengths(compiled, reference):
    """Two cache lengths, K/V marked dynamic along it, each matching the reference."""
    for t in (7, 12):
        q, k, v = _qkv(1, 4, 2, 1, t, 16)
        for x in (k, v):
            torch._dynamo.mark_dynamic(x, 2)
        torch.testing.assert_close(compiled(q, k, v), reference(q, k, v))


def test_separate_key_and_value_length_symbols_use_the_kernel_with_a_guard():
    """K and V as separate inputs get separate length symbols (as Dynamo gives HF's static
    cache after a recompile): the kernel runs, guarded by their equality at run time."""
    torch._dynamo.reset()
    yirage_dynamo.clear_reports()

    def fn(q, k, v):
        return _attn(q, k, v)

    compiled = torch.compile(fn, backend="yirage", options=OPTS)
    _check_dynamic_lengths(compiled, _attn)
    kernels = [k for r in yirage_dynamo.reports() for k in r.kernels]
    assert any(any("yirage.attention" in o for o in k.origins) for k in kernels)
    # Different lengths break the kernel's assumption: the launcher runs the reference.
    q, k, v = _qkv(1, 4, 2, 1, 9, 16)
    v = v[:, :, :5].contiguous()
    torch.testing.assert_close(compiled(q, k, v), _attn(q, k, v))


def test_cache_grown_by_cat_of_symbolic_lengths_uses_the_kernel():
    """HF's dynamic cache: K/V = cat(past, new) along the sequence, so the key length is an
    expression of two symbols (past s0 + new s1) that no input has alone. The kernel reads
    that length from the concatenated tensor itself (bind_derived_sizes)."""
    torch._dynamo.reset()
    yirage_dynamo.clear_reports()

    def fn(q, k_past, v_past, k_new, v_new):
        k = torch.cat([k_past, k_new], dim=2)
        v = torch.cat([v_past, v_new], dim=2)
        return _attn(q, k, v), k, v

    compiled = torch.compile(fn, backend="yirage", options=OPTS)
    for past, new in ((5, 2), (9, 3), (16, 2)):
        q, k_new, v_new = _qkv(1, 4, 2, new, new, 16)
        _, k_past, v_past = _qkv(1, 4, 2, 1, past, 16)
        for x, dim in ((q, 2), (k_new, 2), (v_new, 2), (k_past, 2), (v_past, 2)):
            torch._dynamo.mark_dynamic(x, dim)
        args = (q, k_past, v_past, k_new, v_new)
        torch.testing.assert_close(compiled(*args), fn(*args))
    reports = yirage_dynamo.reports()
    assert not [n for r in reports for n in r.notes if "left to its ATen reference" in n]
    kernels = [k for r in reports for k in r.kernels]
    attn = [k for k in kernels if any("yirage.attention" in o for o in k.origins)]
    assert attn
    # The dynamic graph's kernel takes the key length as a size of its own, read from K
    # at run time (y<input>_<dim>), where the past and new lengths are not readable.
    sources = [open(k.source_path).read() for k in attn if k.source_path]
    assert any(re.search(r"int64_t y\d+_2\b", src) for src in sources), sources[-1][-600:]


def _repeat_kv(x, n):
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def test_repeat_kv_with_symbolic_lengths_reads_unrepeated_kv(tmp_path):
    """HF's repeat_kv traced with a symbolic cache length keeps a full slice that hides it
    from pattern_attention; the CPU lowering still reads K/V once (no clone per call)."""
    torch._dynamo.reset()
    yirage_dynamo.clear_reports()

    def fn(q, k, v):
        k, v = _repeat_kv(k, 2), _repeat_kv(v, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(1, 1, -1)

    dbg = tmp_path / "dbg"
    opts = {**OPTS, "debug": True, "debug_dir": str(dbg)}
    compiled = torch.compile(fn, backend="yirage", options=opts)
    _check_dynamic_lengths(compiled, fn)
    kernels = [k for r in yirage_dynamo.reports() for k in r.kernels]
    assert any(any("yirage.attention" in o for o in k.origins) for k in kernels)
    wrappers = list(dbg.rglob("wrapper_*.py"))
    assert wrappers
    for w in wrappers:
        call = wrapper_call_of(w.read_text())
        assert "clone" not in call and "expand" not in call, call


def test_whole_graph_cache_restores_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("YIRAGE_CACHE_DIR", str(tmp_path / "cache"))
    q, k, v = _qkv(1, 6, 2, 1, 21, 16)
    mask = torch.zeros(1, 1, 1, 21)
    mask[..., 15:] = torch.finfo(torch.float32).min
    opts = {**OPTS, "graph_cache": True}
    states = []
    for _ in range(2):
        torch._dynamo.reset()
        compiled = torch.compile(_attn, backend="yirage", options=opts, dynamic=False)
        torch.testing.assert_close(compiled(q, k, v, mask), _attn(q, k, v, mask))
        report = yirage_dynamo.last_report()
        states.append(report.graph_cache)
        assert any(any("yirage.attention" in o for o in k.origins) for k in report.kernels)
    assert states == ["stored", "hit"]


def test_hf_static_cache_generate_matches_eager(monkeypatch):
    pytest.importorskip("transformers")
    from llm_models import VOCAB, build
    from transformers.generation import CompileConfig

    monkeypatch.setenv("YIRAGE_FALLBACK", "error")
    model = build("llama")  # GQA: 4 query heads over 2 KV heads
    ids = torch.randint(0, VOCAB, (1, 7))
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(ids, **kw)
        cc = CompileConfig(backend="yirage")
        cc._compile_all_devices = True
        yirage_dynamo.clear_reports()
        actual = model.generate(ids, compile_config=cc, **kw)
    assert torch.equal(actual, expected)
    kernels = [k for r in yirage_dynamo.reports() for k in r.kernels]
    assert any(any("yirage.attention" in o for o in k.origins) for k in kernels)


def test_sdpa_gqa_reference_semantics():
    # The reference is SDPA with enable_gqa; the eager helper above is the plain math.
    q, k, v = _qkv(1, 6, 2, 1, 10, 16)
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True), _eager_sdpa(q, k, v)
    )
