"""What runs between Dynamo and the compiled program on every call: host time that a
decode step's GPU waits for. AOTAutograd's runtime wrapper is skipped where it would do
nothing (yirage_dynamo/backend.py, _AotCompiler.direct) and kept where it has work."""

from __future__ import annotations

import torch
import torch._dynamo

import yirage_dynamo
from yirage_dynamo.backend import _FirstCallGuard, yirage
from yirage_dynamo.frozen_weights import FrozenWeightsGuard


def _compile(fn, *args):
    """(the callable our backend gave Dynamo, the compiled fn's result on `args`)."""
    seen = []

    def spy(gm, example_inputs):
        seen.append(yirage(gm, example_inputs))
        return seen[-1]

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=spy)(*args)
    assert len(seen) == 1
    return seen[0], out


def _program(given):
    """The program behind the frozen-weights guard (if any)."""
    return given.programs[0][1] if isinstance(given, FrozenWeightsGuard) else given


def test_dynamo_calls_the_program_directly_where_aotautograd_adds_nothing():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    given, out = _compile(mlp, x)
    assert isinstance(given, FrozenWeightsGuard)
    assert type(_program(given)) is _FirstCallGuard
    with torch.no_grad():
        torch.testing.assert_close(out, mlp(x))


def test_input_mutation_in_the_graph_needs_no_wrapper():
    def step(cache, pos, x):
        cache.index_copy_(0, pos, x * 2)
        return cache.sum(0)

    cache, pos, x = torch.zeros(6, 4), torch.tensor([2]), torch.randn(1, 4)
    ref_cache = cache.clone()
    given, out = _compile(step, cache, pos, x)
    assert type(_program(given)) is _FirstCallGuard
    expected = step(ref_cache, pos, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)


def test_an_output_aliasing_its_input_keeps_aotautograd_s_wrapper():
    def f(x):
        return x.view(-1), x * 2

    x = torch.randn(2, 3)
    given, (flat, doubled) = _compile(f, x)
    assert type(_program(given)) is not _FirstCallGuard
    assert flat.data_ptr() == x.data_ptr()  # AOTAutograd regenerates the view of x
    torch.testing.assert_close(doubled, x * 2)


def test_a_graph_traced_under_autocast_keeps_aotautograd_s_wrapper(tmp_path):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    seen = []

    def spy(gm, example_inputs):
        options = {"graph_cache": True, "cache_dir": str(tmp_path)}
        seen.append(yirage(gm, example_inputs, options=options))
        return seen[-1]

    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(lin, backend=spy)(x)
        ref = lin(x)
    assert type(_program(seen[0])) is not _FirstCallGuard
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    # Nor may the whole-graph cache hand it out without the wrapper on a later hit.
    report = yirage_dynamo.reports()[-1]
    assert report.graph_cache == "not used: traced under autocast"
