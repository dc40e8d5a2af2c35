"""CPU decode: few, cheap calls per layer (rotary as one kernel, no views after kernels,
kernels called through the fast-call trampoline), each checked against eager."""

from __future__ import annotations

import ctypes
import re
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import tolerances, wrapper_call, yirage_compile
from yirage_dynamo.runtime import cpp_build

import yirage_dynamo

pytestmark = [
    pytest.mark.skipif(cpp_build.find_compiler() is None, reason="no C++ compiler"),
    pytest.mark.usefixtures("private_kernel_cache"),
]


def _compile_and_check(fn, args, tmp_path, strides=True, **options):
    """Compiled outputs (values, strides) equal eager's; (report, wrapper `call` body)."""
    with torch.no_grad():
        expected = fn(*args)
        got = yirage_compile(fn, debug=True, debug_dir=str(tmp_path / "dbg"), **options)(*args)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, **tolerances(e.dtype))
        assert a.stride() == e.stride() or not strides
    report = yirage_dynamo.last_report()
    assert report.lowering == "cpp" and not report.fallbacks
    assert not [n for n in report.notes if "left to ATen" in n], report.notes
    call = wrapper_call(tmp_path / "dbg")
    return report, call


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_inputs(h, w, cos, sin, heads=(4, 2), d=16):
    """HF Llama: fused qkv GEMM, head views, rotate-half RoPE on q and k."""
    qkv = h @ w
    b, s = h.shape[0], h.shape[1]
    nq, nk = heads[0] * d, heads[1] * d
    q = qkv[..., :nq].view(b, s, -1, d).transpose(1, 2)
    k = qkv[..., nq : nq + nk].view(b, s, -1, d).transpose(1, 2)
    v = qkv[..., nq + nk :].view(b, s, -1, d).transpose(1, 2)
    c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + _rotate_half(q) * sn, k * c + _rotate_half(k) * sn, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_of_fused_qkv_is_one_kernel_each_for_q_and_k(dtype, tmp_path):
    h = torch.randn(1, 3, 32, dtype=dtype)
    w = torch.randn(32, 128, dtype=dtype) / 6  # q, k ~ N(0, 1): bf16 rounding stays small
    cos, sin = torch.randn(1, 3, 16, dtype=dtype), torch.randn(1, 3, 16, dtype=dtype)
    # (yirage.rotary, which HF's RoPE becomes, returns contiguous q and k)
    report, call = _compile_and_check(_attention_inputs, (h, w, cos, sin), tmp_path, strides=False)
    # rotate-half (neg of one half, cat with the other) lives inside the q and k kernels
    assert len(report.kernels) == 2, [k.origins for k in report.kernels]
    assert "aten_cat" not in call and "aten_neg" not in call
    # v stays a view of the GEMM output (its guarded fallback is the only slice left)
    assert call.count("aten_slice") == 1 and "v_transpose" in call
    for k in report.kernels:
        assert any("cat" in o for o in k.origins) and any("neg" in o for o in k.origins)


def test_rotary_with_dynamic_sequence_length_compiles_once(tmp_path):
    torch._dynamo.utils.counters.clear()
    compiled = yirage_compile(_attention_inputs)
    w = torch.randn(32, 128)
    for s in (3, 5, 17):  # (a length of 1 would be specialised)
        h = torch.randn(2, s, 32)
        cos, sin = torch.randn(2, s, 16), torch.randn(2, s, 16)
        for t in (h, cos, sin):
            torch._dynamo.mark_dynamic(t, 1)  # the sequence length, like HF prefill
        with torch.no_grad():
            for got, want in zip(compiled(h, w, cos, sin), _attention_inputs(h, w, cos, sin)):
                torch.testing.assert_close(got, want)
    cpp = [r for r in yirage_dynamo.reports() if r.lowering == "cpp"]
    assert len(cpp) == 1 and len(cpp[0].kernels) == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_rotary_on_noncontiguous_q_with_partial_rotation(tmp_path):
    def f(x, cos, sin):  # rotate the first 8 of 12 features, pass the rest through
        rot, rest = x[..., :8], x[..., 8:]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)

    x = torch.randn(2, 5, 3, 12).transpose(1, 2)  # non-contiguous
    report, call = _compile_and_check(
        f, (x, torch.randn(5, 8), torch.randn(5, 8)), tmp_path, strides=False
    )
    assert len(report.kernels) == 1 and "aten_cat" not in call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_feeding_a_gemm_is_written_in_the_gemm_layout(dtype, tmp_path):
    w_up = torch.randn(64, 96, dtype=dtype) / 8  # (a bf16 ulp of n moves the GEMM little)

    def f(x, r, w):
        h = x + r
        hf = h.float()
        n = (w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6))).to(dtype)
        return n.view(-1, 64) @ w_up, h

    args = (torch.randn(1, 1, 64, dtype=dtype), torch.randn(1, 1, 64, dtype=dtype))
    report, call = _compile_and_check(f, (*args, torch.randn(64, dtype=dtype)), tmp_path)
    assert len(report.kernels) == 1
    assert ".view(" not in call and "aten_view" not in call  # the kernel wrote [1, 64]


def test_view_of_a_value_also_used_outside_stays_a_view(tmp_path):
    w_up = torch.randn(64, 96)

    def f(x, w):
        n = (x * w).sin()
        return n.view(-1, 64) @ w_up, n.transpose(1, 2)  # n itself escapes too

    report, call = _compile_and_check(f, (torch.randn(2, 3, 64), torch.randn(64)), tmp_path)
    assert len(report.kernels) == 1


def test_launchers_call_kernels_through_the_trampoline():
    launchers = []
    real = cpp_build.make_launcher

    def spy(*args, **kwargs):
        launchers.append(real(*args, **kwargs))
        return launchers[-1]

    cpp_build.make_launcher = spy
    try:
        x = torch.randn(4, 8)
        torch.testing.assert_close(yirage_compile(lambda t: t.exp() + 1)(x), x.exp() + 1)
    finally:
        cpp_build.make_launcher = real
    (launcher,) = launchers
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        assert "_fn(" in launcher.source  # no Python headers: ctypes
    else:
        assert re.search(r"_call\(_fp, a0\.data_ptr\(\), o0\.data_ptr\(\)\)", launcher.source)


def test_packed_entry_passes_pointers_ints_and_doubles(tmp_path):
    cxx = cpp_build.find_compiler()
    call = cpp_build.fast_caller(cxx, tmp_path)
    if call is None:
        pytest.skip("no Python headers: launchers use ctypes")
    types = ["const float*", "double", "int64_t", "float*"]
    source = (
        "#include <cstdint>\n#include <cstring>\n"
        'extern "C" void k(const float* __restrict__ x, double s, int64_t n, '
        "float* __restrict__ o) { for (int64_t i = 0; i < n; ++i) o[i] = x[i] * s + n; }\n"
        + cpp_build.packed_entry("k", types)
    )
    so = cpp_build.build_shared_object(source, cxx, ("-O1",), tmp_path, {})
    lib = cpp_build.load_library(so)
    fp = ctypes.cast(lib.k_p, ctypes.c_void_p).value
    x, o = torch.randn(7), torch.zeros(7)
    call(fp, x.data_ptr(), -2.5, 5, o.data_ptr())
    torch.testing.assert_close(o[:5], x[:5] * -2.5 + 5)
    assert (o[5:] == 0).all()
    with pytest.raises(TypeError):
        call(fp, x.data_ptr(), -2.5, "5", o.data_ptr())


def test_launcher_checks_strides_and_runs_the_reference_for_others():
    launchers = []
    real = cpp_build.make_launcher

    def spy(*args, **kwargs):
        launchers.append(real(*args, **kwargs))
        return launchers[-1]

    def f(x, y):
        return (x * 2 + y).sin()

    x, y = torch.randn(4, 8), torch.randn(1, 8)
    cpp_build.make_launcher = spy
    try:
        torch.testing.assert_close(yirage_compile(f)(x, y), f(x, y))
    finally:
        cpp_build.make_launcher = real
    (launcher,) = launchers
    assert "is_contiguous()" in launcher.source
    column_major = torch.randn(8, 4).t()  # same shape, other strides: ATen reference
    odd_unit_stride = torch.randn(1, 8).as_strided((1, 8), (99, 1))  # still contiguous
    for a, b in ((column_major, y), (x, odd_unit_stride), (column_major, odd_unit_stride)):
        torch.testing.assert_close(launcher(a, b), f(a, b))
        out = torch.empty(4, 8)
        assert launcher(a, b, out=out) is out
        torch.testing.assert_close(out, f(a, b))
