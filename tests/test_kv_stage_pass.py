"""The staging rewrite of lowering/cuda_kv_stage.py on any machine: reference ops stand in
for the Triton ones (`yirage_cuda::rotary_kv_write`, `rotary_kv_stage`, `decode_attention`),
as tests/test_cuda_kv_write.py does for the fused write."""

from __future__ import annotations

import pytest
import torch
from test_cuda_kv_write import _attend, _clones, _inputs
from torch._functorch.aot_autograd import make_boxed_func
from torch.fx.experimental.proxy_tensor import make_fx
from yirage_dynamo.lowering.cuda_kv_stage import (
    STAGE_ENV,
    AddressTables,
    StagedProgram,
    StageTable,
    _index_copy_row,
    enabled,
    stage_kv_writes,
    staged_program,
)
from yirage_dynamo.lowering.cuda_kv_write import rotary_kv_write_reference

import yirage_dynamo.ops  # noqa: F401 - registers yirage::rotary
from yirage_dynamo.options import parse_options


@torch.library.custom_op("yirage_stage_test::kv_write", mutates_args=("k_cache", "v_cache"))
def _kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    return rotary_kv_write_reference(q, k, v, cos, sin, k_cache, v_cache, pos)


@_kv_write.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, pos):
    return torch.empty_like(q)


@torch.library.custom_op(
    "yirage_stage_test::kv_stage", mutates_args=("k_stage", "v_stage", "stage_pos")
)
def _kv_stage(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_stage: torch.Tensor,
    v_stage: torch.Tensor,
    stage_pos: torch.Tensor,
    cache_len: int,
    pos: torch.Tensor,
) -> torch.Tensor:
    q2, k2 = torch.ops.yirage.rotary(q, k, cos, sin, False)
    k_stage.copy_(k2)
    v_stage.copy_(v)
    stage_pos.copy_(pos)
    return q2


@_kv_stage.register_fake
def _(q, k, v, cos, sin, k_stage, v_stage, stage_pos, cache_len, pos):
    return torch.empty_like(q)


@torch.library.custom_op("yirage_stage_test::attend", mutates_args=())
def _attend_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_stage: torch.Tensor | None = None,
    v_stage: torch.Tensor | None = None,
    stage_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    if stage_pos is not None:
        k_cache = k_cache.index_copy(2, stage_pos, k_stage)
        v_cache = v_cache.index_copy(2, stage_pos, v_stage)
    return _attend(q, k_cache, v_cache)


@_attend_op.register_fake
def _(q, k_cache, v_cache, k_stage=None, v_stage=None, stage_pos=None):
    return torch.empty_like(q)


OPS = (
    torch.ops.yirage_stage_test.kv_write.default,
    torch.ops.yirage_stage_test.kv_stage.default,
    torch.ops.yirage_stage_test.attend.default,
)


def _layer(q, k, v, cos, sin, kc, vc, pos):
    q2 = torch.ops.yirage_stage_test.kv_write(q, k, v, cos, sin, kc, vc, pos)
    return torch.ops.yirage_stage_test.attend(q2, kc, vc)


def _cache_also_summed(q, k, v, cos, sin, kc, vc, pos):
    q2 = torch.ops.yirage_stage_test.kv_write(q, k, v, cos, sin, kc, vc, pos)
    return torch.ops.yirage_stage_test.attend(q2, kc, vc) + kc.sum()


def _read_before_write(q, k, v, cos, sin, kc, vc, pos):
    before = torch.ops.yirage_stage_test.attend(q, kc, vc)
    q2 = torch.ops.yirage_stage_test.kv_write(q, k, v, cos, sin, kc, vc, pos)
    return torch.ops.yirage_stage_test.attend(q2, kc, vc) + before


def _two_positions_one_cache(q, k, v, cos, sin, kc, vc, pos):
    first = _layer(q, k, v, cos, sin, kc, vc, pos)
    return _layer(q, k, v, cos, sin, kc, vc, pos + 1) + first


def _second_cache_written_apart(q, k, v, cos, sin, kc, vc, pos):
    out = _layer(q, k, v, cos, sin, kc, vc, pos)
    kc2, vc2 = kc.clone(), vc.clone()  # another layer's caches, their writes not fused
    kc2.index_copy_(2, pos, k)
    return out + torch.ops.yirage_stage_test.attend(q, kc2, vc2)


def test_a_cache_read_before_its_write_sees_it_unwritten_staged_or_not():
    gm, caches, args = _staged(_read_before_write)
    assert caches == [(5, 6)]
    first, second = [n for n in gm.graph.nodes if n.target is OPS[2]]
    assert not first.kwargs and set(second.kwargs) == {"k_stage", "v_stage", "stage_pos"}
    table = StageTable()
    program = StagedProgram(make_boxed_func(gm.forward), caches, table)
    ref_args, got_args = _clones(args), _clones(args)
    torch.testing.assert_close(program(got_args), _read_before_write(*ref_args))
    table.commit()
    torch.testing.assert_close(got_args[5], ref_args[5])


def test_a_staged_program_of_a_plain_graph_module_calls_its_staged_forward():
    """A graph compiled outside Dynamo's compile context (a second model's weights,
    frozen_weights.py) is a plain GraphModule, not a lazy one: a `forward` bound before
    the rewrite kept the unstaged signature and every call failed (found on an H100)."""
    args = _inputs(1, 4, 2, 1, 16, 12, torch.float32, start=5)
    lazy = make_fx(_layer)(*_clones(args))
    gm = torch.fx.GraphModule(lazy, lazy.graph)
    assert not isinstance(gm, torch.fx._lazy_graph_module._LazyGraphModule)
    table = StageTable()
    program = staged_program(gm, table, *OPS)
    assert isinstance(program, StagedProgram) and program.caches == [(5, 6)]
    ref_args, got_args = _clones(args), _clones(args)
    torch.testing.assert_close(program(got_args), _layer(*ref_args))
    table.commit()
    torch.testing.assert_close(got_args[5], ref_args[5])
    torch.testing.assert_close(got_args[6], ref_args[6])
    assert staged_program(make_fx(_cache_also_summed)(*_clones(args)), table, *OPS) == (
        stage_kv_writes(make_fx(_cache_also_summed)(*_clones(args)), *OPS)
    )


def _staged(fn, s=1):
    args = _inputs(1, 4, 2, s, 16, 12, torch.float32, start=5)
    gm = make_fx(fn)(*_clones(args))
    return gm, stage_kv_writes(gm, *OPS), args


def test_a_decode_layer_is_staged_and_its_commit_writes_what_the_write_wrote():
    gm, caches, args = _staged(_layer)
    assert caches == [(5, 6)]
    targets = [n.target for n in gm.graph.nodes]
    assert OPS[0] not in targets and targets.count(OPS[1]) == 1
    (att,) = [n for n in gm.graph.nodes if n.target is OPS[2]]
    assert set(att.kwargs) == {"k_stage", "v_stage", "stage_pos"}
    assert len(gm.graph.find_nodes(op="placeholder")) == 8 + 3

    table = StageTable()
    program = StagedProgram(make_boxed_func(gm.forward), caches, table)
    ref_args, got_args = _clones(args), _clones(args)
    ref = _layer(*ref_args)
    got = program(got_args)
    torch.testing.assert_close(got, ref)
    # The caches are untouched until the commit, which writes exactly the eager write.
    assert torch.equal(got_args[5], args[5]) and torch.equal(got_args[6], args[6])
    table.commit()
    torch.testing.assert_close(got_args[5], ref_args[5])
    torch.testing.assert_close(got_args[6], ref_args[6])
    assert not table.used


def test_layers_sharing_one_staged_program_stage_into_their_own_buffers():
    """A regional step calls one program for every layer, each with its own caches."""
    gm, caches, args = _staged(_layer)
    table = StageTable()
    program = StagedProgram(make_boxed_func(gm.forward), caches, table)
    other = _inputs(1, 4, 2, 1, 16, 12, torch.float32, start=7)
    refs, gots = [_clones(args), _clones(other)], [_clones(args), _clones(other)]
    outs = [program(g) for g in gots]
    assert len(table.stages) == 2 and len(table.used) == 2
    table.commit()
    for out, ref, got in zip(outs, refs, gots, strict=True):
        torch.testing.assert_close(out, _layer(*ref))
        torch.testing.assert_close(got[5], ref[5])
        torch.testing.assert_close(got[6], ref[6])
    # A step that never reached its commit (a failed capture) is forgotten when the same
    # caches are staged again, and the commit writes the later step's row once.
    uncommitted = _clones(args)
    program(uncommitted)
    program(uncommitted)
    assert len(table.used) == 1
    table.commit()
    torch.testing.assert_close(uncommitted[5], refs[0][5])


class _AllRows:
    """A stand-in for the CUDA lowering's one-launch commit (lowering/triton_kv_write.py
    `KvCommitTable`): commits every row with `index_copy_`, or refuses (returns False)."""

    def __init__(self, accept: bool) -> None:
        self.accept, self.prepared, self.calls = accept, [], 0

    def prepare(self, rows: list) -> None:
        self.prepared.append(len(rows))

    def __call__(self, rows: list) -> bool:
        self.calls += 1
        if self.accept:
            for kc, vc, ks, vs, pos in rows:
                kc.index_copy_(2, pos, ks)
                vc.index_copy_(2, pos, vs)
        return self.accept


@pytest.mark.parametrize("accept", [True, False])
def test_a_table_commits_all_layers_at_once_where_it_can_and_row_by_row_where_not(accept):
    gm, caches, args = _staged(_layer)
    all_rows, by_row = _AllRows(accept), []

    def one_row(*row):
        by_row.append(row)
        _index_copy_row(*row)

    table = StageTable(one_row, all_rows)
    program = StagedProgram(make_boxed_func(gm.forward), caches, table)
    other = _inputs(1, 4, 2, 1, 16, 12, torch.float32, start=7)
    refs, gots = [_clones(args), _clones(other)], [_clones(args), _clones(other)]
    for g in gots:
        program(g)
    table.prepare_capture()  # what the runner calls before it captures the commit
    assert all_rows.prepared == [2]
    table(None)  # the runner's call
    assert all_rows.calls == 1 and len(by_row) == (0 if accept else 2)
    for ref, got in zip(refs, gots, strict=True):
        _layer(*ref)
        torch.testing.assert_close(got[5], ref[5])
        torch.testing.assert_close(got[6], ref[6])
    # One layer's row goes by itself: nothing to gain from a table.
    program(_clones(args))
    table.commit()
    assert all_rows.calls == 1 and len(by_row) == (1 if accept else 3)


def _rows(layers: int, d: int = 16) -> list[tuple[torch.Tensor, ...]]:
    """Stand-ins for a step's staged rows: caches [1, 2, 12, d], stages, positions."""
    return [
        (
            torch.zeros(1, 2, 12, d),
            torch.zeros(1, 2, 12, d),
            torch.zeros(1, 2, 1, d),
            torch.zeros(1, 2, 1, d),
            torch.tensor([3]),
        )
        for _ in range(layers)
    ]


def test_address_tables_are_found_by_the_rows_addresses_and_kept_while_their_caches_live():
    """The one-launch commit's tables (lowering/triton_kv_write.py `KvCommitTable`): built
    where allowed, found again for the same rows (as a capture must), none for rows of
    two layouts, and a table dropped only once its caches are gone."""
    tables = AddressTables()
    first = _rows(3)
    assert tables.get(first, build=False) is None  # a capture meeting unseen rows
    built = tables.get(first, build=True)
    assert built.tolist() == [t.data_ptr() for row in first for t in row]
    assert tables.get(first, build=False) is built
    second = _rows(3)
    assert tables.get(second, build=True) is not None and len(tables) == 2
    assert tables.get(first, build=False) is built  # still live: kept
    assert tables.get([first[0], _rows(1, d=32)[0]], build=True) is None
    del first, built
    tables.get(_rows(2), build=True)
    assert len(tables) == 2 and tables.get(second, build=False) is not None


@pytest.mark.parametrize(
    "fn,s,why",
    [
        (_cache_also_summed, 1, "the cache is used by"),
        (_layer, 3, "S == 1"),
        (_second_cache_written_apart, 1, "all or none are staged"),
        (_two_positions_one_cache, 1, "two writes into one cache"),
    ],
)
def test_graphs_staging_would_change_are_left_as_they_are(fn, s, why):
    gm, caches, _ = _staged(fn, s)
    assert isinstance(caches, str) and why in caches
    assert OPS[1] not in [n.target for n in gm.graph.nodes]


def test_staging_is_on_by_default_with_auto_run_ahead_and_needs_run_ahead(monkeypatch):
    monkeypatch.delenv(STAGE_ENV, raising=False)
    monkeypatch.delenv("YIRAGE_RUN_AHEAD", raising=False)
    assert not enabled(parse_options({"run_ahead": True}))
    assert not enabled(parse_options({"run_ahead": False}))
    assert enabled(parse_options({}))  # the default, "auto", runs ahead only staged steps
    assert enabled(parse_options({"run_ahead": "auto"}))
    monkeypatch.setenv(STAGE_ENV, "off")
    assert not enabled(parse_options({"run_ahead": "auto"}))
    monkeypatch.setenv(STAGE_ENV, "on")
    assert enabled(parse_options({"run_ahead": True}))
    assert not enabled(parse_options({"run_ahead": False}))
    monkeypatch.setenv(STAGE_ENV, "yes")
    with pytest.raises(ValueError, match=f"{STAGE_ENV}='yes'.*'on' or 'off'"):
        enabled(parse_options({"run_ahead": True}))


def test_a_regional_steps_runner_commits_what_its_pieces_staged(monkeypatch):
    """lowering/cuda.py: the pieces of one regional compile stage into the table its
    scope opens, and the stitched step's runner gets that table as its commit."""
    from yirage_dynamo.lowering import cuda as cuda_lowering
    from yirage_dynamo.lowering import cuda_kv_stage
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    monkeypatch.setenv(STAGE_ENV, "on")
    monkeypatch.delenv("YIRAGE_CUDA_GRAPHS", raising=False)
    monkeypatch.delenv("YIRAGE_RUN_AHEAD", raising=False)
    monkeypatch.setattr(cuda_lowering, "_stage_table", StageTable)  # no Triton here
    lowering = cuda_lowering.TritonLowering()
    options, inputs = parse_options({"run_ahead": True}), [torch.randn(2)]
    with lowering.regional_scope(inputs, options):
        table = cuda_kv_stage.CURRENT.get()
        assert isinstance(table, StageTable)
        StagedProgram(lambda args: None, [], table)  # a piece staged into it
        runner = lowering.finish_regional(lambda *a: None, inputs, options, frozenset())
    assert cuda_kv_stage.CURRENT.get() is None
    assert isinstance(runner, RunAheadRunner) and runner.commit is table
    # Without run-ahead nothing is staged, and no piece staged: no commit.
    in_order = parse_options({"run_ahead": False})
    with lowering.regional_scope(inputs, in_order):
        assert cuda_kv_stage.CURRENT.get() is None
        plain = lowering.finish_regional(lambda *a: None, inputs, in_order, frozenset())
    assert plain.commit is None


def test_auto_run_ahead_runs_ahead_only_a_step_with_a_commit(monkeypatch):
    """run_ahead="auto": a staged step (the lowering hands its runner a commit) gets the
    run-ahead runner; a step it could not stage runs in order."""
    from yirage_dynamo.lowering import cuda as cuda_lowering
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    auto = parse_options({"run_ahead": "auto"})
    staged = cuda_lowering._runner(lambda *a: None, frozenset(), auto, commit=lambda a: None)
    plain = cuda_lowering._runner(lambda *a: None, frozenset(), auto, commit=None)
    assert isinstance(staged, RunAheadRunner) and staged.choice is None  # with the trial
    assert type(plain) is CudaGraphRunner
    note = cuda_lowering._runner_note
    assert note(staged) == "cuda graphs: yirage runner, run-ahead, staged KV writes"
    assert note(plain) == "cuda graphs: yirage runner"
    # True keeps running an unstaged step ahead (opt-in, see runtime/run_ahead.py).
    assert isinstance(
        cuda_lowering._runner(
            lambda *a: None, frozenset(), parse_options({"run_ahead": True}), commit=None
        ),
        RunAheadRunner,
    )


def test_the_staged_commits_precompile_record_takes_the_caches_and_the_stage_buffers():
    """The CUDA lowering precompiles the one-launch commit's kernel with the layout of a
    staged graph's first cache and its stage buffers (`StagedProgram.commit_record`):
    the appended stage inputs, found by position, not the caches or the positions."""
    from yirage_dynamo.lowering.triton_pool import stand_in

    def two_layers(q, k, v, cos, sin, kc, vc, pos, kc2, vc2):
        return _layer(q, k, v, cos, sin, kc, vc, pos) + _layer(q, k, v, cos, sin, kc2, vc2, pos)

    args = _inputs(1, 4, 2, 1, 16, 12, torch.float32, start=5)
    gm = make_fx(two_layers)(*_clones(args), args[5].clone(), args[6].clone())
    program = staged_program(gm, StageTable(), *OPS)
    assert isinstance(program, StagedProgram) and program.caches == [(5, 6), (8, 9)]
    recorded = []

    class _Kernels:
        class KvCommitTable:
            record_launch = staticmethod(lambda *rows: recorded.append(rows))

    program.commit_record(gm, _Kernels, stand_in)()
    ((k_cache, v_cache, k_stage, v_stage),) = recorded
    assert k_cache.shape == v_cache.shape == args[5].shape
    assert k_stage.shape == v_stage.shape == (1, 2, 1, 16)
    assert not isinstance(k_stage, torch._subclasses.FakeTensor)
