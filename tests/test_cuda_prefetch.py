"""L2 prefetch of the next decode GEMV's weights (YIRAGE_CUDA_PREFETCH, an opt-in experiment).

A prefetch is a hint, so what it could break is the result, the kernel's compile (inline
PTX) or Inductor's view of the op (an impure asm would make Inductor assume every input
is written, and copy the weights). The kernel tests compare bit for bit with plain
launches and check, by peak memory, that Inductor does not copy the prefetched weight;
the generate test checks the links are made and the tokens match eager. The switch's
parsing runs anywhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import needs_triton

pytestmark = pytest.mark.cuda

needs_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
    reason="needs a Hopper (sm_90+) GPU",
)


def test_prefetch_switch_is_off_by_default_and_rejects_unknown_values(monkeypatch):
    from yirage_dynamo.lowering.cuda_prefetch import PREFETCH_ENV, prefetch_mode

    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    assert prefetch_mode() == (0, 0.0)
    for bad in ("sometimes", "lines:2", "bulk:x", "lines:0"):
        monkeypatch.setenv(PREFETCH_ENV, bad)
        with pytest.raises(ValueError, match=r"YIRAGE_CUDA_PREFETCH=.*lines, bulk"):
            prefetch_mode()


@pytest.mark.parametrize(
    "env,capability,mode",
    [("lines:0.5", (8, 0), (1, 0.5)), ("lines", (9, 0), (1, 0.5)), ("bulk:1", (9, 0), (2, 1.0))]
    + [("bulk:0.25", (8, 9), (0, 0.0)), ("off", (9, 0), (0, 0.0))],
)
def test_prefetch_bulk_needs_hopper(monkeypatch, env, capability, mode):
    from yirage_dynamo.lowering import cuda_prefetch

    monkeypatch.setenv(cuda_prefetch.PREFETCH_ENV, env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert cuda_prefetch.prefetch_mode() == mode


def _x(m, k):
    return (torch.randn(m, k, device="cuda") / math.sqrt(k)).to(torch.bfloat16)


def _w(n, k):
    return torch.randn(n, k, device="cuda").to(torch.bfloat16)


@needs_triton
@needs_hopper
@pytest.mark.parametrize("kind", [1, 2])
@pytest.mark.parametrize("frac", [0.25, 1.0])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (2, 300, 1024), (1, 64, 96)])
def test_gemvs_with_a_prefetch_compute_exactly_what_plain_launches_do(kind, frac, m, n, k):
    from yirage_dynamo.lowering import triton_kernels as kk

    x, w, w2, w3 = _x(m, k), _w(n, k), _w(n, k), _w(n // 2 + 3, k)
    nxt = _w(5000, 1024)  # rows of 2 KiB; more rows than programs, and fewer
    pf = dict(prefetch=nxt.t(), prefetch_kind=kind, prefetch_frac=frac)
    for cfg in [(4, 2048, 4), (8, 512, 4)]:
        assert torch.equal(kk.gemv(x, w.t(), None, *cfg, **pf), kk.gemv(x, w.t(), None, *cfg))
        assert torch.equal(
            kk.gemv_gated(x, w.t(), w2.t(), 0, *cfg, **pf), kk.gemv_gated(x, w.t(), w2.t(), 0, *cfg)
        )
        for a, c in zip(
            kk.gemv3(x, w.t(), w2.t(), w3.t(), *cfg, **pf), kk.gemv3(x, w.t(), w2.t(), w3.t(), *cfg)
        ):
            assert torch.equal(a, c)


@needs_triton
@needs_hopper
def test_inductor_reads_the_prefetched_weight_in_place():
    from yirage_dynamo.lowering import triton_kernels as kk

    x, w = _x(1, 1024), _w(512, 1024)
    nxt = _w(64 * 1024, 1024)  # 128 MiB: a copy would show in the peak

    def f(x, w, nxt):
        return kk.gemv(
            x, w.t(), None, 4, 512, 4, prefetch=nxt.t(), prefetch_kind=1, prefetch_frac=0.5
        )

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    compiled(x, w, nxt)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = compiled(x, w, nxt)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < nxt.nbytes // 4
    assert torch.equal(y, kk.gemv(x, w.t(), None, 4, 512, 4))


@needs_triton
@needs_hopper
@pytest.mark.parametrize("env", ["lines:0.5", "bulk:1"])
def test_llama_generate_with_prefetching_gemvs_matches_eager(monkeypatch, env):
    from test_cuda_generate import _assert_matches_eager, _eager_then_compiled

    monkeypatch.setenv("YIRAGE_CUDA_PREFETCH", env)
    prompt, ref, out, mems, again, reports = _eager_then_compiled(torch.bfloat16, "all", repeats=3)
    step = [r for r in reports if r.patterns.get("triton_attention")][-1]
    ops = [k.name for k in step.kernels]
    # Per layer q/k/v -> o -> gate/up -> down, then lm_head: every GEMV but the last
    # prefetches the next one's weight.
    gemvs = ops.count("gemv3") + ops.count("gemv_gated") + ops.count("gemv")
    assert step.patterns.get("l2_prefetch") == gemvs - 1, (step.patterns, ops)
    assert any("prefetch the next GEMV's weights" in n for n in step.notes), step.notes
    _assert_matches_eager(out, ref, prompt, torch.bfloat16)
    assert torch.equal(again, out.sequences)
    assert mems[-1] <= mems[-2], mems
