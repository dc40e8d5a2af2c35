"""Measuring kernel configs on the GPU for the CUDA lowering's Triton ops.

`Tuner` is one graph's view of the config search (lowering/kernel_tuning.py: the on-disk
cache, keyed by kernel, shape bucket and GPU name); `time_in_graph` is how a candidate is
timed: many calls captured in one CUDA graph, so microsecond decode kernels are measured
without the host's launch time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from yirage_dynamo.passes.context import PassContext

from .kernel_tuning import ConfigCache, search, shape_key, strip

# Weights (or weight groups) a GEMV measurement rotates through at most.
MAX_ROTATION = 16


class Tuner:
    """Config search for one graph: cache file from options, GPU name from the device."""

    def __init__(self, ctx: PassContext) -> None:
        self.cache = ConfigCache(ctx.options.cache_path)
        self.stats = ctx.report.cache
        self.gpu = torch.cuda.get_device_name()
        # Shape keys whose candidates an earlier round of this graph compiled already.
        self.precompiled: set[str] = ctx.artifacts.setdefault("triton_precompiled", set())
        from .cuda_ops import merge_in_last_program

        # Decode attention's search includes split programs that merge (cuda_ops).
        self.merge_last = merge_in_last_program(ctx)

    def key(self, kernel: str, dims: Mapping[str, Any]) -> str:
        return shape_key(kernel, self.gpu, **dims)

    def cached(self, kernel: str, dims: Mapping[str, Any]) -> bool:
        return self.cache.get(self.key(kernel, dims)) is not None

    def pick(
        self,
        kernel: str,
        dims: Mapping[str, Any],
        candidates: list[dict[str, Any]],
        make_bench: Callable[[], Callable[[Mapping[str, Any]], float]] | None,
    ) -> dict[str, Any]:
        if make_bench is None:  # symbolic sizes: nothing to measure on
            return candidates[0]
        key = self.key(kernel, dims)
        bench: Callable[[Mapping[str, Any]], float] | None = None

        def lazy_bench(cfg: Mapping[str, Any]) -> float:
            nonlocal bench
            if bench is None:
                bench = make_bench()
            return bench(cfg)

        return strip(search(self.cache, key, candidates, lazy_bench, self.stats))


@functools.cache
def warmup_stream(device: int) -> torch.cuda.Stream:
    # One side stream for every measurement: cuBLAS keeps a workspace per stream it ran on
    # (a new stream per measurement would leave one behind each time, ~0.1 GiB in total).
    return torch.cuda.Stream(device)


def time_in_graph(fn: Callable[[], Any], reps: int = 10) -> float:
    """GPU ms per call: `reps` calls captured in one CUDA graph, best of 3 replays.

    Decode kernels take microseconds, less than a Python launch: timing eager calls would
    measure the host. Replaying a graph measures the kernels as they will run (inside the
    model's CUDA graph, back to back on warm L2). Not triton's do_bench either: its L2
    flush allocates 256 MB, which would show up in the compiled model's peak memory.
    """
    stream = warmup_stream(torch.cuda.current_device())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # JIT-compile this config outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    del graph
    return best


def rand(shape, dtype, device="cuda") -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def disjoint_groups(pools: list[list[torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
    """Groups taking one tensor from each pool, no tensor twice (q/k/v of one shape draw on
    the same pool: a group reading one weight three times would hit L2)."""
    used: set[int] = set()
    its = [iter(p) for p in pools]
    groups = []
    while True:
        group = []
        for it in its:
            t = next((t for t in it if t.data_ptr() not in used), None)
            if t is None:
                return groups
            used.add(t.data_ptr())
            group.append(t)
        groups.append(tuple(group))


def time_rotating(fns: list[Callable[[], Any]], reps: int = 5) -> float:
    """GPU ms per call of `fns`, each reading a different weight: a rotation larger than
    L2 so every call streams its weight from HBM, as in the model (one read per step)."""
    return time_in_graph(lambda: [f() for f in fns], reps=reps) / len(fns)


def rotation_groups(groups: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """Enough weight groups (one launch's weights each) to exceed 2x L2, padded with
    temporary random groups shaped like the first where the model has too few weights of
    that shape (a small model's K/V projections would otherwise sit in L2)."""
    l2 = getattr(torch.cuda.get_device_properties(), "L2_cache_size", 50 << 20) or (50 << 20)
    size = sum(w.numel() * w.element_size() for w in groups[0])
    out = list(groups[: max(2, math.ceil(2 * l2 / max(size, 1)))][:MAX_ROTATION])
    need = min(MAX_ROTATION, math.ceil(2 * l2 / max(size, 1))) - len(out)
    if need > 0:
        # Made once per group shape and kept until the graph's search ends (every config
        # measures against the same ones): W^T views of [N, K] matrices, like the weights.
        key = tuple((tuple(w.shape), w.dtype, w.device) for w in groups[0])
        if key not in _PADS:
            _PADS[key] = [_random_like(groups[0]) for _ in range(need)]
        out.extend(_PADS[key][:need])
    return out


def _random_like(group: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(w.shape[::-1], dtype=w.dtype, device=w.device).t() for w in group)


# Temporary random weight groups of `rotation_groups`, by group shape; released by
# `release_rotation_pads` once a graph's config search is done (compile time only).
_PADS: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}


def release_rotation_pads() -> None:
    _PADS.clear()


def rotation(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """`rotation_groups` of single weights."""
    return [g[0] for g in rotation_groups([(w,) for w in weights])]
