"""Rotary + static KV-cache write as one call (lowering/cuda_kv_write.py): the rewrite on
any machine (with the ATen reference standing in for the Triton op), and the Triton kernel
against that reference on a GPU."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import cuda_tol, needs_triton
from torch.fx.experimental.proxy_tensor import make_fx
from yirage_dynamo.lowering.base import Capabilities
from yirage_dynamo.lowering.cuda_kv_write import (
    batch_counter_increments,
    fuse_rotary_kv_write,
    rotary_kv_write_reference,
)
from yirage_dynamo.passes.context import PassContext

import yirage_dynamo.ops  # noqa: F401 - registers yirage::rotary
from yirage_dynamo.options import parse_options
from yirage_dynamo.report import CompileReport, KernelRecord

pytestmark = pytest.mark.cuda


def _layer(q, k, v, cos, sin, kc, vc, pos):
    """A decoder layer's middle as HF's static cache runs it (after our rotary pattern)."""
    q2, k2 = torch.ops.yirage.rotary(q, k, cos, sin, False)
    kc.index_copy_(2, pos, k2)
    vc.index_copy_(2, pos, v)
    rep = q2.shape[1] // kc.shape[1]
    scores = q2 @ kc.repeat_interleave(rep, 1).transpose(-1, -2)
    return scores.softmax(-1) @ vc.repeat_interleave(rep, 1)


def _keys_also_returned(q, k, v, cos, sin, kc, vc, pos):
    q2, k2 = torch.ops.yirage.rotary(q, k, cos, sin, False)
    kc.index_copy_(2, pos, k2)
    vc.index_copy_(2, pos, v)
    return q2 + 1, k2  # the rotated keys leave the graph: the cache write alone cannot hold them


def _cache_read_between_writes(q, k, v, cos, sin, kc, vc, pos):
    kview = kc.transpose(2, 3)  # a view taken before the writes...
    q2, k2 = torch.ops.yirage.rotary(q, k, cos, sin, False)
    kc.index_copy_(2, pos, k2)
    peek = kview.sum()  # ...read after the key write, before the value write
    vc.index_copy_(2, pos, v)
    return q2 + 1, peek


def _attend(q2, kc, vc):
    rep = q2.shape[1] // kc.shape[1]
    scores = q2 @ kc.repeat_interleave(rep, 1).transpose(-1, -2)
    return scores.softmax(-1) @ vc.repeat_interleave(rep, 1)


def _hf_positions(q, k, v, cos, sin, kc, vc, counter, keep_pos=False, peek=False):
    """HF's StaticLayer.update: positions from the layer's own counter, then its increment.
    `keep_pos`: the positions leave the graph too; `peek`: a cache read after them that
    must see the cache before this step's writes."""
    q2, k2 = torch.ops.yirage.rotary(q, k, cos, sin, False)
    pos = torch.arange(k.shape[2]) + counter
    extra = [kc.sum()] if peek else []
    counter.add_(k.shape[2])
    kc.index_copy_(2, pos, k2)
    vc.index_copy_(2, pos, v)
    return (_attend(q2, kc, vc), *extra, *([pos] if keep_pos else []))


def _inputs(b, hq, hkv, s, d, cache, dtype, device="cpu", start=3):
    def r(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    q = r(b, s, hq, d).transpose(1, 2)  # non-contiguous, as HF's projections give them
    k = r(b, s, hkv, d).transpose(1, 2)
    v = r(b, s, hkv, d).transpose(1, 2)
    cos, sin = r(1, 1, s, d), r(1, 1, s, d)  # broadcast over batch and heads
    kc, vc = r(b, hkv, cache, d), r(b, hkv, cache, d)
    pos = torch.arange(start, start + s, device=device)
    return [q, k, v, cos, sin, kc, vc, pos]


def _clones(args):
    return [a.clone() for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,s", [(1, 4, 2, 1), (2, 4, 4, 3)])
def test_rotary_and_both_cache_writes_become_one_call_with_same_results(dtype, b, hq, hkv, s):
    args = _inputs(b, hq, hkv, s, 8, 12, dtype)
    gm = make_fx(_layer, tracing_mode="fake")(*_clones(args))
    writes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.index_copy_.default]
    assert len(writes) == 2
    ctx = PassContext(parse_options({}), CompileReport(), Capabilities("cuda"), [])
    rotary = (torch.ops.yirage.rotary.default,)
    rot = next(n for n in gm.graph.nodes if n.target in rotary)
    ctx.report.kernels.append(KernelRecord("rotary", "cuda", None, [rot.name]))
    assert fuse_rotary_kv_write(gm, ctx, rotary, rotary_kv_write_reference) == 1
    # The report lists what runs: the fused kernel, named for all three nodes it replaces.
    assert [(r.name, r.origins[0]) for r in ctx.report.kernels] == [("rotary_kv_write", rot.name)]
    assert len(ctx.report.kernels[0].origins) == 3
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.index_copy_.default not in targets
    assert torch.ops.yirage.rotary.default not in targets
    assert targets.count(rotary_kv_write_reference) == 1
    assert ctx.report.patterns["triton_rotary_kv_write"] == 1
    ref_args, got_args = _clones(args), _clones(args)
    ref = _layer(*ref_args)
    got = gm(*got_args)
    torch.testing.assert_close(got, ref)
    for i in (5, 6):  # the caches, written in place
        torch.testing.assert_close(got_args[i], ref_args[i], rtol=0, atol=0)


@pytest.mark.parametrize("fn", [_keys_also_returned, _cache_read_between_writes])
def test_graphs_the_fused_call_would_change_keep_the_separate_ops(fn):
    args = _inputs(1, 4, 2, 1, 8, 12, torch.float32)
    gm = make_fx(fn, tracing_mode="fake")(*_clones(args))
    ctx = PassContext(parse_options({}), CompileReport(), Capabilities("cuda"), [])
    rotary = (torch.ops.yirage.rotary.default,)
    assert fuse_rotary_kv_write(gm, ctx, rotary, rotary_kv_write_reference) == 0
    writes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.index_copy_.default]
    assert len(writes) == 2


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,s,d", [(1, 32, 8, 1, 128), (2, 12, 4, 5, 80), (1, 8, 8, 1, 64)])
@pytest.mark.parametrize("with_base", [False, True])
def test_triton_rotary_kv_write_matches_rotary_then_index_copy(dtype, b, hq, hkv, s, d, with_base):
    from yirage_dynamo.lowering.cuda_ops import _kernels

    _kernels()
    args = _inputs(b, hq, hkv, s, d, 64, dtype, device="cuda", start=0 if with_base else 17)
    if with_base:  # positions as offsets + a counter (YIRAGE_CUDA_KV_POS)
        args.append(torch.tensor([17], device="cuda"))
    ref_args, got_args = _clones(args), _clones(args)
    ref = rotary_kv_write_reference(*ref_args)
    got = torch.ops.yirage_cuda.rotary_kv_write(*got_args)
    tol = cuda_tol(dtype)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got_args[5], ref_args[5], **tol)
    torch.testing.assert_close(got_args[6], ref_args[6], rtol=0, atol=0)


@needs_triton
def test_triton_rotary_kv_write_skips_positions_past_the_cache_end():
    """A step replayed past the cache's end (HF's counter keeps counting) must not write
    into the memory after the cache: the cache here is the front of a larger buffer."""
    from yirage_dynamo.lowering.cuda_ops import _kernels

    _kernels()
    b, hq, hkv, s, d, cache = 1, 8, 2, 2, 64, 16
    q, k, v, cos, sin, kbuf, vbuf, pos = _inputs(b, hq, hkv, s, d, cache + 8, torch.bfloat16, "cuda", 0)  # fmt: skip
    base = torch.tensor([cache - 1], device="cuda")  # positions cache-1 (inside) and cache
    before_k, before_v = kbuf.clone(), vbuf.clone()
    ref_k, ref_v = kbuf.clone(), vbuf.clone()
    ref = rotary_kv_write_reference(q, k, v, cos, sin, ref_k, ref_v, pos, base)
    got = torch.ops.yirage_cuda.rotary_kv_write(
        q, k, v, cos, sin, kbuf[:, :, :cache], vbuf[:, :, :cache], pos, base
    )
    tol = cuda_tol(torch.bfloat16)
    torch.testing.assert_close(got, ref, **tol)
    # The slot inside is written as the reference writes it...
    torch.testing.assert_close(kbuf[:, :, :cache], ref_k[:, :, :cache], **tol)
    torch.testing.assert_close(vbuf[:, :, :cache], ref_v[:, :, :cache], rtol=0, atol=0)
    assert not torch.equal(vbuf[:, :, cache - 1], before_v[:, :, cache - 1])
    # ...and the memory after the cache, where the reference wrote the second, is not.
    assert not torch.equal(ref_v[:, :, cache], before_v[:, :, cache])
    assert torch.equal(kbuf[:, :, cache:], before_k[:, :, cache:])
    assert torch.equal(vbuf[:, :, cache:], before_v[:, :, cache:])


@pytest.mark.parametrize("fold_positions", [False, True])
def test_fusion_in_the_no_inductor_llama_layer_program_keeps_generate_exact(
    monkeypatch, fold_positions
):
    """The rewrite on the graphs HF's static cache really gives (regional pieces, per-layer
    positions `arange + cumulative_length`): run after the Triton swaps, with the ATen
    reference as the fused op, generate() still matches eager and each decode layer
    program holds one fused call and no cache write of its own."""
    import yirage_dynamo.lowering.cuda_ops as cuda_ops
    from test_cuda_choices import direct_generate_on_cpu

    substitute = cuda_ops.substitute
    graphs = []

    def substitute_then_fuse(gm, ctx, inline):
        swapped = substitute(gm, ctx, inline)
        rotary = (torch.ops.yirage.rotary.default,)
        fuse_rotary_kv_write(gm, ctx, rotary, rotary_kv_write_reference, fold_positions)
        graphs.append(gm)
        return swapped

    monkeypatch.setattr(cuda_ops, "substitute", substitute_then_fuse)
    reports = direct_generate_on_cpu(monkeypatch)
    layers = [r for r in reports if r.patterns.get("attention")]
    assert layers and all(r.patterns.get("triton_rotary_kv_write") == 1 for r in layers)
    # HF's `arange + cumulative_length` positions, folded in where asked.
    folded = [r.patterns.get("triton_kv_write_positions", 0) for r in layers]
    assert folded == [int(fold_positions)] * len(layers)
    for gm in graphs:
        targets = [n.target for n in gm.graph.nodes]
        if rotary_kv_write_reference in targets:
            assert torch.ops.aten.index_copy_.default not in targets


def _hf_inputs(dtype=torch.float32, b=1, s=1):
    args = _inputs(b, 4, 2, s, 8, 12, dtype)
    return [*args[:7], torch.tensor([3])]  # the counter: the next free slot


@pytest.mark.parametrize("variant,folds", [
    ({}, True),
    ({"keep_pos": True}, False),  # the positions are needed anyway
    ({"peek": True}, False),  # the writes cannot move up past the read
])  # fmt: skip
@pytest.mark.parametrize("s", [1, 3])
def test_position_add_folds_into_the_fused_call_reading_the_counter_before_its_increment(
    variant, folds, s
):
    fn = functools.partial(_hf_positions, **variant)
    args = _hf_inputs(s=s)
    gm = make_fx(fn, tracing_mode="fake")(*_clones(args))
    ctx = PassContext(parse_options({}), CompileReport(), Capabilities("cuda"), [])
    rotary = (torch.ops.yirage.rotary.default,)
    assert fuse_rotary_kv_write(gm, ctx, rotary, rotary_kv_write_reference, True) == 1
    assert ctx.report.patterns.get("triton_kv_write_positions", 0) == int(folds)
    adds = [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(adds) == (0 if folds else 1)
    ref_args, got_args = _clones(args), _clones(args)
    ref, got = fn(*ref_args), gm(*got_args)
    torch.testing.assert_close(got, ref)
    for i in (5, 6, 7):  # the caches and the counter, written in place
        torch.testing.assert_close(got_args[i], ref_args[i], rtol=0, atol=0)
    assert got_args[7].item() == 3 + s


@pytest.mark.parametrize("env,query", [
    ("KV_WRITE_ENV", "enabled"), ("KV_POS_ENV", "folds_positions"),
    ("KV_COUNTERS_ENV", "batches_counters"),
])  # fmt: skip
def test_kv_switches_are_validated_and_on_by_default(monkeypatch, env, query):
    from yirage_dynamo.lowering import cuda_kv_write

    env, query = getattr(cuda_kv_write, env), getattr(cuda_kv_write, query)
    monkeypatch.delenv(env, raising=False)
    assert query()
    monkeypatch.setenv(env, "off")
    assert not query()
    monkeypatch.setenv(env, "maybe")
    with pytest.raises(ValueError, match=env):
        query()


def _two_layers(q, k, v, cos, sin, kc, vc, counter, kc1, vc1, counter1, late_read=False):
    """Two decoder layers of HF's static cache, each with its own caches and counter;
    `late_read`: layer 0's counter is read again after its increment."""
    a = _hf_positions(q, k, v, cos, sin, kc, vc, counter)[0]
    b = _hf_positions(a, k, v, cos, sin, kc1, vc1, counter1)[0]
    return (b, counter * 2) if late_read else (b,)


@pytest.mark.parametrize("late_read", [False, True])
@pytest.mark.parametrize("s", [1, 3])
def test_layer_counter_increments_become_one_foreach_add_after_the_last(late_read, s):
    fn = functools.partial(_two_layers, late_read=late_read)
    first = _hf_inputs(s=s)
    args = [*first, first[5].clone(), first[6].clone(), torch.tensor([7])]
    gm = make_fx(fn, tracing_mode="fake")(*_clones(args))
    ctx = PassContext(parse_options({}), CompileReport(), Capabilities("cuda"), [])
    rotary = (torch.ops.yirage.rotary.default,)
    assert fuse_rotary_kv_write(gm, ctx, rotary, rotary_kv_write_reference, True) == 2
    merged = batch_counter_increments(gm, ctx)
    foreach = [n for n in gm.graph.nodes if n.target is torch.ops.aten._foreach_add_.Scalar]
    adds = [n for n in gm.graph.nodes if n.target is torch.ops.aten.add_.Tensor]
    # A counter read after its increment keeps it in place; one left over is no batch.
    assert merged == (0 if late_read else 2)
    assert len(foreach) == (0 if late_read else 1) and len(adds) == (2 if late_read else 0)
    assert ctx.report.patterns.get("batched_counter_increments", 0) == merged
    ref_args, got_args = _clones(args), _clones(args)
    ref, got = fn(*ref_args), gm(*got_args)
    torch.testing.assert_close(got, ref)
    for i in (5, 6, 7, 8, 9, 10):  # caches and counters, written in place
        torch.testing.assert_close(got_args[i], ref_args[i], rtol=0, atol=0)
    assert (got_args[7].item(), got_args[10].item()) == (3 + s, 7 + s)
