"""Kernel programs (runtime/kernel_program.py): a CPU graph made only of our kernels runs as
one call into C. Checked against eager, on the fast path and on every way off it."""

from __future__ import annotations

import cProfile
import pstats

import pytest
import torch
from conftest import wrapper_call, yirage_compile
from torch.fx.experimental.proxy_tensor import make_fx
from yirage_dynamo.lowering.cpu import CppLowering
from yirage_dynamo.passes import run_pipeline
from yirage_dynamo.passes.context import PassContext
from yirage_dynamo.runtime import cpp_build

import yirage_dynamo
from yirage_dynamo.options import parse_options
from yirage_dynamo.report import CompileReport

pytestmark = [
    pytest.mark.skipif(cpp_build.find_compiler() is None, reason="no C++ compiler"),
    pytest.mark.usefixtures("private_kernel_cache"),
]


def _step(x, w, cache, pos):
    """Decode-step shaped: pointwise -> GEMV -> view chain -> cache write -> reduction."""
    y = (x * 2.0) @ w.t()
    cache.index_copy_(2, pos, y.view(1, 1, 2, 16).transpose(1, 2))
    return torch.exp(cache).sum(-1), torch.relu(y)


def _inputs(start=3):
    x, w = torch.randn(1, 48), torch.randn(32, 48) / 8
    return [x, w, torch.randn(1, 2, 8, 16), torch.tensor([start])]


def _lowered(fn, args, tmp_path):
    """The wrapper our CPU lowering builds for fn's ATen graph (no Dynamo around it)."""
    lowering = CppLowering()
    gm = make_fx(fn, decomposition_table=lowering.decompositions())(*args)
    ctx = PassContext(
        options=parse_options({"cache_dir": str(tmp_path / "cache")}),
        report=CompileReport(),
        capabilities=lowering.capabilities,
        example_inputs=list(args),
    )
    gm = run_pipeline(gm, ctx)
    return lowering.lower(gm, ctx), ctx.report


def _launcher_calls(run, args) -> tuple[int, list]:
    """(Python launcher calls, outputs) of one call of `run`."""
    prof = cProfile.Profile()
    prof.enable()
    out = run(list(args))
    prof.disable()
    stats = pstats.Stats(prof).stats
    return sum(v[0] for k, v in stats.items() if k[0].startswith("<yirage_launcher_")), out


def _check(got, args_got, want, args_want):
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args_got[2], args_want[2])


def test_layer_of_our_kernels_runs_as_one_program_matching_eager(tmp_path):
    args = _inputs()
    run, report = _lowered(_step, args, tmp_path)
    assert any(n.startswith("kernel program: 5 kernels") for n in report.notes), report.notes
    assert "_prog_run(" in run.source
    for start in (3, 4, 7):  # repeated calls: the table's pointers follow the new inputs
        args = _inputs(start)
        mine, ref = [a.clone() for a in args], [a.clone() for a in args]
        calls, got = _launcher_calls(run, mine)
        _check(got, mine, _step(*ref), ref)
        assert calls == 0


def test_input_with_other_strides_runs_the_launchers_and_matches_eager(tmp_path):
    run, _ = _lowered(_step, _inputs(), tmp_path)
    x, w, cache, pos = _inputs()
    w = w.t().contiguous().t()  # same values, column-major: the GEMV kernel cannot read it
    args = [x, w, cache, pos]
    mine, ref = [a.clone() if i != 1 else w for i, a in enumerate(args)], [a.clone() for a in args]
    calls, got = _launcher_calls(run, mine)
    _check(got, mine, _step(*ref), ref)
    assert calls > 0


def test_out_of_range_cache_position_raises_index_error_from_the_program(tmp_path):
    run, _ = _lowered(_step, _inputs(), tmp_path)
    args = _inputs(start=8)  # the cache holds 8 positions
    before = args[2].clone()
    with pytest.raises(IndexError):
        run(list(args))
    torch.testing.assert_close(args[2], before)  # nothing written


def test_profiler_sees_each_kernel_not_one_program(tmp_path):
    run, _ = _lowered(_step, _inputs(), tmp_path)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(_inputs())
    names = {e.key for e in prof.key_averages()}
    assert sum(1 for n in names if n.startswith("yk_")) == 5, names


def test_graph_with_an_aten_call_keeps_the_launchers_and_says_why(tmp_path):
    def f(x, w, idx):
        return torch.relu(x @ w.t()).index_select(1, idx)

    args = [torch.randn(1, 16), torch.randn(8, 16), torch.tensor([0, 2])]
    run, report = _lowered(f, args, tmp_path)
    assert "_prog_run(" not in run.source
    assert any("kernel program not used" in n and "index_select" in n for n in report.notes)
    torch.testing.assert_close(run(list(args)), f(*args))


def test_decode_through_dynamo_uses_programs_and_matches_eager(tmp_path):
    args = _inputs()
    compiled = yirage_compile(_step, debug=True, debug_dir=str(tmp_path / "dbg"))
    mine, ref = [a.clone() for a in args], [a.clone() for a in args]
    with torch.no_grad():
        _check(compiled(*mine), mine, _step(*ref), ref)
    assert "_prog_run(" in wrapper_call(tmp_path / "dbg")
    notes = yirage_dynamo.last_report().notes
    assert any(n.startswith("kernel program") for n in notes), notes


def test_whole_graph_cache_hit_rebuilds_the_program():
    notes = []
    for _ in range(2):
        torch._dynamo.reset()
        args = _inputs()
        mine, ref = [a.clone() for a in args], [a.clone() for a in args]
        compiled = yirage_compile(_step, graph_cache=True)
        with torch.no_grad():
            _check(compiled(*mine), mine, _step(*ref), ref)
        report = yirage_dynamo.last_report()
        notes.append((report.graph_cache, [n for n in report.notes if "program" in n]))
    assert [state for state, _ in notes] == ["stored", "hit"]
    assert notes[1][1] and notes[1][1][0].startswith("kernel program:"), notes


def _embedded_step(ids, table, w, cache, pos):
    """A whole-model shape: an ATen embedding first, then only our kernels."""
    x = torch.nn.functional.embedding(ids, table).view(1, 48)
    return _step(x, w, cache, pos)


def test_symbolic_cache_length_and_a_leading_aten_call_still_run_as_one_program(tmp_path):
    """HF generate() with a new length recompiles with the cache length symbolic; the
    graph starts with the embedding (ATen). Both stay on the one-call path."""
    table = torch.randn(100, 48)
    compiled = yirage_compile(_embedded_step, debug=True, debug_dir=str(tmp_path / "dbg"))
    for length, start in ((8, 3), (12, 9), (20, 0)):  # one compile serves every length
        x, w, cache, pos = _inputs(start)
        args = [torch.tensor([[7]]), table, w, torch.randn(1, 2, length, 16), pos]
        mine, ref = [a.clone() for a in args], [a.clone() for a in args]
        torch._dynamo.mark_dynamic(mine[3], 2)
        with torch.no_grad():
            got = compiled(*mine)
            want = _embedded_step(*ref)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine[3], ref[3])
    reports = yirage_dynamo.reports()
    assert len(reports) == 1, [r.graph_id for r in reports]
    assert any(n.startswith("kernel program: 5 kernels") for n in reports[0].notes), reports[
        0
    ].notes
    call = wrapper_call(tmp_path / "dbg")
    before, program_call = call.split("_prog_run(")
    assert "aten_embedding" in before, call
    # The cache length reaches the program as a size argument, not a pointer.
    sizes = [a for a in program_call.split(")\n")[0].split(", ")[2:] if "data_ptr" not in a]
    assert sizes, program_call
