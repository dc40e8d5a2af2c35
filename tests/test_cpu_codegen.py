"""CPU lowering: fused regions rendered as C++/OpenMP kernels, checked against eager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tolerances, yirage_compile
from yirage_dynamo.lowering.base import Capabilities
from yirage_dynamo.lowering.cpu import CppLowering
from yirage_dynamo.runtime.cpp_build import find_compiler

import yirage_dynamo

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YIRAGE_CACHE_DIR", str(tmp_path / "cache"))
    yirage_dynamo.clear_reports()


def _report():
    reps = [r for r in yirage_dynamo.reports() if r.lowering == "cpp"]
    assert reps, [str(r) for r in yirage_dynamo.reports()]
    return reps[-1]


def _check(fn, *args, tol=None, equal_nan=False, **options):
    ref = fn(*args)
    out = yirage_compile(fn, **options)(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    out = out if isinstance(out, tuple) else (out,)
    for a, b in zip(out, ref):
        kw = tol or tolerances(b.dtype if b.is_floating_point() else torch.float32)
        if not b.is_floating_point():
            kw = {"atol": 0, "rtol": 0}
        torch.testing.assert_close(a, b, equal_nan=equal_nan, **kw)
    report = _report()
    assert not report.fallbacks
    assert not [n for n in report.notes if "left to ATen" in n], report.notes
    return report


UNARY = [
    torch.neg,
    torch.abs,
    torch.exp,
    torch.log1p,
    torch.sqrt,
    torch.rsqrt,
    torch.sin,
    torch.cos,
    torch.tanh,
    torch.sigmoid,
    torch.erf,
    torch.floor,
    torch.reciprocal,
    torch.nn.functional.silu,
    torch.relu,
    torch.nn.functional.gelu,
    torch.expm1,
    lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    lambda x: x.pow(2),
    lambda x: x.pow(3.5),
    lambda x: x.clamp(-0.5, 0.7),
]
BINARY = [
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    lambda a, b: torch.where(a > b, a, b),
    lambda a, b: torch.pow(a * a + 0.5, b),
    lambda a, b: a.masked_fill(b > 0.5, -1.0),
    lambda a, b: torch.add(a, b, alpha=2),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_pointwise_op_alone_is_one_kernel_matching_eager(dtype):
    def f(x, y):
        return tuple(op(x) for op in UNARY) + tuple(op(x, y) for op in BINARY)

    x = torch.rand(7, 33, dtype=dtype) + 0.1
    y = torch.randn(7, 33, dtype=dtype)
    report = _check(f, x, y)
    assert len(report.kernels) == len(UNARY) + len(BINARY)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_chain_fuses_into_one_parallel_kernel(dtype):
    def f(x, y):
        return torch.sigmoid(x * 2.0 + y).sin() * y - 1.0

    x = torch.randn(64, 130, dtype=dtype)
    y = torch.randn(64, 130, dtype=dtype)
    tol = {"atol": 5e-3, "rtol": 5e-3} if dtype == torch.float16 else None
    report = _check(f, x, y, tol=tol)
    assert len(report.kernels) == 1
    src = Path(report.kernels[0].source_path).read_text()
    assert "#pragma omp parallel for" in src and "#pragma omp simd" in src
    assert len(report.kernels[0].origins) >= 5


def test_noncontiguous_transposed_broadcast_and_0d_inputs():
    def f(a, b, c, s):
        return (a.t() * b + c.t()) / s, (a + c).exp(), (a[:, ::2] - s).abs()

    base = torch.randn(12, 10)
    a = base[::2, 1:]  # (6, 9), non-contiguous
    b = torch.randn(9, 1)  # broadcast along the last dim of a.t()
    c = torch.randn(9).expand(6, 9)  # stride-0 input
    s = torch.tensor(1.5)  # 0-d
    _check(f, a, b, c, s)


@pytest.mark.parametrize(
    "dtype,dim",
    [
        (torch.float32, 0),
        (torch.float32, 1),
        (torch.float32, 2),
        (torch.float32, (0, 2)),
        (torch.bfloat16, 2),
        (torch.bfloat16, (0, 1)),
    ],
)
def test_reductions_over_each_dim_with_and_without_keepdim(dtype, dim):
    def f(x):
        return tuple(
            r
            for k in (False, True)
            for r in (
                x.sum(dim, keepdim=k),
                x.mean(dim, keepdim=k),
                x.amax(dim, keepdim=k),
                x.amin(dim, keepdim=k),
                torch.var(x, dim, keepdim=k, correction=1),
            )
        )

    x = torch.randn(5, 6, 7, dtype=dtype)
    report = _check(f, x)
    assert 1 <= len(report.kernels) <= 10


def test_reduction_propagates_nan_like_eager():
    def f(x):
        return x.amax(-1), x.amin(-1), x.sum(-1)

    x = torch.randn(4, 50)
    x[1, 7] = float("nan")
    _check(f, x, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_layernorm_rmsnorm_on_large_rows(dtype):
    ln = torch.nn.LayerNorm(20000, dtype=dtype)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()

    def f(x, w):
        rms = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(
            dtype
        )
        return torch.softmax(x, -1), torch.log_softmax(x.float(), -1), ln(x), rms

    x = torch.randn(3, 20000, dtype=dtype) * 4 + 3
    w = torch.randn(20000, dtype=dtype)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else None
    with torch.no_grad():
        report = _check(f, x, w, tol=tol)
    assert len(report.kernels) <= 5


def test_rmsnorm_with_residual_is_one_kernel_with_two_outputs():
    def f(x, r, w):
        h = x + r
        n = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        return n, h

    report = _check(f, torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.randn(64))
    assert len(report.kernels) == 1


def test_rotary_cat_and_slices_fuse():
    def f(x, cos, sin):
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    x = torch.randn(1, 4, 3, 16).transpose(1, 2)
    report = _check(f, x, torch.randn(3, 1, 16), torch.randn(3, 1, 16))
    assert len(report.kernels) == 1


def test_int_and_bool_ops_and_casts():
    def f(i, j, x):
        m = (i > j) | (x > 0)
        return i + j * 3, torch.where(m, i, j), (i.float() / 2 + x).to(torch.int32), m, ~m

    i = torch.randint(-50, 50, (6, 7))
    j = torch.randint(-50, 50, (6, 7), dtype=torch.int32)
    _check(f, i, j, torch.randn(6, 7))


def test_dynamic_sizes_one_compile_serves_all_lengths():
    def f(x, w):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
        return torch.softmax(h, -1) + x.sin()

    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(
        f, backend="yirage", dynamic=True, options={"fallback": "error", "verify": True}
    )
    w = torch.randn(32)
    for n in (3, 5, 17, 64, 1000):
        x = torch.randn(2, n, 32)
        torch.testing.assert_close(compiled(x, w), f(x, w))
    cpp = [r for r in yirage_dynamo.reports() if r.lowering == "cpp"]
    assert len(cpp) == 1 and len(cpp[0].kernels) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_unrenderable_region_runs_aten_reference_with_note():
    def f(i):
        return (i + 1) ** 5  # integer pow (other than by 1, 2 or 3) is not rendered

    i = torch.randint(-5, 5, (4, 4))
    out = yirage_compile(f)(i)
    torch.testing.assert_close(out, f(i))
    report = _report()
    assert any("left to ATen" in n for n in report.notes)


def test_fusion_is_noop_without_kernel_generation():
    from torch.fx.experimental.proxy_tensor import make_fx
    from yirage_dynamo.passes.context import PassContext
    from yirage_dynamo.passes.fusion import fuse_regions

    from yirage_dynamo.options import parse_options
    from yirage_dynamo.report import CompileReport

    gm = make_fx(lambda x: (x + 1).sin(), tracing_mode="fake")(torch.randn(4))
    for caps in (
        Capabilities(device_type="cpu"),
        Capabilities(device_type="cpu", generates_kernels=True),
    ):
        ctx = PassContext(parse_options(), CompileReport(), caps, [])
        assert fuse_regions(gm, ctx) == 0
    ctx = PassContext(parse_options(), CompileReport(), CppLowering.capabilities, [])
    assert fuse_regions(gm, ctx) == 1
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1


def test_no_compiler_means_aten_lowering(monkeypatch):
    monkeypatch.setenv("YIRAGE_CXX", "/nonexistent/c++")
    out = yirage_compile(lambda x: x.sin() + 1)(torch.randn(5))
    assert out.shape == (5,)
    report = yirage_dynamo.last_report()
    assert report.lowering == "aten" and "no C++ compiler" in report.device_reason


def test_debug_dump_writes_kernels_with_origins(tmp_path):
    def f(x):
        return (x * 3).cos()

    yirage_compile(f, debug=True, debug_dir=str(tmp_path / "dbg"))(torch.randn(8))
    dumped = list((tmp_path / "dbg").rglob("kernels/*.cpp"))
    assert len(dumped) == 1
    text = dumped[0].read_text()
    assert "FX origins" in text and "aten.mul.Tensor" in text and "aten.cos" in text
    assert list((tmp_path / "dbg").rglob("wrapper_*.py"))


_CHILD = textwrap.dedent(
    """
    import json, sys, torch, yirage_dynamo
    from yirage_dynamo.runtime import cpp_build
    calls = []
    real = cpp_build.run_compiler
    def spy(argv):
        calls.append(argv)
        return real(argv)
    cpp_build.run_compiler = spy
    f = torch.compile(lambda x, w: torch.softmax(x * w, -1) + 1, backend="yirage",
                      options={"fallback": "error"})
    x, w = torch.randn(4, 16), torch.randn(16)
    torch.testing.assert_close(f(x, w), torch.softmax(x * w, -1) + 1)
    r = yirage_dynamo.last_report()
    print(json.dumps({"calls": len(calls), "cache": r.cache, "kernels": len(r.kernels)}))
    """
)


def _child(env) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_hits_cache_without_invoking_compiler(tmp_path):
    env = dict(os.environ, YIRAGE_CACHE_DIR=str(tmp_path / "c"))
    first = _child(env)
    assert first["calls"] >= 1 and first["cache"] == {"hits": 0, "misses": 1}
    second = _child(env)
    assert second["calls"] == 0 and second["cache"] == {"hits": 1, "misses": 0}
    # A truncated shared object is detected (checksum) and rebuilt.
    for so in (tmp_path / "c" / "cpp").rglob("kernels_*.so"):
        so.write_bytes(so.read_bytes()[:100])
    third = _child(env)
    assert third["calls"] >= 1 and third["cache"] == {"hits": 0, "misses": 1}


def test_yirage_custom_ops_are_expanded_and_fused():
    import yirage_dynamo.ops  # noqa: F401 - registers torch.ops.yirage

    def f(x, r, w, g, u):
        n, h = torch.ops.yirage.rms_norm_residual(x, r, w, 1e-6)
        return n, h, torch.ops.yirage.gated_act(g, u, "silu")

    args = [torch.randn(2, 64), torch.randn(2, 64), torch.randn(64)]
    args += [torch.randn(2, 96), torch.randn(2, 96)]
    report = _check(f, *args)
    assert len(report.kernels) == 2
    assert not [n for n in report.notes if "ATen reference" in n], report.notes


def test_layer_norm_reference_leaves_no_dead_allocations_in_the_wrapper(
    tmp_path, private_kernel_cache
):
    """AOTAutograd hands LayerNorm over as prims (var, sum, ...); their traced references
    allocate outputs (empty_strided / empty_permuted) that nothing reads once fused. Left
    in the graph, each was an allocation per call (6 per BERT layer)."""
    from conftest import wrapper_call

    ln = torch.nn.LayerNorm(64).eval()
    with torch.no_grad():
        ln.weight.add_(torch.randn(64) * 0.1)

    def f(x, r):
        return ln(x + r)

    debug = tmp_path / "debug"
    compiled = yirage_compile(f, debug=True, debug_dir=str(debug))
    x, r = torch.randn(4, 7, 64), torch.randn(4, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, r), f(x, r), atol=1e-5, rtol=1e-5)
    body = wrapper_call(debug)
    assert "yk_" in body  # the norm ran as our kernel
    # (the kernel program allocates its output with torch.empty_strided: that one is used)
    assert "aten_empty_strided" not in body and "aten_empty_permuted" not in body, body


_TRANSCENDENTAL = {
    "exp": torch.exp,
    "erf": torch.erf,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", sorted(_TRANSCENDENTAL))
def test_vectorised_transcendentals_match_eager_over_the_float_range(
    op, dtype, private_kernel_cache
):
    """exp/erf/tanh are our own polynomials in the C++ prelude (libm's are a call per
    element, never vectorised): overflow, underflow, signed zeros, inf and NaN included."""
    fn = _TRANSCENDENTAL[op]
    specials = [0.0, -0.0, 1e-30, -1e-30, 1e-7, 0.62, 0.63, 88.7, 89.0, -87.5, -103.9]
    x = torch.cat(
        [
            torch.linspace(-110.0, 100.0, 4001),
            torch.tensor(specials + [float("inf"), float("-inf"), float("nan")]),
            torch.randn(2000) * 3,
        ]
    )
    import yirage_dynamo

    x = x.to(dtype)
    got = yirage_compile(lambda t: fn(t) * 1.0)(x)
    tol = {"atol": 1e-6, "rtol": 3e-6} if dtype == torch.float32 else tolerances(dtype)
    # Eager in float64: eager's own fp32 kernels differ by CPU at the edges (with AVX-512,
    # fp32 gelu(inf) is NaN and gelu(3e38) overflows to inf; with AVX2 they are inf, 3e38).
    torch.testing.assert_close(got, fn(x.double()).to(dtype), equal_nan=True, **tol)
    assert [k.device for k in yirage_dynamo.reports()[-1].kernels] == ["cpu"]  # our kernel ran


@pytest.mark.parametrize("exponent", [3, -2, -0.5, 2, 0.5, -1])
def test_pow_by_atens_special_exponents_is_arithmetic_not_libm(
    exponent, tmp_path, private_kernel_cache
):
    """GPT-2's GELU cubes its input: libm's pow was a call per element (3.1 of 3.2 ms per
    GELU at [128, 3072]). ATen computes these exponents by multiplication, square root
    and division; the kernel does the same, so the results round alike."""
    debug = tmp_path / "debug"
    compiled = yirage_compile(lambda x: x.pow(exponent) + 1, debug=True, debug_dir=str(debug))
    x = torch.rand(16, 300) * 4 + 0.1
    torch.testing.assert_close(compiled(x), x.pow(exponent) + 1, atol=0, rtol=2e-7)
    (kernel,) = [p for p in debug.rglob("kernels/*.cpp")]
    assert "pow(" not in kernel.read_text().split("extern")[-1]


def test_large_graphs_build_as_two_units_with_each_launcher_on_its_own_library():
    from types import SimpleNamespace

    from yirage_dynamo.lowering.cpu import SPLIT_UNIT_CHARS, split_units, unit_source

    def kernel(name, size):
        rendered = SimpleNamespace(c_types=("const float*",), returns_status=False)
        return SimpleNamespace(symbol=name, source="x" * size, rendered=rendered)

    small = [kernel("a", 100), kernel("b", 200)]
    assert split_units(small, cores=2) == [small]
    big = [kernel("k0", 500), kernel("attn", SPLIT_UNIT_CHARS), kernel("k2", 700)]
    big.append(kernel("gemv", SPLIT_UNIT_CHARS // 3))
    units = split_units(big, cores=2)
    assert [[k.symbol for k in u] for u in units] == [["attn"], ["k0", "k2", "gemv"]]
    assert split_units(big, cores=1) == [big]
    # Each unit carries the prelude and the packed twins of its own kernels only.
    text = unit_source(units[1])
    assert "k2_p(" in text and "attn_p(" not in text and "y_exp" in text
