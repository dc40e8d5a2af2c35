"""Recording Triton launches and compiling them in worker processes (lowering/triton_pool.py).

The device-independent half runs anywhere: what a recorded launch holds, and how a worker
turns it back into `kernel.warmup(...)`. That the launch then runs the kernel the workers
compiled is checked on the GPU (tests/test_cuda.py).
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch
from yirage_dynamo.lowering import triton_pool


def _kernel_body():  # stands in for a @triton.jit function's Python source
    pass


class _FakeKernel:
    """The two attributes of a JITFunction that recording and compiling use."""

    fn = _kernel_body

    def __init__(self) -> None:
        self.warmups: list[tuple] = []

    def warmup(self, *args, grid, **kwargs):
        self.warmups.append((args, grid, kwargs))
        return type("Compiled", (), {"hash": f"h{len(self.warmups)}"})()


class _StuckKernel(_FakeKernel):
    def warmup(self, *args, grid, **kwargs):
        time.sleep(60)  # a child stuck in a lock it inherited, say


FAKE = _FakeKernel()
STUCK = _StuckKernel()


def test_launches_inside_recording_are_recorded_not_run():
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    with triton_pool.recording() as launches:
        triton_pool.launch(_FakeKernel(), (3,), x, 7, 0.5, None, True, BLOCK=16, num_warps=4)
        triton_pool.launch(
            _FakeKernel(), (5,), x.clone(), 7, 0.5, None, True, num_warps=4, BLOCK=16
        )
        triton_pool.launch(_FakeKernel(), (3,), x, 8, 0.5, None, True, BLOCK=16, num_warps=4)
    mod, name = _kernel_body.__module__, "_kernel_body"
    kwargs = (("BLOCK", 16), ("num_warps", 4))
    assert launches == [
        (mod, name, (torch.bfloat16, 7, 0.5, None, True), kwargs),  # the second is the same
        (mod, name, (torch.bfloat16, 8, 0.5, None, True), kwargs),
    ]
    with triton_pool.recording() as inner:
        pass
    assert inner == [] and len(launches) == 2  # each block records its own


def test_launch_with_an_unaligned_tensor_is_not_recorded():
    base = torch.randn(64)
    with triton_pool.recording() as launches:
        triton_pool.launch(_FakeKernel(), (1,), base[1:], 63, BLOCK=16)  # 4 bytes in
        triton_pool.launch(_FakeKernel(), (1,), base[4:], 60, BLOCK=16)  # 16 bytes in
    assert [spec[2] for spec in launches] == [(torch.float32, 60)]


def test_worker_compile_warms_the_named_kernel_with_recorded_arguments():
    spec = (__name__, "FAKE", (torch.float16, 3, None), (("BLOCK", 32), ("num_warps", 8)))
    before = len(FAKE.warmups)
    assert triton_pool.compile_launch(*spec) == f"h{before + 1}"
    args, grid, kwargs = FAKE.warmups[-1]
    assert args == (torch.float16, 3, None) and grid == (1,)
    assert kwargs == {"BLOCK": 32, "num_warps": 8}


def test_precompile_of_nothing_starts_no_workers():
    assert triton_pool.precompile([]) == []


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
def test_children_compile_their_share_and_report_every_hash():
    specs = [(__name__, "FAKE", (torch.float32, n), ()) for n in range(5)]
    before = len(FAKE.warmups)
    hashes = triton_pool.compile_in_children(specs, None, 0, workers=2, timeout_s=30)
    # Child 1 compiled specs 0, 1 and child 2 specs 2, 3, 4, each on its own copy of FAKE.
    assert sorted(hashes) == sorted(
        [f"h{before + i}" for i in (1, 2, 3)] + [f"h{before + i}" for i in (1, 2)]
    )
    assert len(FAKE.warmups) == before  # the parent compiled nothing itself


def test_shares_are_near_equal_and_keep_one_kernels_launches_together():
    """A child builds each kernel's launcher once: its share should be few kernels."""
    a = [("m", "gemv", (torch.float16, n), ()) for n in range(5)]
    b = [("m", "attn", (torch.float16, n), ()) for n in range(3)]
    mixed = [x for pair in zip(a, b + [None] * 2) for x in pair if x is not None]
    parts = triton_pool.shares(mixed, 4)
    assert sorted(len(p) for p in parts) == [2, 2, 2, 2]
    assert sorted(x for p in parts for x in p) == sorted(a + b)
    assert sum(len({spec[1] for spec in p}) for p in parts) == 5  # one share holds both
    # Each kernel's configs keep their order (the unmeasured default first).
    assert [x for p in parts for x in p if x[1] == "gemv"] == a
    assert triton_pool.shares(a[:2], 4) == [[a[0]], [a[1]]]


@needs_fork
def test_a_stuck_child_is_killed_at_the_timeout_and_the_rest_still_report():
    specs = [(__name__, "STUCK", (1,), ()), (__name__, "FAKE", (2,), ())]
    start = time.monotonic()
    hashes = triton_pool.compile_in_children(specs, None, 0, workers=2, timeout_s=1.0)
    assert time.monotonic() - start < 10
    assert len(hashes) == 1 and hashes[0].startswith("h")


def test_gemv_precompile_round_also_compiles_the_attention_candidates(monkeypatch):
    """One round of children for the GEMV and decode-attention candidates of a graph; the
    attention's shape keys are marked so that its own search does not fork again."""
    from types import SimpleNamespace

    from yirage_dynamo.lowering import cuda_gemv

    rounds: list[list] = []

    def record(calls):
        rounds.append(list(calls))
        return []

    monkeypatch.setattr(triton_pool, "precompile_calls", record)
    tuner = SimpleNamespace(cached=lambda *_: False, precompiled=set(), stats={})
    site = cuda_gemv._Site(
        "gemv", {"n": 64}, 64, 64, ours=lambda cfg: [("gemv", cfg["block_k"])], baseline=list
    )
    report = SimpleNamespace(stage=lambda name: contextlib.nullcontext())
    attention = [("gpu|decode_attention|t384", ["attn_a", "attn_b"])]

    cuda_gemv._precompile(tuner, "all", [site], report, attention)
    assert len(rounds) == 1
    n_gemv = len(site.candidates("all"))
    assert rounds[0][:n_gemv] == [("gemv", c["block_k"]) for c in site.candidates("all")]
    assert rounds[0][n_gemv:] == ["attn_a", "attn_b"]
    assert tuner.precompiled == {"gpu|decode_attention|t384"}

    # Every GEMV config cached: no round here, and the attention compiles on its own later.
    rounds.clear()
    cached = SimpleNamespace(cached=lambda *_: True, precompiled=set(), stats={})
    cuda_gemv._precompile(cached, "all", [site], report, attention)
    assert rounds == [] and cached.precompiled == set()


_SCALE_CALLS: list[tuple] = []


@torch.library.custom_op("yirage_pool_test::scale", mutates_args=())
def _scale_op(x: torch.Tensor, block: int) -> torch.Tensor:
    """A stand-in for a yirage_cuda op: its kernel launch goes through the pool."""
    _SCALE_CALLS.append((type(x), x.shape, x.storage_offset(), block))
    out = torch.empty_like(x)
    triton_pool.launch(FAKE, (1,), x, out, x.shape[-1], BLOCK=block)
    return out


@_scale_op.register_fake
def _(x, block):
    return torch.empty_like(x)


@torch.library.custom_op("yirage_pool_test::searched", mutates_args=())
def _searched_op(x: torch.Tensor) -> torch.Tensor:
    triton_pool.launch(FAKE, (1,), x, 99, BLOCK=1)
    return x.clone()


@_searched_op.register_fake
def _(x):
    return torch.empty_like(x)


def test_graph_ops_are_recorded_once_per_layout_on_stand_ins_and_precompiled_together(
    monkeypatch,
):
    """The kernels left to a graph's first call (norms, rotary, KV writes) compile in one
    round of children: each op of the namespace runs once per distinct input layout and
    scalars, the skipped (config-searched) ops and other namespaces not at all."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, y, z):
        a = torch.ops.yirage_pool_test.scale(x, 16)
        b = torch.ops.yirage_pool_test.scale(y, 16)  # x's layout again: not run again
        c = torch.ops.yirage_pool_test.scale(z[:, 1:], 16)  # a view 4 bytes in
        d = torch.ops.yirage_pool_test.scale(x, 32)
        return a + b + torch.ops.yirage_pool_test.searched(x) + c.sum() + d

    x = torch.randn(4, 8)
    gm = make_fx(f, tracing_mode="fake")(x, x.clone(), torch.randn(4, 9))
    _SCALE_CALLS.clear()
    compiled: list[list] = []
    monkeypatch.setattr(
        triton_pool, "precompile", lambda launches: compiled.append(list(launches)) or []
    )
    extra_ran = []
    triton_pool.precompile_graph_ops(
        gm, "yirage_pool_test", ("searched",), [lambda: extra_ran.append(True)]
    )
    mod = _kernel_body.__module__
    # The unaligned view's launch is not recordable (a worker's stand-in sits at 0): its
    # stand-in kept the view's offset, so it is left to its first call.
    assert compiled == [
        [
            (mod, "_kernel_body", (torch.float32, torch.float32, 8), (("BLOCK", 16),)),
            (mod, "_kernel_body", (torch.float32, torch.float32, 8), (("BLOCK", 32),)),
        ]
    ]
    assert extra_ran == [True]
    assert _SCALE_CALLS == [
        (torch.Tensor, (4, 8), 0, 16),
        (torch.Tensor, (4, 8), 1, 16),
        (torch.Tensor, (4, 8), 0, 32),
    ]


def test_a_stand_in_has_the_node_values_layout_and_offset():
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda z: z.t()[1:] * 2, tracing_mode="fake")(torch.randn(5, 6))
    view = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor)
    s = triton_pool.stand_in(view)
    val = view.meta["val"]
    assert (s.shape, s.stride(), s.storage_offset(), s.dtype) == (
        val.shape,
        val.stride(),
        val.storage_offset(),
        val.dtype,
    )
    assert not isinstance(s, torch._subclasses.FakeTensor)
