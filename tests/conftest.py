"""Shared helpers: compile with yirage, compare with eager, reset Dynamo between tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("triton") is not None),
    reason="needs a GPU and triton",
)


def cuda_tol(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances for CUDA kernels vs references: bf16 within a couple of
    rounding steps (2^-8 relative each; fused kernels may land one step away)."""
    if dtype == torch.bfloat16:
        return {"atol": 2e-2, "rtol": 1.6e-2}
    return {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def _no_graph_cache(monkeypatch):
    # Tests observe what compilation does, so a graph compiled by an earlier test must not
    # come back from the whole-graph cache; tests/test_graph_cache.py turns it on itself.
    monkeypatch.setenv("YIRAGE_GRAPH_CACHE", "0")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def private_kernel_cache(tmp_path, monkeypatch):
    """A kernel cache of this test's own, no reports left by earlier tests, seeded RNG."""
    import yirage_dynamo

    monkeypatch.setenv("YIRAGE_CACHE_DIR", str(tmp_path / "cache"))
    yirage_dynamo.clear_reports()
    torch.manual_seed(0)


def wrapper_call(debug_dir) -> str:
    """Body of the generated wrapper's `call` (the one wrapper dumped under debug_dir)."""
    (wrapper,) = debug_dir.rglob("wrapper_*.py")
    return wrapper_call_of(wrapper.read_text())


def wrapper_call_of(source: str) -> str:
    return source.split("def call(args):")[1].split("def call_profiled")[0]


def yirage_compile(model, **options):
    options.setdefault("fallback", "error")
    options.setdefault("verify", True)
    return torch.compile(model, backend="yirage", options=options)


def tolerances(dtype: torch.dtype) -> dict:
    # bf16 has an 8-bit mantissa: one rounding step is ~4e-3 relative; the reordered
    # sums of a compiled graph may differ from eager by a few steps.
    if dtype == torch.bfloat16:
        return {"atol": 2e-2, "rtol": 2e-2}
    if dtype == torch.float16:
        return {"atol": 2e-3, "rtol": 2e-3}
    return {"atol": 1e-5, "rtol": 1.3e-6}
