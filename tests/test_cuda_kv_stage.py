"""Staged KV writes (lowering/triton_kv_write.py `rotary_kv_stage`, the `k_stage`/`v_stage`/
`stage_pos` of lowering/triton_attention.py's decode attention): a decode step that keeps
its new cache row apart until a commit copies it in, so a step started ahead writes
nothing shared (runtime/cuda_graphs.py). Checked on a GPU against the unstaged kernels:
the staged row is the one `rotary_kv_write` would write, and attention reading it from the
stage equals attention over a cache holding it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cuda_tol, needs_triton
from test_cuda_kv_write import _clones, _inputs
from yirage_dynamo.lowering.cuda_kv_write import rotary_kv_write_reference

import yirage_dynamo.ops  # noqa: F401 - registers yirage::rotary

pytestmark = pytest.mark.cuda


def _kernels():
    from yirage_dynamo.lowering.cuda_ops import _kernels as load

    return load()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,d", [(1, 32, 8, 128), (2, 12, 4, 80)])
@pytest.mark.parametrize("with_base", [False, True])
def test_triton_rotary_kv_stage_and_kv_commit_write_the_row_rotary_kv_write_writes(
    dtype, b, hq, hkv, d, with_base
):
    _kernels()
    cache = 64
    args = _inputs(b, hq, hkv, 1, d, cache, dtype, device="cuda", start=0 if with_base else 41)
    if with_base:  # the position as offsets + a counter (YIRAGE_CUDA_KV_POS)
        args.append(torch.tensor([41], device="cuda"))
    q, k, v, cos, sin, kc, vc, pos, *base = args
    ref_args = _clones(args)
    ref = rotary_kv_write_reference(*ref_args)
    k_stage = torch.zeros(b, hkv, 1, d, dtype=dtype, device="cuda")
    v_stage = torch.zeros_like(k_stage)
    stage_pos = torch.full((1,), -1, dtype=torch.int64, device="cuda")
    before_k, before_v = kc.clone(), vc.clone()
    got = torch.ops.yirage_cuda.rotary_kv_stage(
        q, k, v, cos, sin, k_stage, v_stage, stage_pos, cache, pos, *base
    )
    tol = cuda_tol(dtype)
    torch.testing.assert_close(got, ref, **tol)
    assert stage_pos.item() == 41
    torch.testing.assert_close(k_stage[:, :, 0], ref_args[5][:, :, 41], **tol)
    torch.testing.assert_close(v_stage[:, :, 0], ref_args[6][:, :, 41], rtol=0, atol=0)
    # The caches themselves are not written, until the commit writes that row.
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)
    torch.ops.yirage_cuda.kv_commit(kc, vc, k_stage, v_stage, stage_pos)
    torch.testing.assert_close(kc, ref_args[5], **tol)
    torch.testing.assert_close(vc, ref_args[6], rtol=0, atol=0)


@needs_triton
def test_triton_rotary_kv_stage_takes_one_new_position_only():
    _kernels()
    q, k, v, cos, sin, kc, vc, pos = _inputs(1, 4, 2, 3, 64, 16, torch.bfloat16, "cuda", 0)
    stage = torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16, device="cuda")
    spos = torch.zeros(1, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="one new position"):
        torch.ops.yirage_cuda.rotary_kv_stage(
            q, k, v, cos, sin, stage, stage.clone(), spos, 16, pos
        )


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (12, 4, 80)])
@pytest.mark.parametrize("pos", [0, 200, 511])
@pytest.mark.parametrize("mask", [None, torch.bool, torch.float32])
def test_triton_decode_attention_reads_the_staged_row_in_place_of_the_caches(
    dtype, hq, hkv, d, pos, mask
):
    """The cache holds a stale row at `pos` (as a cache does where a step started ahead
    was dropped); attention with the stage equals attention over the committed cache, in
    every split layout and with either merge."""
    kk = _kernels()
    b, max_len = 2, 512
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype)
    kc = torch.randn(b, hkv, max_len, d, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    k_stage = torch.randn(b, hkv, 1, d, device="cuda", dtype=dtype)
    v_stage = torch.randn_like(k_stage)
    stage_pos = torch.tensor([pos], device="cuda")
    committed_k, committed_v = kc.clone(), vc.clone()
    committed_k[:, :, pos] = k_stage[:, :, 0]
    committed_v[:, :, pos] = v_stage[:, :, 0]
    attn_mask, cp = None, stage_pos
    if mask is not None:  # bounded by HF's decode mask instead of cache_position
        keep = (torch.arange(max_len, device="cuda") <= pos).view(1, 1, 1, max_len)
        keep = keep.expand(b, 1, 1, max_len)
        attn_mask = keep if mask is torch.bool else torch.zeros(keep.shape, device="cuda").masked_fill(~keep, float("-inf"))  # fmt: skip
        cp = None
    scale = 1 / math.sqrt(d)
    counters = torch.zeros(b * hkv, dtype=torch.int32, device="cuda")
    for split, block_n, nw in [(64, 32, 2), (1024, 128, 4)]:
        # Either merge against itself: the two merges sum the splits in different orders
        # (on an H100 float32 differs in the last bits between them).
        for sem in (None, counters):
            ref = kk.decode_attention(q, committed_k, committed_v, attn_mask, cp, scale, split, block_n, nw, sem)  # fmt: skip
            got = kk.decode_attention(
                q,
                kc,
                vc,
                attn_mask,
                cp,
                scale,
                split,
                block_n,
                nw,
                sem,
                k_stage,
                v_stage,
                stage_pos,
            )
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert not counters.any()
    stale = kk.decode_attention(q, kc, vc, attn_mask, cp, scale, 64, 32, 2)
    assert not torch.allclose(stale, ref)  # the stale row would have changed the result


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_layers_commit_in_one_captured_launch_that_writes_each_layers_row(dtype):
    """A StageTable with `KvCommitTable`: an eager commit builds the address table; for a
    captured one the runner's `prepare_capture` builds it first (the host copy cannot be
    captured). Either way one launch writes every layer's staged row where `kv_commit`
    would, and each replay of the captured one does again."""
    from yirage_dynamo.lowering.cuda_kv_stage import StageTable

    kk = _kernels()
    table = StageTable(kk.kv_commit, kk.KvCommitTable())
    b, hkv, t, d = 1, 8, 64, 128

    def new_caches() -> list:
        return [
            tuple(torch.randn(b, hkv, t, d, device="cuda", dtype=dtype) for _ in "kv")
            for _ in range(4)
        ]

    def stage_every_layer(caches: list, pos: int) -> list:
        refs = []
        for kc, vc in caches:
            stage = table.use(kc, vc)
            stage.k.copy_(torch.randn_like(stage.k))
            stage.v.copy_(torch.randn_like(stage.v))
            stage.pos.fill_(pos)
            ref_k, ref_v = kc.clone(), vc.clone()
            kk.kv_commit(ref_k, ref_v, stage.k, stage.v, stage.pos)
            refs.append((ref_k, ref_v))
        return refs

    def assert_committed(caches: list, refs: list) -> None:
        for (kc, vc), (ref_k, ref_v) in zip(caches, refs, strict=True):
            assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)

    eager = new_caches()
    refs = stage_every_layer(eager, 3)
    table.commit()
    assert_committed(eager, refs)
    assert table.commit_rows.launches == 1

    captured = new_caches()
    for kc, vc in captured:  # what a captured step leaves: its stages, by its caches
        table.use(kc, vc)
    table.prepare_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        table.commit()
    assert table.commit_rows.launches == 2 and len(table.commit_rows.tables) == 2
    for pos in (10, 63):
        refs = stage_every_layer(captured, pos)
        table.used.clear()
        graph.replay()
        torch.cuda.synchronize()
        assert_committed(captured, refs)


@needs_triton
@pytest.mark.parametrize("regional", ["1", "0"])
def test_llama_generate_with_staged_kv_writes_and_run_ahead_matches_eager(monkeypatch, regional):
    """YIRAGE_CUDA_KV_STAGE=on with run-ahead: every layer's write staged (regional pieces
    and whole graph), committed by the runner: eager's tokens and logits, most steps
    handed out from a step started ahead."""
    from test_cuda_generate import _assert_matches_eager
    from test_run_ahead import _generate
    from yirage_dynamo.lowering.cuda_kv_stage import STAGE_ENV
    from yirage_dynamo.runtime.cuda_graphs import live_runners

    import yirage_dynamo

    monkeypatch.setenv(STAGE_ENV, "on")
    monkeypatch.setenv("YIRAGE_REGIONAL", regional)
    model, ids, before = _fresh_llama(torch.bfloat16)
    with torch.no_grad():
        ref = _generate(model, ids, None, 20)
        out = _generate(model, ids, {"fallback": "error", "run_ahead": "always"}, 20)
    _assert_matches_eager(out, ref, ids.shape[1], torch.bfloat16)
    notes = [n for r in yirage_dynamo.reports() for n in r.notes]
    staged = [n for n in notes if n.startswith("kv stage:") and "staged" in n]
    assert staged, notes
    # The graph's remaining kernels (the rotary + stage and the commit among them) compiled
    # in forked children before the first call (lowering/cuda.py `_precompile_rest`).
    precompiled = [n for n in notes if n.startswith("graph kernels precompiled")]
    assert precompiled and max(int(n.split(": ")[1].split()[0]) for n in precompiled) >= 3, notes
    mine = [r for r in live_runners() if id(r) not in before and r.commit_graph is not None]
    assert mine and sum(getattr(r, "hits", 0) for r in mine) >= 20 - 7, notes
    # Every layer's row in one launch, captured in the commit graph.
    assert all(r.commit.commit_rows.launches > 0 for r in mine), notes


def _two_turns(model, ids, options: dict | None, new: int = 30):
    """A chat's two turns through one StaticCache passed back into generate(): the second
    turn's eager prefill continues the cache where the first turn's decoding ended, right
    where a step started ahead after the first turn's last token would write."""
    import transformers
    from test_run_ahead import _generate

    cache = transformers.StaticCache(config=model.config, max_cache_len=96)
    first = _generate(model, ids, options, new, cache)
    seeded = torch.Generator(device=ids.device).manual_seed(1)
    more = torch.randint(3, 512, (1, 5), device=ids.device, generator=seeded)
    second = _generate(model, torch.cat([first.sequences, more], 1), options, new, cache)
    return first, second


def _fresh_llama(dtype):
    """A tiny Llama after a Dynamo reset, a prompt, and the runners alive before it (so a
    test finds its own)."""
    from test_cuda_generate import _tiny_llama
    from yirage_dynamo.runtime.cuda_graphs import live_runners

    import yirage_dynamo

    torch._dynamo.reset()
    model = _tiny_llama(dtype)
    ids = torch.randint(3, 512, (1, 12), device="cuda")
    yirage_dynamo.clear_reports()
    return model, ids, set(map(id, live_runners()))


@needs_triton
@pytest.mark.parametrize("run_ahead,stage", [("auto", None), ("always", "on")])
def test_a_chat_passing_its_cache_back_with_run_ahead_matches_eager(monkeypatch, run_ahead, stage):
    """The case unstaged run-ahead leaves unordered (runtime/run_ahead.py): the second
    turn's eager prefill writes the slot a step started ahead would write. Staged, that
    step writes only its stage, so both turns give eager's tokens and logits; "auto"
    stages and runs ahead without YIRAGE_CUDA_KV_STAGE."""
    from test_cuda_generate import _assert_matches_eager
    from yirage_dynamo.lowering.cuda_kv_stage import STAGE_ENV
    from yirage_dynamo.runtime.cuda_graphs import live_runners
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    import yirage_dynamo

    if stage is None:
        monkeypatch.delenv(STAGE_ENV, raising=False)
    else:
        monkeypatch.setenv(STAGE_ENV, stage)
    model, ids, before = _fresh_llama(torch.float32)
    with torch.no_grad():
        ref = _two_turns(model, ids, None)
        out = _two_turns(model, ids, {"fallback": "error", "run_ahead": run_ahead})
    _assert_matches_eager(out[0], ref[0], ids.shape[1], torch.float32)
    _assert_matches_eager(out[1], ref[1], ref[0].sequences.shape[1] + 5, torch.float32)
    mine = [r for r in live_runners() if id(r) not in before]
    ahead = [r for r in mine if isinstance(r, RunAheadRunner)]
    notes = [n for r in yirage_dynamo.reports() for n in r.notes]
    assert ahead and all(r.commit_graph is not None for r in ahead), notes
    assert sum(r.hits for r in ahead) > 0, notes
