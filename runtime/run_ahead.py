"""Run-ahead decoding: the next decode step runs on the GPU while HF's loop runs on the host.

Why: in HF `generate()` every token ends with a host sync (its stopping check), and the
host then spends 1.1-2.1 ms (HF's loop, Dynamo's guards and input gathering) before the
next step is launched; the GPU idles all that time, with any backend (RESULTS.md, where a
decode token's host time goes). A decode step's inputs are predictable from the step
before: the token is the argmax of its logits, positions move by one, the attention mask
grows by one slot, the cache counters carry over. So the runner starts step n+1 on a
side stream as soon as step n is queued, and the host time is hidden behind it:

    call n      replay (or hand out a step started ahead, below); then, on a side stream:
                predict step n+1's inputs into the graph's input buffers and keep a copy
                (both one CUDA graph of their own), replay the graph, copy its outputs out
    call n+1    compare the inputs Dynamo passes with the copy (a CUDA graph too, then one
                host sync; the GPU is busy with step n+1, the compare waits only for the
                prediction)
                  same:      the caller's stream waits for step n+1; its outputs are handed
                             out, its small mutated state is committed; step n+2 starts
                  different: the caller's stream waits for it, it is dropped, and the call
                             runs as usual

Outputs are only ever handed out for inputs equal to the prediction, so results are the
ones the step computes for the caller's inputs; sampling, logits processors that change
the argmax, or a new sequence just cost one dropped step each (repeated misses pause the
run-ahead, doubling the pause each time).

The rules are learned, not assumed: after each of the first replays, every copied input is
checked (on the GPU, one sync per call) against each rule applied to the call before, and
a rule is kept where it held over two consecutive calls, for every input, with at least
one input fed back from an output (the token). Otherwise the runner never runs ahead.

    token  argmax over the last position of a float output (batch, ..., vocab)
    step   the previous value plus a constant (positions)
    grow   a bool mask with one more slot set after its last set one (HF's padding mask)
    carry  the value after the previous step (the cache counters, which the step mutates)

Whether it pays is measured, not assumed. A 7B step (5.1 ms on an H100) hides HF's host
loop whole (1.45x the in-order runner). A 1B step (1.1 ms) is shorter than HF's own work
between this call's return and its per-token sync (logits copy, argmax, stopping check),
which in order already runs while the GPU works: where the host is slow, the in-order
token is all host time and run-ahead only adds its own call (RESULTS.md, twenty-third
session: 1.26x in order on one H100 host, slower on another). So once the rules are
known, blocks of calls run in order and ahead in turn, timed by the caller's period (call
to call: its whole token), and the faster way is kept (`run_ahead=True`; "always" skips
the trial). Kept, it stays watched: a run of calls ahead 3% slower than the trial's calls
in order turns it off (a 1B trial on an H100 host timed ahead faster, then the steps run
ahead were slower). In order, the trial runs again after 64 calls, the wait doubling up
to 1024 while it keeps choosing in order: the host's speed moves, and with it which way
wins on 1B.

What a step started ahead writes: its private input buffers (small mutated static inputs,
the cache counters, are given private buffers here and committed only when handed out),
and the KV cache slot at the next position, past the valid prefix until that step is
used; a real step at that position rewrites it. No step starts after the cache's last
position, which the mask's last slot marks (HF sizes its own static cache to the last
position a generate() decodes; a write past it fails ATen's device assert): a graph
without such a mask never runs ahead. Every call of a CUDA-graph runner first orders its
stream after any pending step. `generate(cache_implementation="static")` makes
a new cache per call, and the runner holds the old one until it re-captures (after
ordering itself after the pending step), so nothing else writes where that step writes.
Not ordered: eager code that writes the same cache in the few milliseconds after the last
step, such as a multi-turn chat that passes its cache back into `generate()`, whose
eager prefill writes the slot after the previous turn's end. That is why running an
unstaged step ahead is opt-in (`options={"run_ahead": True}`). A staged step closes it:
where the compiled function writes its new K/V rows into buffers of its own and has a
commit (runtime/cuda_graphs.py), the commit's graph runs on the caller's stream only when
the step is handed out, so a step started ahead writes nothing the caller shares until
then. `run_ahead="auto"`, the default, stages the CUDA lowering's KV writes
(lowering/cuda_kv_stage.py) and runs ahead only a step whose writes were all staged
(lowering/cuda.py `_runner`); the commit is one launch for all layers, paid in order too.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .cuda_graphs import (
    _PENDING,
    CudaGraphRunner,
    _copy_groups,
    _copy_in,
    _reset_capture_state,
    drain_others,
)

log = logging.getLogger("yirage_dynamo")

# Static inputs the step mutates that get private buffers: the cache's counters (one
# element each); the KV cache itself stays in place.
PRIVATE_NUMEL = 64
# Replays observed before giving up on learning the rules.
LEARN_CALLS = 6
# Calls without run-ahead after a miss, doubled per consecutive miss.
FIRST_PAUSE, MAX_PAUSE = 2, 256
# The trial once the rules are known: blocks of calls in order / ahead, timed by the
# caller's period (call to call: its whole token). The first two calls of a block are
# the switch and are not timed. Ahead must be this much faster to be kept.
TRIAL_PLAN, TRIAL_BLOCK, TRIAL_GAIN = (False, True, False, True, False, True), 6, 0.97
# Once kept, run-ahead stays watched: the median period of each run of this many calls
# ahead must stay within WATCH_SLACK of the trial's in-order one, or it is turned off. Why: on an H100
# host, 1B steps ran ahead slower than in order after a trial that timed them faster
# (RESULTS.md, twenty-seventh session: 2.955 against 2.497 ms/token after a 2.35 / 2.48
# trial); the in-order period held at its trial's value. Measured (twenty-ninth session,
# another H100 host): 1B turned off after 32 calls (2.66 ms ahead against 2.45 in order
# in the trial), 7B kept (1502 steps handed out). Why the trial misleads on 1B: the
# host's speed moves between a fast and a slow level within a sequence, and 1B ahead wins
# only at the fast one (benchmarks/profile_run_ahead_periods.py, same session).
WATCH_CALLS = 32
# Hysteresis: a watched run ahead must be this much slower than the trial's calls in
# order to turn run-ahead off (a tie is not worth a switch; on the thirtieth session's
# H100 host the watch turned a winning 1B run-ahead off at 2.083 against 2.080 ms).
WATCH_SLACK = 1.03
# In order (the trial's choice or the watch's), the trial is run again after this many
# calls, doubling while it keeps choosing in order: the host's speed moves (RESULTS.md,
# thirtieth session: one machine's 1B token went from 1.61 to 2.55 ms within minutes,
# and run-ahead, once off, never came back). Kept run-ahead needs no re-trial: the watch
# compares it with in order all along.
RETRY_FIRST, RETRY_MAX = 64, 1024


@dataclasses.dataclass
class _Started:
    """A step started ahead on the side stream."""

    ready: torch.cuda.Event  # its predicted inputs are in `predicted`
    done: torch.cuda.Event  # its outputs are in `outs`
    outs: list[Any]


class RunAheadRunner(CudaGraphRunner):
    """A CUDA-graph runner that starts the next decode step before it is asked for."""

    def __init__(
        self,
        fn: Callable,
        mutated_inputs: frozenset[int] = frozenset(),
        trial: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(fn, mutated_inputs, **kw)
        self.rules: list[tuple] | None = None  # per copied input; None: still learning
        self.learn_failed: str | None = None
        self.hits = self.misses = 0
        # Run ahead or not, once the trial has timed both (None: trial running). Without a
        # trial: always.
        self.choice: bool | None = None if trial else True
        self.trial_ms: dict[str, float] = {}
        self._periods: dict[bool, list[float]] = {False: [], True: []}
        self._watched: list[float] = []  # periods ahead since the trial kept it
        # The last trials' outcomes, oldest first: (kept, its trial_ms); bounded, since a
        # server's runner may run a trial every hundred calls for days.
        self.trials: collections.deque[tuple[bool, dict[str, float]]] = collections.deque(maxlen=16)
        self.trial_count = 0
        self._retry_after, self._in_order_calls = RETRY_FIRST, 0
        self._since_rules = 0
        self._last_entry = 0.0
        self._observed = 0
        # The last replay observed while learning: its inputs after the step, its tokens.
        self._prev: tuple[list[torch.Tensor], list[torch.Tensor | None]] | None = None
        self._candidates: list[set] | None = None
        self._end_mask = -1  # the input (a "grow" mask) whose last slot marks the cache's end
        self._started: _Started | None = None
        self._side: torch.cuda.Stream | None = None
        self._pause = self._pause_len = 0
        self.launch_error: str | None = None
        self._predict_step: Callable[[], None] | None = None  # the prediction, as a graph
        self._check_step: Callable[[], None] | None = None  # the hand-out's check, as a graph
        # One set per runner, re-recorded per step (three fewer objects per call on the
        # host's critical path): every wait on a record is enqueued before the next.
        self._events: tuple[torch.cuda.Event, torch.cuda.Event, torch.cuda.Event] | None = None

    # ------------------------------------------------------------------ calling
    def _call(self, args: list[Any]) -> Any:
        now = time.perf_counter()
        if self.rules and self.choice is None:
            self._time_trial(now - self._last_entry)
        elif self.choice and self._started is not None and "in_order" in self.trial_ms:
            self._watch(now - self._last_entry)
        elif self.choice is False and self.rules and self.launch_error is None:
            self._count_in_order()
        self._last_entry = now
        if self._started is not None:
            if self.graph is not None and self._statics_unchanged(args):
                drain_others(self)
                outs = self._take_started(args)
                if outs is not None:
                    self.calls += 1
                    return outs
            else:
                self.drain()
        return super()._call(args)

    def drain(self) -> None:
        started, self._started = self._started, None
        _PENDING.discard(self)
        if started is not None:
            torch.cuda.current_stream().wait_event(started.done)

    def _private_statics(self, args: list[Any]) -> set[int]:
        return {
            i
            for i in self.mutated
            if i < len(args)
            and isinstance(args[i], torch.Tensor)
            and not isinstance(args[i], torch.nn.Parameter)
            and args[i].numel() <= PRIVATE_NUMEL
        }

    def _capture(self, args: list[Any]) -> None:
        self.drain()
        super()._capture(args)
        # The rules describe the caller's loop, not the addresses: a re-capture (a new
        # cache object) keeps them.
        if self.rules is not None and len(self.rules) != len(self.copied):
            self.rules = None
        self._prev, self._candidates, self._observed = None, None, 0
        self._predicted, predicted = self._snapshot_slots()
        self._actual, self._actual_views = self._snapshot_slots()
        self._predicted_slots = _copy_groups(list(predicted.items()))
        self._actual_slots = _copy_groups(list(self._actual_views.items()))
        # Flags the check writes: the inputs differ from the prediction, the cache ends.
        self._flags = torch.zeros(2, dtype=torch.bool, device=self._actual.device)
        self._predict_step = self._check_step = None  # they read this graph's buffers

    def _replay(self, args: list[Any]) -> Any:
        learning = self.rules is None and self.learn_failed is None
        # This call's inputs before the step mutates any (the counters are copied back).
        now = [args[i].detach().clone() for i in self.copied] if learning else []
        # Decided before the replay: the check syncs, and after the launch it would wait
        # for the whole step.
        ahead = self._ahead_wanted() and not bool(_last_slot_set(args[self._end_mask]))
        outs = super()._replay(args)
        if learning:
            self._learn(now)
        if ahead:
            self._start_next()
        elif self._pause:
            self._pause -= 1
        return outs

    def _snapshot_slots(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """A zeroed byte buffer with an 8-byte-aligned slot per copied input, and the slots
        as typed views by input position: filled with one `_foreach_copy_` per dtype and
        compared as one tensor. (`torch.cat` of the ~20 inputs of a regional step, the
        mask and the layers' counters, cost ~0.2 ms of host time per call on an H200.)"""
        like = [self.buffers[i] for i in self.copied]
        sizes = [t.numel() * t.element_size() for t in like]
        starts = [0, *itertools.accumulate(-(-n // 8) * 8 for n in sizes)]
        device = like[0].device if like else None
        flat = torch.zeros(starts[-1], dtype=torch.uint8, device=device)
        typed = {
            i: flat[a : a + n].view(t.dtype).view(t.shape)
            for i, a, n, t in zip(self.copied, starts, sizes, like)
        }
        return flat, typed

    def _ahead_wanted(self) -> bool:
        if not self.rules or self._pause:
            return False
        if self.choice is not None:
            return self.choice
        block = (self._since_rules - 1) // TRIAL_BLOCK
        return block >= 0 and TRIAL_PLAN[min(block, len(TRIAL_PLAN) - 1)]

    def _time_trial(self, period: float) -> None:
        """Times the trial's calls; after the last block, keeps the faster way."""
        k = self._since_rules
        if k % TRIAL_BLOCK >= 2:
            self._periods[TRIAL_PLAN[k // TRIAL_BLOCK]].append(period)
        self._since_rules += 1
        if self._since_rules < TRIAL_BLOCK * len(TRIAL_PLAN):
            return
        ahead, in_order = (statistics.median(self._periods[m]) * 1e3 for m in (True, False))
        self.trial_ms = {"ahead": ahead, "in_order": in_order}
        self.choice = ahead < TRIAL_GAIN * in_order
        self.trials.append((self.choice, self.trial_ms))
        self.trial_count += 1
        if self.choice:
            self._retry_after = RETRY_FIRST
        log.info(
            "yirage: run-ahead %s (call to call: %.3f ms ahead, %.3f ms in order)",
            "kept" if self.choice else "off",
            ahead,
            in_order,
        )

    def _watch(self, period: float) -> None:
        """Turns run-ahead off when a run of calls ahead is WATCH_SLACK slower than the
        trial's calls in order (the call after one that started a step: a call with none
        pending is a new sequence, whose period holds HF's prefill)."""
        self._watched.append(period)
        if len(self._watched) < WATCH_CALLS:
            return
        ahead = statistics.median(self._watched) * 1e3
        self._watched = []
        if ahead < WATCH_SLACK * self.trial_ms["in_order"]:
            return
        self.choice = False
        self.trial_ms["ahead_later"] = ahead
        log.info(
            "yirage: run-ahead off (call to call: %.3f ms ahead now, %.3f ms in order in"
            " the trial)",
            ahead,
            self.trial_ms["in_order"],
        )

    def _count_in_order(self) -> None:
        """After `_retry_after` calls in order, runs the trial again (see RETRY_FIRST)."""
        self._in_order_calls += 1
        if self._in_order_calls < self._retry_after:
            return
        self._in_order_calls = 0
        self._retry_after = min(2 * self._retry_after, RETRY_MAX)
        self.choice, self._since_rules = None, 0
        self._periods = {False: [], True: []}

    # ------------------------------------------------------------------ handing out
    def _take_started(self, args: list[Any]) -> Any:
        started, self._started = self._started, None
        _PENDING.discard(self)
        main = torch.cuda.current_stream()
        main.wait_event(started.ready)
        _copy_in(self._actual_slots, args)
        # One sync for both: were the inputs the predicted ones, and is this the cache's
        # last position (then no step starts after it)?
        self._check_step()
        differs, at_end = self._flags.tolist()
        main.wait_event(started.done)
        if differs:
            self.misses += 1
            self._pause_len = min(max(FIRST_PAUSE, 2 * self._pause_len), MAX_PAUSE)
            self._pause = self._pause_len
            return None
        self.hits += 1
        self._pause_len = 0
        if self.commit_graph is not None:  # a staged step's cache rows, now the caller's
            self.commit_graph.replay()
        self._copy_back(args)  # the step's counters, now the caller's
        if self._ahead_wanted() and not at_end:
            self._start_next()
        return self._shaped(started.outs)

    def _start_next(self) -> None:
        _PENDING.add(self)
        try:
            self._launch(torch.cuda.current_stream())
        except Exception as exc:  # noqa: BLE001 - an optimisation: the calls run in order
            self._started, self.choice = None, False
            self.launch_error = f"{type(exc).__name__}: {exc}"
            log.warning("yirage: run-ahead off for this graph (%s)", self.launch_error)

    def _launch(self, main: torch.cuda.Stream) -> None:
        if self._side is None:
            self._side = torch.cuda.Stream(device=main.device)
        side = self._side
        if self._predict_step is None:
            self._check_step = _as_graph(self._check_all)
            self._predict_step = _as_graph(self._predict_all)
        flat = self._flat_outs()
        # Allocated on the caller's stream, which uses and frees them: it waits for `done`
        # before either.
        fresh = [torch.empty_like(o) if c else o for o, c in zip(flat, self.clone_out)]
        for f, c in zip(fresh, self.clone_out):
            # A step never handed out (its runner freed while the step runs) must not
            # have its outputs' memory reused before the side stream is done with it.
            # (CPU tensors: the tests' stand-in graph.)
            if c and f.is_cuda:
                f.record_stream(side)
        if self._events is None:
            self._events = (torch.cuda.Event(), torch.cuda.Event(), torch.cuda.Event())
        ready, done, queued = self._events
        queued.record(main)
        side.wait_event(queued)
        with torch.cuda.stream(side):
            self._predict_step()
            ready.record(side)
            self.graph.replay()
            for f, o, c in zip(fresh, flat, self.clone_out):
                if c:
                    f.copy_(o)
            done.record(side)
        self._started = _Started(ready, done, fresh)

    def _predict_all(self) -> None:
        """The next step's inputs into the graph's input buffers, and a copy of them."""
        flat = self._flat_outs()
        for i, rule in zip(self.copied, self.rules):
            _predict(self.buffers[i], rule, flat)
        _copy_in(self._predicted_slots, self.buffers)

    def _check_all(self) -> None:
        """The hand-out's check of the inputs copied into `_actual`, into `_flags`."""
        differs = torch.ne(self._actual, self._predicted).any()
        end = _last_slot_set(self._actual_views[self._end_mask])
        self._flags.copy_(torch.stack([differs, end]))

    # ------------------------------------------------------------------ learning
    def _learn(self, now: list[torch.Tensor]) -> None:
        """Observe this replay (`now`: its inputs); after two transitions agree, fix the
        rules (or give up)."""
        flat = self._flat_outs()
        after = [self.buffers[i].clone() for i in self.copied]
        tokens = [_last_argmax(o) for o in flat]
        if self._prev is not None:
            held = _rules_that_held(now, *self._prev)
            if self._candidates is None:
                self._candidates = held
            else:
                self._candidates = [a & b for a, b in zip(self._candidates, held)]
                self.rules = self._choose(self._candidates)
        self._prev = (after, tokens)
        self._observed += 1
        if self.rules is not None:
            self._since_rules = 0
        elif self._observed > LEARN_CALLS:
            self.learn_failed = "no consistent rules"

    def _choose(self, candidates: list[set]) -> list[tuple] | None:
        order = {"token": 0, "step": 1, "grow": 2, "carry": 3}
        rules = []
        for i, held in zip(self.copied, candidates):
            if not held:
                self.learn_failed = f"input {i}: no rule predicts it"
                log.info("yirage: no run-ahead for this graph (%s)", self.learn_failed)
                return None
            rules.append(min(held, key=lambda r: order[r[0]]))
        if not any(r[0] == "token" for r in rules):
            self.learn_failed = "no input is fed back from an output"
            return None
        grows = [i for i, r in zip(self.copied, rules) if r[0] == "grow"]
        if not grows:
            # Without it nothing tells where the cache ends: a step started after its last
            # slot would write past it (ATen's index_copy_ fails a device assert there).
            self.learn_failed = "no mask input marks the cache's end"
            return None
        self._end_mask = grows[0]
        log.info("yirage: run-ahead rules %s", rules)
        return rules


def _as_graph(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` recorded as a CUDA graph, returned as its replay: its dozen small launches
    (the prediction) become one. Without CUDA (the CPU tests' stand-ins), `fn` itself."""
    if not torch.cuda.is_available():
        return fn
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:
        _reset_capture_state()
        raise
    return graph.replay


def _last_slot_set(mask: torch.Tensor) -> torch.Tensor:
    """Whether the mask's last slot is set (on the device): the caller is at the cache's
    last position, and a step after it would write past the cache's end."""
    return mask[..., -1].any()


def _last_argmax(out: Any) -> torch.Tensor | None:
    """argmax over the vocabulary at the last position, for outputs shaped like logits."""
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or not out.dtype.is_floating_point:
        return None
    last = out[:, -1] if out.dim() >= 3 else out
    return last.argmax(-1).reshape(out.shape[0])


def _grown(mask: torch.Tensor) -> torch.Tensor:
    shifted = torch.cat([torch.zeros_like(mask[..., :1]), mask[..., :-1]], dim=-1)
    return mask | shifted


def _rules_that_held(
    now: list[torch.Tensor], prev: list[torch.Tensor], tokens: list[torch.Tensor | None]
) -> list[set]:
    """Which rules turn the previous call into this one, per input (host syncs: learning
    takes a few calls)."""
    held: list[set] = []
    for x, p in zip(now, prev):
        rules: set = set()
        integral = not x.dtype.is_floating_point and x.dtype != torch.bool
        if x.shape == p.shape and x.dtype == p.dtype:
            if torch.equal(x, p):
                rules.add(("carry",))
            if x.dtype == torch.bool and torch.equal(x, _grown(p)):
                rules.add(("grow",))
            if integral and x.numel():
                delta = int((x.reshape(-1)[0] - p.reshape(-1)[0]).item())
                if delta and torch.equal(x, p + delta):
                    rules.add(("step", delta))
        for o, tok in enumerate(tokens):
            if integral and tok is not None and tok.numel() == x.numel():
                if torch.equal(x.reshape(-1), tok.to(x.dtype)):
                    rules.add(("token", o))
        held.append(rules)
    return held


def _predict(buf: torch.Tensor, rule: tuple, outs: list[Any]) -> None:
    kind = rule[0]
    if kind == "carry":
        return
    if kind == "step":
        buf.add_(rule[1])
    elif kind == "grow":
        buf.copy_(_grown(buf))
    else:  # token
        buf.copy_(_last_argmax(outs[rule[1]]).reshape(buf.shape))
