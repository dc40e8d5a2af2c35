"""Host memory that compiling with yirage keeps or allocates beyond torch.compile's own.

benchmarks/bench_memory.py --floors measures the RSS; these check the mechanisms behind
its numbers: what must be freed after a compile is freed, and what is only needed on a
rare path is not built up front.
"""

from __future__ import annotations

import gc
import weakref

import torch
from yirage_dynamo.passes.freezing import Recipe
from yirage_dynamo.runtime import graph_cache

import yirage_dynamo
from yirage_dynamo import backend


def _record_fallback_copies(monkeypatch) -> list:
    copies: list = []
    original = backend._copy_graph_module

    def recording(gm):
        copy = original(gm)
        copies.append(copy)
        return copy

    monkeypatch.setattr(backend, "_copy_graph_module", recording)
    return copies


def _fn(x, y):
    return (x * y).relu() + x.sum()


def test_fallback_graph_is_freed_after_the_first_call(monkeypatch):
    # The guard's attributes are copied by functools.wraps into AOTAutograd's wrappers;
    # the pre-pass graph must not survive there once the first call succeeded.
    copies = _record_fallback_copies(monkeypatch)
    compiled = torch.compile(_fn, backend="yirage", options={"fallback": "eager"})
    x, y = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(compiled(x, y), _fn(x, y))
    assert len(copies) == 1
    ref = weakref.ref(copies.pop())
    gc.collect()
    assert ref() is None
    torch.testing.assert_close(compiled(x, y), _fn(x, y))  # still runs without it


def test_fallback_graph_code_is_generated_only_if_the_fallback_runs(monkeypatch):
    copies = _record_fallback_copies(monkeypatch)
    compiled = torch.compile(_fn, backend="yirage", options={"fallback": "eager"})
    x, y = torch.randn(8), torch.randn(8)
    compiled(x, y)
    (copy,) = copies
    # No Python source generated or compiled for a 30-layer graph nobody calls.
    assert type(copy).forward is type(copy)._lazy_forward
    assert yirage_dynamo.last_report().fallbacks == []


def test_rearming_cached_weights_keeps_no_reference_to_the_originals():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, 4), requires_grad=False) for n in (3, 2, 5, 5)]
    expected = [p.detach().clone() for p in params]
    originals = {p.untyped_storage().data_ptr() for p in params}
    inputs = [Recipe("input", i) for i in range(4)]
    cat_qkv = Recipe.call(torch.ops.aten.cat.default, ([inputs[0], inputs[1]], 0))
    cat_gu = Recipe.call(torch.ops.aten.cat.default, ([inputs[2], inputs[3]], 0))
    shared = [(0, cat_qkv, 0, 3), (1, cat_qkv, 3, 5), (2, cat_gu, 0, 5), (3, cat_gu, 5, 10)]
    memo: dict = {}
    graph_cache._rearm_shared_params(shared, params, memo)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)
    assert params[0].untyped_storage().data_ptr() == params[1].untyped_storage().data_ptr()
    assert params[2].untyped_storage().data_ptr() == params[3].untyped_storage().data_ptr()
    # Memoised views of the original weights would keep all of them alive while every
    # concatenation is built (the peak this avoids).
    held = {v.untyped_storage().data_ptr() for v in memo.values() if isinstance(v, torch.Tensor)}
    assert not held & originals
    # A constant that reads a re-armed input later sees the same values.
    torch.testing.assert_close(inputs[2].evaluate(params, memo), expected[2])
