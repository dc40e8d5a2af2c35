"""CPU static-cache writes (lowering/c_kv_write.py): a layer's K/V index_copy_s and position
counter as one kernel, checked against eager (outputs, cache contents, counter)."""

from __future__ import annotations

import pytest
import torch
from conftest import tolerances, wrapper_call, yirage_compile
from yirage_dynamo.runtime import cpp_build

import yirage_dynamo

pytestmark = [
    pytest.mark.skipif(cpp_build.find_compiler() is None, reason="no C++ compiler"),
    pytest.mark.usefixtures("private_kernel_cache"),
]


def _layer_update(h, w, k_cache, v_cache, counter):
    """HF StaticCache.update after a fused QKV GEMM: v is a view chain of the GEMM output."""
    qkv = h @ w
    b, s = h.shape[0], h.shape[1]
    d = k_cache.shape[-1]
    nk = k_cache.shape[1] * d
    k = (qkv[..., :nk] * 2).view(b, s, -1, d).transpose(1, 2)  # computed: a fused region
    v = qkv[..., nk:].view(b, s, -1, d).transpose(1, 2)  # a view of the GEMM output
    pos = torch.arange(s) + counter
    counter.add_(s)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    return (k_cache * 1.5).sum(-1), v_cache[:, :, :4] + 1


def _inputs(dtype, b=1, heads=2, d=16, t=8, s=1, start=3):
    h = torch.randn(b, s, 32, dtype=dtype)
    w = torch.randn(32, 2 * heads * d, dtype=dtype) / 6
    kc = torch.randn(b, heads, t, d, dtype=dtype)
    vc = torch.randn(b, heads, t, d, dtype=dtype)
    return [h, w, kc, vc, torch.tensor(start)]


def _clone(args):
    return [a.clone() for a in args]


def _run_both(args, **options):
    """(eager outputs, compiled outputs, eager's args, compiled's args) of one call on
    separate copies of `args` (the call mutates the caches and the counter)."""
    eager_args, comp_args = _clone(args), _clone(args)
    compiled = yirage_compile(_layer_update, **options)
    with torch.no_grad():
        expected = _layer_update(*eager_args)
        got = compiled(*comp_args)
    return expected, got, eager_args, comp_args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [1, 3])
def test_cache_writes_and_counter_are_one_kernel_matching_eager(dtype, s, tmp_path):
    args = _inputs(dtype, s=s)
    expected, got, eager_args, comp_args = _run_both(
        args, debug=True, debug_dir=str(tmp_path / "dbg")
    )
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tolerances(dtype))
    # The mutations are visible to the caller, exactly as in eager.
    for g, e in zip(comp_args[2:], eager_args[2:]):
        torch.testing.assert_close(g, e, **tolerances(dtype))
    call = wrapper_call(tmp_path / "dbg")
    assert "index_copy" not in call and "add_" not in call, call
    report = yirage_dynamo.last_report()
    assert any(any("index_copy_" in o for o in k.origins) for k in report.kernels)


def test_repeated_steps_advance_the_counter_like_eager(tmp_path):
    args = _inputs(torch.float32, start=0)
    eager_args, comp_args = _clone(args), _clone(args)
    compiled = yirage_compile(_layer_update)
    with torch.no_grad():
        for _step in range(5):
            h = torch.randn(1, 1, 32)
            eager_args[0] = h
            comp_args[0] = h.clone()
            expected = _layer_update(*eager_args)
            got = compiled(*comp_args)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e)
    assert int(comp_args[4]) == 5
    torch.testing.assert_close(comp_args[2], eager_args[2])
    torch.testing.assert_close(comp_args[3], eager_args[3])


def test_out_of_range_position_raises_index_error_and_writes_nothing(tmp_path):
    args = _inputs(torch.float32, t=8, start=8)  # the cache is full
    eager_args, comp_args = _clone(args), _clone(args)
    compiled = yirage_compile(_layer_update)
    with torch.no_grad():
        compiled(*_clone(_inputs(torch.float32, t=8, start=2)))  # compile on a valid call
        with pytest.raises(IndexError):
            _layer_update(*eager_args)
        with pytest.raises(IndexError):
            compiled(*comp_args)
    # Eager bumps the counter before index_copy_ fails; the caches are untouched in both.
    assert int(comp_args[4]) == int(eager_args[4]) == 9
    torch.testing.assert_close(comp_args[2], args[2])
    torch.testing.assert_close(comp_args[3], args[3])


def test_disabled_by_environment_keeps_aten_calls(tmp_path, monkeypatch):
    monkeypatch.setenv("YIRAGE_CPU_KV_WRITE", "0")
    args = _inputs(torch.float32)
    expected, got, eager_args, comp_args = _run_both(
        args, debug=True, debug_dir=str(tmp_path / "dbg")
    )
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(comp_args[3], eager_args[3])
    assert "index_copy" in wrapper_call(tmp_path / "dbg")


def test_attention_writes_the_layout_its_view_chain_needs(tmp_path):
    """attention -> transpose -> view -> GEMM: no view call between attention and GEMM."""

    def f(q, k, v, w):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return o.transpose(1, 2).reshape(1, 1, -1) @ w

    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    w = torch.randn(64, 32)
    compiled = yirage_compile(f, debug=True, debug_dir=str(tmp_path / "dbg"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, w), f(q, k, v, w), atol=1e-5, rtol=1e-5)
    call = wrapper_call(tmp_path / "dbg")
    assert "as_strided" not in call and "transpose" not in call, call


def test_whole_graph_cache_restores_the_cache_write_kernel():
    states = []
    for _ in range(2):
        torch._dynamo.reset()
        args = _inputs(torch.float32)
        expected, got, eager_args, comp_args = _run_both(args, graph_cache=True)
        for g, e in zip([*got, *comp_args[2:]], [*expected, *eager_args[2:]]):
            torch.testing.assert_close(g, e)
        report = yirage_dynamo.last_report()
        states.append(report.graph_cache)
        assert any(any("index_copy_" in o for o in k.origins) for k in report.kernels)
    assert states == ["stored", "hit"]
