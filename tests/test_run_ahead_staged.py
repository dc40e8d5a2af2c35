"""A decode step whose KV-cache write is staged (runtime/cuda_graphs.py: the compiled
function writes the new row into a buffer of its own, and the runner is given its commit):
the runners commit it after every step they hand out, and a step run-ahead drops or leaves pending
writes nothing into the cache. That is what makes run-ahead safe where eager code writes
the same cache after the last call (a multi-turn prefill).

CPU stand-ins for CUDA graphs and streams (test_run_ahead.py's `fake_cuda`): this checks
the bookkeeping, not the overlap."""

from __future__ import annotations

import torch
from conftest import needs_cuda
from test_run_ahead import (
    VOCAB,
    WIDTH,
    _assert_same_run,
    _cpu_loop,
    _cpu_table,
    _decode_loop,
    _decode_step,
    _FakeGraph,
    _recorded_step,
    _table,
    fake_cuda,  # noqa: F401 - a fixture
)


class _StagedStep:
    """`_decode_step` with its cache write staged: the row goes to `stage` (its slot to
    `slot`), attention reads the cache with that slot taken from the stage, and
    `kv_commit(args)` writes it into the cache. Records itself under a fake capture."""

    def __init__(self, device: str = "cpu") -> None:
        self.stage = torch.zeros(1, WIDTH, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.commits = 0  # counted where the commit runs eagerly (CPU stand-ins)

    def __call__(self, ids, pos, mask, cache, counter, table):
        if _FakeGraph.capturing is None:
            return self._step(ids, pos, mask, cache, counter, table)
        # Captured, like a CUDA graph: recorded, not run (the counter is read in place).
        out = (torch.zeros(1, 1, VOCAB),)
        _FakeGraph.capturing.recorded = (self._step, (ids, pos, mask, cache, counter, table), out)
        return out

    def _step(self, ids, pos, mask, cache, counter, table):
        self.stage.copy_(table[ids.reshape(-1)] + pos.reshape(-1, 1).to(table.dtype))
        self.slot.copy_(counter.reshape(1))
        counter.add_(1)
        seen = cache.index_copy(0, self.slot, self.stage)  # out of place: no cache write
        ctx = (seen * mask.reshape(-1, 1).to(seen.dtype)).sum(0, keepdim=True)
        return ((ctx @ table.T).unsqueeze(1),)

    def kv_commit(self, args: list) -> None:
        if _FakeGraph.capturing is not None:
            _FakeGraph.capturing.recorded = (lambda *a: self._commit(list(a)), tuple(args), ())
            return
        self._commit(args)

    def _commit(self, args: list) -> tuple:
        args[3].index_copy_(0, self.slot, self.stage)
        self.commits += 1
        return ()


def _unwritten_after_counter(cache: torch.Tensor, counter: torch.Tensor) -> bool:
    return bool((cache[int(counter) :] == 0).all())


def test_in_order_runner_commits_a_staged_step_after_every_replay(fake_cuda):  # noqa: F811
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner

    table, step = _cpu_table(), _StagedStep()
    runner = CudaGraphRunner(step, mutated_inputs=frozenset({4}), commit=step.kv_commit)
    got = _cpu_loop(runner, table, 12)
    _assert_same_run(got, _cpu_loop(_decode_step, table, 12))
    assert runner.commit_graph is not None
    # Call 1 eager (committed directly), 2-12 replays (each the step's and the commit's
    # graph): every row is in the cache, and nothing past the counter.
    assert step.commits == 12
    assert _unwritten_after_counter(got[1], got[2])
    from yirage_dynamo.profiling import cuda_graph_stats

    assert any(r["staged_kv_commit"] and r["calls"] == 12 for r in cuda_graph_stats())


def test_run_ahead_with_a_staged_step_writes_the_cache_only_for_steps_handed_out(
    fake_cuda,  # noqa: F811
):
    """The same run as unstaged (the bookkeeping test of test_run_ahead.py), but the step
    started after the last call and the dropped one leave the cache as the caller's
    steps wrote it: zeros past its counter (unstaged, the pending step's row is there)."""
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    def once_not_argmax(k, logits):
        best = logits[:, -1].argmax(-1)
        return (best + 1) % VOCAB if k == 8 else best

    table, step = _cpu_table(), _StagedStep()
    runner = RunAheadRunner(step, mutated_inputs=frozenset({4}), trial=False, commit=step.kv_commit)
    got = _cpu_loop(runner, table, 20, once_not_argmax)
    ref = _cpu_loop(_decode_step, table, 20, once_not_argmax)
    _assert_same_run(got, ref)
    assert (runner.hits, runner.misses) == (12, 1)
    assert runner._started is not None  # a step is pending after the last call ...
    assert _unwritten_after_counter(got[1], got[2])  # ... and it wrote nothing shared
    # One commit per call: eager, replayed in order, or handed out (never for the
    # dropped step or the pending one).
    assert step.commits == 20

    unstaged = RunAheadRunner(_recorded_step, mutated_inputs=frozenset({3, 4}), trial=False)
    plain = _cpu_loop(unstaged, table, 20, once_not_argmax)
    assert not _unwritten_after_counter(plain[1], plain[2])


@needs_cuda
def test_run_ahead_with_a_staged_step_on_a_gpu_leaves_the_cache_past_the_counter_unwritten():
    """Real CUDA graphs and streams: the commit is its own captured graph, replayed on the
    caller's stream at hand-out; the step pending after the last call, run to its end,
    has written only its stage."""
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    table, step = _table(), _StagedStep("cuda")
    runner = RunAheadRunner(step, mutated_inputs=frozenset({4}), trial=False, commit=step.kv_commit)
    got = _decode_loop(runner, table, steps=14)
    pending = runner._started is not None
    runner.drain()
    torch.cuda.synchronize()
    _assert_same_run(got, _decode_loop(_decode_step, table, steps=14))
    assert runner.commit_graph is not None and pending
    assert (runner.hits, runner.misses) == (14 - 5, 0)
    assert _unwritten_after_counter(got[1], got[2])
