"""A lean CUDA-graph runner for one static-shape inference call (the CUDA lowering's default).

Why not Inductor's CUDA-graph trees: their outputs live in the graph's pool, and a later
replay overwrites them; reading a kept one then raises. HF's default (dynamic) cache keeps
the K/V tensors that the static-shape prefill/first-decode graphs return, so a model that
runs eagerly broke once compiled. This runner hands out outputs as fresh tensors (one
device copy each) and measured as fast as the trees on decode (RESULTS.md: their per-call
bookkeeping runs after the launch, off the critical path). What a step needs:

    call 1:  run the compiled function eagerly (Triton compiles/autotunes, cuBLAS warms up)
    call 2:  capture one call into a CUDA graph (private memory pool), then replay it
    call n:  copy the non-static inputs into the captured buffers (one launch per dtype),
             replay, clone outputs

Static inputs are read in place by the graph: parameters, and tensors marked with
`torch._dynamo.mark_static_address` (HF's static KV cache). Their addresses are checked
on every call; a changed address (a new cache object) re-captures. Other tensor inputs
are copied into buffers the graph owns, and copied back if the graph mutates them.
Outputs that are not views of a static input are cloned out of the graph's pool, so a
caller may keep them across steps (the next replay overwrites the pool).

A step whose KV-cache writes are staged (it writes the new rows into buffers of its own,
and the `commit(args)` given to the runner copies them into the cache:
lowering/cuda_kv_stage.py) has its commit captured as a second graph,
replayed after the step; runtime/run_ahead.py replays it only when it hands a step out, so
a step it drops writes nothing shared.

Anything the runner does not cover (a non-tensor input, a capture that fails, e.g. on a
host sync inside the function) makes it run the function without graphs from then on,
with a warning; results are the same, only slower.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger("yirage_dynamo")

# Re-captures after static-input address changes before graphs are given up for the
# function (each one records a new graph; steady code keeps its addresses).
MAX_CAPTURES = 8

# Every live runner, for measuring a captured step's GPU time apart from the host's
# (benchmarks; `replay_ms`). Weak: a runner lives as long as its compiled function.
_LIVE: weakref.WeakSet[CudaGraphRunner] = weakref.WeakSet()
_SERIAL = itertools.count()
# Runners with a step started ahead and not yet handed out (runtime/run_ahead.py).
_PENDING: weakref.WeakSet[CudaGraphRunner] = weakref.WeakSet()


def live_runners() -> list[CudaGraphRunner]:
    """The runners alive in this process, oldest first."""
    return sorted(_LIVE, key=lambda r: r.serial)


def replay_ms(runner: CudaGraphRunner, reps: int = 50) -> float | None:
    """GPU milliseconds per replay of `runner`'s captured graph (None before a capture):
    CUDA events around `reps` back-to-back replays, so no host time between steps is
    counted. The replays rerun the last step on its own inputs; state the step mutates in
    place advances with each (HF's static cache writes at a counter the step increments:
    the caller keeps `reps` within the cache: benchmarks/cuda_step_timing.py)."""
    if runner.graph is None:
        return None
    runner.drain()
    runner.replay_graphs()  # warm: clocks, L2
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        runner.replay_graphs()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def drain_others(runner: CudaGraphRunner) -> None:
    """A step another runner started ahead (runtime/run_ahead.py) may write the cache this
    call uses: the current stream waits for it, and it is not handed out."""
    if _PENDING:
        for other in list(_PENDING):
            if other is not runner:
                other.drain()


def is_static_input(t: Any) -> bool:
    """Read in place by a captured graph: a parameter or a `mark_static_address` tensor."""
    return isinstance(t, torch.nn.Parameter) or hasattr(t, "_dynamo_static_input_type")


class CudaGraphRunner:
    """Wraps a compiled function called as `fn(*args)` (or boxed, `fn(list)`)."""

    def __init__(
        self,
        fn: Callable,
        mutated_inputs: frozenset[int] = frozenset(),
        check_parameters: bool = True,
        commit: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.fn = fn
        # `fn` is called the way the runner itself was: Dynamo calls with *args (a wrapped
        # function's `_boxed_call` attribute, copied by functools.wraps, is not reliable),
        # AOTAutograd-style callers pass one list.
        self._boxed = False
        self.mutated = mutated_inputs
        # Frozen weights are constants of the compiled code, never read through the
        # parameter inputs: their addresses need no check (Options.freeze's assumption).
        self.check_parameters = check_parameters
        self.calls = 0
        self.captures = 0
        self.disabled: str | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        # A staged step's cache commit (see the module docstring), and its graph.
        self.commit = commit
        self.commit_graph: torch.cuda.CUDAGraph | None = None
        self.serial = next(_SERIAL)
        _LIVE.add(self)

    # ------------------------------------------------------------------ calling
    def __call__(self, *args: Any) -> Any:
        self._boxed = len(args) == 1 and type(args[0]) is list
        return self._call(list(args[0]) if self._boxed else list(args))

    def _call(self, args: list[Any]) -> Any:
        self.calls += 1
        drain_others(self)
        if self.disabled is not None or self.calls == 1:
            return self._eager(args)
        if self.graph is None or not self._statics_unchanged(args):
            if self.captures >= MAX_CAPTURES:
                self._disable(f"static input addresses changed {self.captures} times")
                return self._eager(args)
            try:
                self._capture(args)
            except Exception as exc:  # noqa: BLE001 - graphs are an optimisation
                _reset_capture_state()
                self._disable(f"capture failed: {type(exc).__name__}: {exc}")
                return self._eager(args)
        return self._replay(args)

    def _eager(self, args: list[Any]) -> Any:
        out = self.fn(args) if self._boxed else self.fn(*args)
        if self.commit is not None:
            self.commit(args)
        return out

    def drain(self) -> None:
        """Order the current stream after any work this runner started on its own (none
        here; runtime/run_ahead.py's speculative step)."""

    def _disable(self, why: str) -> None:
        log.warning("yirage: CUDA graphs off for this graph (%s); running without", why)
        self.disabled = why
        self.graph = self.commit_graph = None

    # ------------------------------------------------------------------ capture
    def _capture(self, args: list[Any]) -> None:
        if any(not isinstance(a, torch.Tensor) for a in args):
            raise TypeError("non-tensor graph input")
        private = self._private_statics(args)
        statics = [
            i
            for i, a in enumerate(args)
            if is_static_input(a)
            and i not in private
            and (self.check_parameters or not isinstance(a, torch.nn.Parameter))
        ]
        static_set = set(statics)
        copied = [
            i
            for i, a in enumerate(args)
            if i not in static_set and (i in private or not _is_param(a))
        ]
        buffers = list(args)
        for i in copied:
            buffers[i] = torch.empty_strided(
                args[i].shape, args[i].stride(), dtype=args[i].dtype, device=args[i].device
            )
            buffers[i].copy_(args[i])
        # The old graphs and their pool go before the new ones are recorded.
        self.graph = self.commit_graph = None
        graph = torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=pool):
            call_args = list(buffers)
            outs = self.fn(call_args) if self._boxed else self.fn(*call_args)
        commit_graph = None
        if self.commit is not None:
            # Host-side set-up the commit cannot capture (lowering/cuda_kv_stage.py).
            prepare = getattr(self.commit, "prepare_capture", None)
            if prepare is not None:
                prepare()
            commit_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(commit_graph, pool=pool):
                self.commit(list(buffers))
        self.captures += 1
        self.graph, self.commit_graph = graph, commit_graph
        self.static_idx = statics
        # Static inputs' addresses by input position (0 elsewhere): the C++ check's layout.
        self.ptr_at = [a.data_ptr() if i in static_set else 0 for i, a in enumerate(args)]
        self.buffers, self.copied = buffers, copied
        self.copy_groups = _copy_groups([(i, buffers[i]) for i in copied])
        self.copy_back = _copy_groups([(i, buffers[i]) for i in copied if i in self.mutated])
        self.outs = outs
        # Outputs that view a static input stay valid after later replays; others live
        # in the graph's pool and are handed out as copies.
        static_storages = {args[i].untyped_storage().data_ptr() for i in statics}
        flat = outs if isinstance(outs, list | tuple) else [outs]
        self.clone_out = [
            isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in static_storages
            for o in flat
        ]

    def _private_statics(self, args: list[Any]) -> set[int]:
        """Static inputs the graph reads from buffers of its own, copied like the rest."""
        return set()

    def _statics_unchanged(self, args: Sequence[Any]) -> bool:
        # Every step checks every weight's address (~300 on a 7B model): the C++ check of
        # Inductor's CUDA-graph trees (CUDA builds) when there is one.
        same = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
        if same is not None:
            return same(args, self.ptr_at, self.static_idx)
        return all(args[i].data_ptr() == self.ptr_at[i] for i in self.static_idx)

    # ------------------------------------------------------------------ replay
    def _replay(self, args: list[Any]) -> Any:
        # One launch per dtype: a decode step's ids and positions are on the critical path
        # between HF's per-step sync and the graph launch (each copy_ is its own launch).
        _copy_in(self.copy_groups, args)
        self.replay_graphs()
        self._copy_back(args)
        return self._shaped(
            [o.clone() if c else o for o, c in zip(self._flat_outs(), self.clone_out)]
        )

    def replay_graphs(self) -> None:
        """One step on the current stream: the step's graph, then its cache commit."""
        self.graph.replay()
        if self.commit_graph is not None:
            self.commit_graph.replay()

    def _flat_outs(self) -> list[Any]:
        """The captured outputs (in the graph's pool) as a list."""
        return list(self.outs) if isinstance(self.outs, list | tuple) else [self.outs]

    def _copy_back(self, args: list[Any]) -> None:
        for positions, bufs in self.copy_back:
            _copy_all([args[i] for i in positions], bufs)

    def _shaped(self, fresh: list[Any]) -> Any:
        """Outputs in the structure the compiled function returned them."""
        if isinstance(self.outs, tuple):
            return tuple(fresh)
        if isinstance(self.outs, list):
            return fresh
        return fresh[0]


def _copy_groups(copied: list[tuple[int, torch.Tensor]]) -> list[tuple[list[int], list]]:
    """(input positions, buffers) per (dtype, device): one `_foreach_copy_` each."""
    groups: dict[tuple, tuple[list[int], list]] = {}
    for i, buf in copied:
        positions, bufs = groups.setdefault((buf.dtype, buf.device), ([], []))
        positions.append(i)
        bufs.append(buf)
    return list(groups.values())


def _copy_in(groups: list[tuple[list[int], list]], src: Sequence[Any]) -> None:
    """Each group's buffers from `src` at its positions, one launch per group."""
    for positions, bufs in groups:
        _copy_all(bufs, [src[i] for i in positions])


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[k] = src[k] for every k, one launch (a plain copy_ for one pair)."""
    if len(dst) == 1:
        dst[0].copy_(src[0])
    else:
        torch._foreach_copy_(dst, src)


def _reset_capture_state() -> None:
    """After a failed capture, leave the CUDA RNG as a completed capture would.

    A capture that errors ends without running the generators' capture epilogue, so the
    default CUDA generator still believes it is being captured and every later random op
    fails ("Offset increment outside graph capture"). An empty capture runs prologue and
    epilogue once and puts it back."""
    if not torch.cuda.is_available():
        return
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - the failed capture's error surfaces here, once
        pass
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass
    except Exception as exc:  # noqa: BLE001
        log.warning("yirage: could not reset CUDA capture state: %s", exc)


def _is_param(t: Any) -> bool:
    return isinstance(t, torch.nn.Parameter)
