"""Programmatic dependent launch of the decode GEMVs (YIRAGE_CUDA_PDL, an opt-in experiment).

The switch's logic runs anywhere; the kernels need a Hopper GPU (griddepcontrol is an sm_90
instruction) and skip cleanly elsewhere. What PDL could break is ordering: a kernel that
starts before its predecessor has finished must not read that predecessor's results early,
so the chained tests compare a captured CUDA graph of dependent PDL launches, replayed on
new inputs, bit for bit with the same launches run one after another without graphs.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import needs_triton

from yirage_dynamo.options import parse_options

pytestmark = pytest.mark.cuda

needs_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
    reason="needs a Hopper (sm_90+) GPU",
)


# --------------------------------------------------------------------------- the switch


def test_pdl_switch_is_off_by_default_and_rejects_unknown_values(monkeypatch):
    from yirage_dynamo.lowering.cuda_pdl import PDL_ENV, pdl_mode

    monkeypatch.delenv(PDL_ENV, raising=False)
    assert pdl_mode() == "off"
    monkeypatch.setenv(PDL_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"YIRAGE_CUDA_PDL='sometimes'.*off, gemv, all"):
        pdl_mode()


@pytest.mark.parametrize(
    "env,capability,mode",
    [("all", (9, 0), "all"), ("on", (9, 0), "all"), ("gemv", (10, 0), "gemv")]
    + [("all", (8, 0), "off"), ("gemv", (8, 9), "off"), ("0", (9, 0), "off")],
)
def test_pdl_needs_hopper_and_all_turns_on_inductors_pdl(monkeypatch, env, capability, mode):
    from yirage_dynamo.lowering import cuda_pdl
    from yirage_dynamo.lowering.cuda import inductor_config_patches

    monkeypatch.setenv(cuda_pdl.PDL_ENV, env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert cuda_pdl.pdl_mode() == mode
    patches = inductor_config_patches(parse_options({}), [])
    assert patches.get("triton.enable_pdl", False) is (mode == "all")


# --------------------------------------------------------------------------- kernels


def _ops():
    from yirage_dynamo.lowering import triton_kernels

    return triton_kernels


def _x(m, k):
    return (torch.randn(m, k, device="cuda") / math.sqrt(k)).to(torch.bfloat16)


def _w(n, k):
    return torch.randn(n, k, device="cuda").to(torch.bfloat16)


@needs_triton
@needs_hopper
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (1, 1000, 3000), (2, 300, 1111), (1, 64, 96)])
@pytest.mark.parametrize("cfg", [(4, 2048, 4), (4, 512, 4), (8, 512, 4)])
def test_pdl_gemvs_compute_exactly_what_the_plain_launches_do(m, n, k, cfg):
    kk = _ops()
    x, w, w2, w3 = _x(m, k), _w(n, k), _w(n, k), _w(n // 2 + 3, k)
    b = torch.randn(n, device="cuda").to(torch.bfloat16)
    assert torch.equal(kk.gemv_pdl(x, w.t(), b, *cfg), kk.gemv(x, w.t(), b, *cfg))
    assert torch.equal(
        kk.gemv_gated_pdl(x, w.t(), w2.t(), 0, *cfg), kk.gemv_gated(x, w.t(), w2.t(), 0, *cfg)
    )
    for a, c in zip(
        kk.gemv3_pdl(x, w.t(), w2.t(), w3.t(), *cfg), kk.gemv3(x, w.t(), w2.t(), w3.t(), *cfg)
    ):
        assert torch.equal(a, c)
    torch.testing.assert_close(kk.gemv_pdl(x, w.t(), b, *cfg), torch.addmm(b, x, w.t()))


def _layer_chain(kk, x, ws, pdl: bool):
    """A decoder layer's GEMV chain, each launch reading the one before: q/k/v, a plain
    ATen kernel between (as Inductor's would be), o, gate/up, down."""
    gemv, gemv3, gated = (
        (kk.gemv_pdl, kk.gemv3_pdl, kk.gemv_gated_pdl)
        if pdl
        else (kk.gemv, kk.gemv3, kk.gemv_gated)
    )
    q, kv, v = gemv3(x, ws[0].t(), ws[1].t(), ws[2].t(), 4, 2048, 4)
    h = q * 0.5 + v
    o = gemv(h, ws[3].t(), None, 4, 512, 4)
    a = gated(o, ws[4].t(), ws[5].t(), 0, 4, 512, 4)
    return gemv(a, ws[6].t(), None, 4, 512, 4), kv


@needs_triton
@needs_hopper
def test_chained_pdl_gemvs_replay_under_a_cuda_graph_exactly_as_run_one_by_one():
    kk = _ops()
    d, inter = 2048, 5504
    shapes = [(d, d)] * 4 + [(inter, d), (inter, d), (d, inter)]
    ws = [_w(n, k) / math.sqrt(k) for n, k in shapes]
    x = _x(1, d)
    _layer_chain(kk, x, ws, pdl=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, kv = _layer_chain(kk, x, ws, pdl=True)
    for _ in range(3):
        x.copy_(_x(1, d))
        graph.replay()
        ref, ref_kv = _layer_chain(kk, x, ws, pdl=False)
        assert torch.equal(kv, ref_kv) and torch.equal(out, ref)


@needs_triton
@needs_hopper
@pytest.mark.parametrize("mode", ["gemv", "all"])
def test_llama_generate_with_pdl_gemvs_matches_eager(monkeypatch, mode):
    from test_cuda_generate import _assert_matches_eager, _eager_then_compiled

    monkeypatch.setenv("YIRAGE_CUDA_PDL", mode)
    prompt, ref, out, mems, again, reports = _eager_then_compiled(torch.bfloat16, "all", repeats=3)
    notes = [n for r in reports for n in r.notes]
    assert any(f"programmatic dependent launch (YIRAGE_CUDA_PDL={mode})" in n for n in notes)
    assert any("triton.enable_pdl=True" in n for n in notes) is (mode == "all"), notes
    step = [r for r in reports if r.patterns.get("triton_attention")][-1]
    # Every projection of both layers and lm_head runs as a PDL GEMV.
    ops = [k.name for k in step.kernels]
    assert ops.count("gemv3_pdl") == 2 and ops.count("gemv_gated_pdl") == 2, ops
    assert ops.count("gemv_pdl") == 2 * 2 + 1, ops
    _assert_matches_eager(out, ref, prompt, torch.bfloat16)
    assert torch.equal(again, out.sequences)
    assert mems[-1] <= mems[-2], mems
