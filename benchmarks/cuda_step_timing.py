"""Timing one compiled decode step of HF generate() on the GPU, free of host time
(helpers of bench_cuda_llama.py's interleaved table)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch


def last_decode_call(runner: Any, compile_config: Any) -> tuple[tuple, dict]:
    """The arguments of a decode step's call into the compiled model: a 2-token generate
    (an eager prefill, then one compiled step) with the call spied on. `runner`: a
    bench_cuda_llama.Runner."""
    model, seen = runner.model, {}
    compiled = model._compiled_call

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen["call"] = (args, kwargs)
        return compiled(*args, **kwargs)

    model._compiled_call = spy
    try:
        runner.generate(2, compile_config)
    finally:
        model._compiled_call = compiled
    return seen["call"]


def cache_positions_kept(kwargs: dict) -> tuple[Callable[[], None], int]:
    """A function that puts the static cache's write positions back where they are now,
    and how many more steps fit in the cache from there.

    HF's StaticCache layers count the tokens written (`cumulative_length`, a static-address
    tensor the compiled step increments in place) and write at that count. A step called
    or replayed over and over to time it advances them: the 1B shape's 192-slot cache
    overflowed after 72 extra steps and the writes went past its end (an illegal memory
    access under YIRAGE_CUDA_GEMV_FUSE=on). Resetting before each timed call keeps every
    step writing the same slot."""
    cache = kwargs.get("past_key_values")
    layers = getattr(cache, "layers", [])
    counters = [c for c in (getattr(x, "cumulative_length", None) for x in layers)
                if isinstance(c, torch.Tensor)]  # fmt: skip
    if not counters:
        return (lambda: None), 10**9
    saved = [c.clone() for c in counters]
    keys = getattr(layers[0], "keys", None)
    room = (keys.shape[-2] if keys is not None else 10**9) - int(saved[0].max())
    return (lambda: torch._foreach_copy_(counters, saved)), room


def gpu_call_ms(
    call, args: tuple, kwargs: dict, reps: int = 20, reset: Callable[[], None] = lambda: None
) -> float:
    """GPU time of one compiled decode step, for any backend and free of host time: a GPU
    sleep queued first (~10 ms, longer than the host's guards and launch) keeps the GPU
    busy while the host issues the call, so the events around it bracket only the step's
    own GPU work (input copies, the graph, output copies). Inductor's CUDA-graph trees
    included, which `replay_ms` cannot reach."""
    # generate() runs under no_grad: with grad on, Dynamo's grad-mode guard failed, the
    # frame recompiled up to its limit, and the "step" timed was HF's eager forward.
    with torch.no_grad():
        reset()
        call(*args, **kwargs)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            reset()  # queued before the sleep: not inside the events
            torch.cuda._sleep(20_000_000)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call(*args, **kwargs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)
