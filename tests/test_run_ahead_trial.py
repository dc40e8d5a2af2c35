"""Whether run-ahead pays is timed, not assumed (runtime/run_ahead.py): after the rules
are learned, a trial of blocks in order and ahead keeps the faster way, and a kept
run-ahead stays watched. A fake clock times the calls; CUDA graphs and streams are the
CPU stand-ins of test_run_ahead.py (`fake_cuda`): this checks the choices, not the
overlap. On a GPU (RESULTS.md, twenty-ninth session) the watch turned a 1B run-ahead off
after its trial had kept it, and kept 7B's."""

from __future__ import annotations

import pytest
from test_run_ahead import (
    _assert_same_run,
    _cpu_loop,
    _cpu_table,
    _decode_step,
    _recorded_step,
    fake_cuda,  # noqa: F401 - the fixture every test here uses
)

pytestmark = pytest.mark.usefixtures("fake_cuda")


def _calls_through_the_trial() -> int:
    """Calls until the trial has chosen: the eager call, the capture and two observed
    transitions that fix the rules, then the trial's blocks."""
    from yirage_dynamo.runtime import run_ahead

    return 4 + len(run_ahead.TRIAL_PLAN) * run_ahead.TRIAL_BLOCK


def _clocked_runner(monkeypatch):
    """A trialled RunAheadRunner over the stand-in step, timed by a fake clock the test
    moves (`clock[0]`, seconds)."""
    from types import SimpleNamespace

    from yirage_dynamo.runtime import run_ahead

    clock = [0.0]
    monkeypatch.setattr(run_ahead, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    return run_ahead.RunAheadRunner(_recorded_step, mutated_inputs=frozenset({3, 4})), clock


@pytest.mark.parametrize("ahead_ms,keeps", [(1.0, True), (2.5, False)])
def test_run_ahead_trial_keeps_the_faster_way(monkeypatch, ahead_ms, keeps):
    """After the rules, blocks of calls run in order and ahead, timed call to call (a fake
    clock here: 2 ms a token in order, `ahead_ms` after a call that started the next)."""
    from yirage_dynamo.runtime import run_ahead

    runner, clock = _clocked_runner(monkeypatch)

    hits = []

    def timed(*args):
        clock[0] += (ahead_ms if runner._started is not None else 2.0) / 1e3
        out = runner(*args)
        hits.append(runner.hits)
        return out

    table = _cpu_table()
    steps = _calls_through_the_trial() + 10
    _assert_same_run(_cpu_loop(timed, table, steps), _cpu_loop(_decode_step, table, steps))
    assert runner.choice is keeps
    assert runner.trial_ms == pytest.approx({"ahead": ahead_ms, "in_order": 2.0})
    # The trial's ahead blocks handed steps out; after it, every call or none.
    assert hits[-10] >= 3 * (run_ahead.TRIAL_BLOCK - 1)
    assert hits[-1] - hits[-10] == (9 if keeps else 0)


def test_run_ahead_kept_by_the_trial_is_turned_off_when_it_runs_slower_than_in_order(monkeypatch):
    """The trial times ahead at 1 ms a token, in order at 2 ms; afterwards a token ahead
    takes 2.5 ms (a fake clock): after one watched run of calls, the runner goes in order
    and hands out nothing more, with the same tokens as eager."""
    from yirage_dynamo.runtime import run_ahead

    runner, clock = _clocked_runner(monkeypatch)
    trial_calls = _calls_through_the_trial()
    hits, choices = [], []

    def timed(*args):
        ahead = runner._started is not None
        later = len(hits) >= trial_calls
        clock[0] += ((2.5 if later else 1.0) if ahead else 2.0) / 1e3
        out = runner(*args)
        hits.append(runner.hits)
        choices.append(runner.choice)
        return out

    table = _cpu_table()
    steps = trial_calls + run_ahead.WATCH_CALLS + 12
    got = _cpu_loop(timed, table, steps, slots=steps + 8)
    _assert_same_run(got, _cpu_loop(_decode_step, table, steps, slots=steps + 8))
    assert choices[trial_calls] is True  # kept by the trial
    assert runner.choice is False
    assert runner.trial_ms["ahead_later"] == pytest.approx(2.5)
    off = choices.index(False)
    assert trial_calls + run_ahead.WATCH_CALLS - 2 <= off <= trial_calls + run_ahead.WATCH_CALLS + 1
    # The step started before the switch is still handed out; none after it.
    assert hits[-1] - hits[off] <= 1 and hits[-1] == hits[-5]


def test_run_ahead_stays_on_while_it_keeps_beating_the_trials_in_order_period(monkeypatch):
    from yirage_dynamo.runtime import run_ahead

    runner, clock = _clocked_runner(monkeypatch)

    def timed(*args):
        clock[0] += (1.9 if runner._started is not None else 2.0) / 1e3
        return runner(*args)

    table = _cpu_table()
    steps = _calls_through_the_trial() + 3 * run_ahead.WATCH_CALLS
    got = _cpu_loop(timed, table, steps, slots=steps + 8)
    _assert_same_run(got, _cpu_loop(_decode_step, table, steps, slots=steps + 8))
    assert runner.choice is True and "ahead_later" not in runner.trial_ms
    assert runner.hits >= 3 * run_ahead.WATCH_CALLS
