"""Whether run-ahead pays is timed, not assumed (runtime/run_ahead.py): after the rules
are learned, a trial of blocks in order and ahead keeps the faster way, a kept run-ahead
stays watched, and in order the trial runs again after a wait that doubles. A fake clock
times the calls; CUDA graphs and streams are the CPU stand-ins of test_run_ahead.py
(`fake_cuda`): this checks the choices, not the overlap. On a GPU (RESULTS.md,
twenty-ninth session) the watch turned a 1B run-ahead off after its trial had kept it,
and kept 7B's."""

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


def _phased_runner(monkeypatch, ahead_ms_at):
    """A trialled runner whose calls take 2 ms in order and `ahead_ms_at(call index)`
    after a call that started the next step. Returns it, the timed call, and per call
    the runner's choice and its steps handed out so far, after the call."""
    runner, clock = _clocked_runner(monkeypatch)
    choices, hits = [], []

    def timed(*args):
        k = len(choices)
        clock[0] += (ahead_ms_at(k) if runner._started is not None else 2.0) / 1e3
        out = runner(*args)
        choices.append(runner.choice)
        hits.append(runner.hits)
        return out

    return runner, timed, choices, hits


@pytest.mark.parametrize("ahead_ms,keeps", [(1.0, True), (2.5, False)])
def test_run_ahead_trial_keeps_the_faster_way(monkeypatch, ahead_ms, keeps):
    """After the rules, blocks of calls run in order and ahead, timed call to call (a fake
    clock here: 2 ms a token in order, `ahead_ms` after a call that started the next)."""
    from yirage_dynamo.runtime import run_ahead

    runner, timed, _, hits = _phased_runner(monkeypatch, lambda k: ahead_ms)
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

    trial_calls = _calls_through_the_trial()
    runner, timed, choices, hits = _phased_runner(
        monkeypatch, lambda k: 2.5 if k >= trial_calls else 1.0
    )

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


@pytest.mark.parametrize("ahead_later_ms", [1.9, 2.05])
def test_run_ahead_stays_on_unless_it_runs_3_percent_slower_than_the_trials_in_order(
    monkeypatch, ahead_later_ms
):
    """1.9 ms ahead beats the trial's 2.0 in order; 2.05 is a tie within the watch's
    hysteresis (WATCH_SLACK), not worth a switch."""
    from yirage_dynamo.runtime import run_ahead

    trial_calls = _calls_through_the_trial()
    runner, timed, _, _ = _phased_runner(
        monkeypatch, lambda k: ahead_later_ms if k >= trial_calls else 1.0
    )
    table = _cpu_table()
    steps = trial_calls + 3 * run_ahead.WATCH_CALLS
    got = _cpu_loop(timed, table, steps, slots=steps + 8)
    _assert_same_run(got, _cpu_loop(_decode_step, table, steps, slots=steps + 8))
    assert runner.choice is True and "ahead_later" not in runner.trial_ms
    assert runner.hits >= 3 * run_ahead.WATCH_CALLS


def test_run_ahead_off_is_tried_again_and_comes_back_when_the_host_speeds_up(monkeypatch):
    """The first trial sees ahead slower (2.5 ms against 2.0 in order) and goes in order;
    then ahead gets faster (1.0 ms: the host's fast level). After RETRY_FIRST calls in
    order the trial runs again, keeps run-ahead, and steps are handed out again, with
    the same tokens as eager."""
    from yirage_dynamo.runtime import run_ahead

    trial_calls = _calls_through_the_trial()
    runner, timed, choices, _ = _phased_runner(
        monkeypatch, lambda k: 2.5 if k < trial_calls else 1.0
    )
    table = _cpu_table()
    retried_by = (
        trial_calls + run_ahead.RETRY_FIRST + len(run_ahead.TRIAL_PLAN) * run_ahead.TRIAL_BLOCK
    )
    steps = retried_by + 12
    got = _cpu_loop(timed, table, steps, slots=steps + 8)
    _assert_same_run(got, _cpu_loop(_decode_step, table, steps, slots=steps + 8))
    assert [kept for kept, _ in runner.trials] == [False, True]
    assert runner.trials[0][1] == pytest.approx({"ahead": 2.5, "in_order": 2.0})
    assert runner.trials[1][1] == pytest.approx({"ahead": 1.0, "in_order": 2.0})
    # In order between the trials: exactly RETRY_FIRST calls with the choice False.
    assert choices.count(False) == run_ahead.RETRY_FIRST
    assert runner.choice is True and choices[-12:] == [True] * 12
    assert runner.hits >= 3 * (run_ahead.TRIAL_BLOCK - 1) + 10


def test_run_ahead_retrial_waits_twice_as_long_each_time_in_order_wins_again(monkeypatch):
    """Ahead always 2.5 ms against 2.0 in order: every trial chooses in order, and the
    calls in order between trials go RETRY_FIRST, 2 * RETRY_FIRST, ..."""
    from yirage_dynamo.runtime import run_ahead

    runner, timed, choices, _ = _phased_runner(monkeypatch, lambda k: 2.5)
    trial = len(run_ahead.TRIAL_PLAN) * run_ahead.TRIAL_BLOCK
    first = run_ahead.RETRY_FIRST
    steps = _calls_through_the_trial() + first + trial + 2 * first + trial + 5
    table = _cpu_table()
    got = _cpu_loop(timed, table, steps, slots=steps + 8)
    _assert_same_run(got, _cpu_loop(_decode_step, table, steps, slots=steps + 8))
    assert [kept for kept, _ in runner.trials] == [False, False, False]
    assert runner.trial_count == 3
    # Runs of calls whose choice after them is in order: the call that ends a trial, then
    # the calls in order up to (not with) the one that starts the next trial.
    runs, n = [], 0
    for c in choices:
        if c is False:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert runs == [first, 2 * first] and n == 1 + 5
