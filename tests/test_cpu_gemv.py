"""CPU decode GEMVs (lowering/c_gemv.py): `mm(x[M <= 4, K], t(W))` as our own C++ kernel,
checked against eager, with the generated wrapper and kernel source."""

from __future__ import annotations

import pytest
import torch
from conftest import wrapper_call, yirage_compile
from yirage_dynamo.runtime import cpp_build

import yirage_dynamo

pytestmark = [
    pytest.mark.skipif(cpp_build.find_compiler() is None, reason="no C++ compiler"),
    pytest.mark.usefixtures("private_kernel_cache"),
]

# The kernel sums K products in another order than MKL: a few fp32 roundings apart.
_TOL = {"atol": 1e-4, "rtol": 1e-5}


def _linear(x, w):
    return torch.nn.functional.linear(x, w) * 2.0


def _compile_and_check(fn, args, tmp_path):
    compiled = yirage_compile(fn, debug=True, debug_dir=str(tmp_path / "dbg"))
    with torch.no_grad():
        got, expected = compiled(*args), fn(*args)
    torch.testing.assert_close(got, expected, **_TOL)
    return wrapper_call(tmp_path / "dbg"), yirage_dynamo.last_report()


def _kernel_sources(tmp_path) -> str:
    return "".join(p.read_text() for p in (tmp_path / "dbg").rglob("kernels/*.cpp"))


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize(("n", "k"), [(1000, 300), (7, 576), (1001, 17), (1, 33)])
def test_decode_linear_is_our_gemv_kernel_matching_eager(m, n, k, tmp_path):
    """Row counts with and without a 4-row tail, K with and without a vector tail."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    call, report = _compile_and_check(_linear, (x, w), tmp_path)
    assert "mm(" not in call, call
    assert report.patterns.get("cpu_gemv") == 1
    source = _kernel_sources(tmp_path)
    parallel = "true" if m * n * k >= 1 << 16 and n >= 8 else "false"
    assert f"ygemv::run<{m}>(p0, {k}, p1, {n}, {k}, o0, {n}, {parallel});" in source


def test_batched_decode_input_is_flattened_to_rows_and_stays_exact(tmp_path):
    x, w = torch.randn(2, 1, 64), torch.randn(96, 64)  # [batch, token, hidden] as in HF
    call, report = _compile_and_check(_linear, (x, w), tmp_path)
    assert report.patterns.get("cpu_gemv") == 1, report.notes


class _Mlp(torch.nn.Module):
    def __init__(self, d: int = 64, h: int = 128) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(d, h, bias=False)
        self.up = torch.nn.Linear(d, h, bias=False)
        self.down = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def test_every_projection_of_a_decode_mlp_uses_the_kernel(tmp_path):
    mlp = _Mlp().eval()
    call, report = _compile_and_check(mlp, (torch.randn(1, 1, 64),), tmp_path)
    assert "mm(" not in call, call
    # gate and up (frozen weights) are one GEMV after horizontal fusion; down the second.
    assert any(k.startswith("horizontal_gemm") for k in report.patterns), report.patterns
    assert report.patterns["cpu_gemv"] == 2


def test_prefill_rows_stay_an_mkl_gemm(tmp_path):
    x, w = torch.randn(5, 64), torch.randn(32, 64)
    call, report = _compile_and_check(_linear, (x, w), tmp_path)
    assert "torch.mm(" in call
    assert "cpu_gemv" not in report.patterns


@pytest.mark.parametrize(
    ("x", "w", "why"),
    [
        (
            torch.randn(1, 64, dtype=torch.bfloat16),
            torch.randn(32, 64, dtype=torch.bfloat16),
            "fp32",
        ),
        (torch.randn(1, 128)[:, ::2], torch.randn(32, 64), "x rows"),
    ],
    ids=["bf16", "strided_x"],
)
def test_unsupported_operands_stay_aten_calls_with_a_reason(x, w, why, tmp_path):
    compiled = yirage_compile(_linear, debug=True, debug_dir=str(tmp_path / "dbg"))
    with torch.no_grad():
        got, expected = compiled(x, w), _linear(x, w)
    tol = {"atol": 2e-2, "rtol": 2e-2} if x.dtype == torch.bfloat16 else _TOL
    torch.testing.assert_close(got, expected, **tol)
    report = yirage_dynamo.last_report()
    assert "cpu_gemv" not in report.patterns
    assert any("stays an ATen call" in n and why in n for n in report.notes), report.notes


def test_weight_read_as_stored_matrix_not_transpose_stays_aten(tmp_path):
    # x @ w with w [K, N] row-major: the kernel's rows would be w's columns.
    def f(x, w):
        return x @ w

    x, w = torch.randn(1, 64), torch.randn(64, 32)
    call, report = _compile_and_check(f, (x, w), tmp_path)
    assert "cpu_gemv" not in report.patterns
    assert any("transpose of a row-major" in n for n in report.notes), report.notes


def test_disabled_by_environment_keeps_the_mkl_call(tmp_path, monkeypatch):
    monkeypatch.setenv("YIRAGE_CPU_GEMV", "0")
    call, report = _compile_and_check(_linear, (torch.randn(1, 64), torch.randn(32, 64)), tmp_path)
    assert "torch.mm(" in call
    assert "cpu_gemv" not in report.patterns


def test_whole_graph_cache_restores_the_gemv_kernel():
    x, w = torch.randn(1, 64), torch.randn(48, 64)
    states = []
    for _ in range(2):
        torch._dynamo.reset()
        compiled = yirage_compile(_linear, graph_cache=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, w), _linear(x, w), **_TOL)
        report = yirage_dynamo.last_report()
        states.append(report.graph_cache)
        assert any(any("aten.mm" in o for o in k.origins) for k in report.kernels)
    assert states == ["stored", "hit"]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize(("n", "k"), [(1000, 300), (7, 576), (1001, 17)])
def test_decode_linear_with_bias_is_our_gemv_adding_the_bias(m, n, k, tmp_path):
    """addmm(bias, x, t(W)): a Linear with bias (Qwen2's q/k/v) runs the kernel too."""
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)

    def fn(x, w, b):
        return torch.nn.functional.linear(x, w, b) * 2.0

    call, report = _compile_and_check(fn, (x, w, b), tmp_path)
    assert "addmm(" not in call and "mm(" not in call, call
    assert report.patterns.get("cpu_gemv") == 1
    assert f"ygemv::run<{m}, true>(" in _kernel_sources(tmp_path)


def test_bias_that_is_not_a_vector_keeps_the_mkl_addmm(tmp_path):
    x, w, b = torch.randn(1, 64), torch.randn(96, 64), torch.randn(1, 96)

    def fn(x, w, b):
        return torch.addmm(b, x, w.t()) * 2.0

    call, report = _compile_and_check(fn, (x, w, b), tmp_path)
    assert "addmm" in call and not report.patterns.get("cpu_gemv")
