"""Host cost of our CUDA-graph runner's per-call work, piece by piece (no model).

    python benchmarks/bench_cuda_runner.py [--params 291 --statics 97 --kernels 360]
                                           [--check-parameters]

A 7B decode step hands the runner ~390 inputs: 291 parameters, per layer the static
cache's keys, values and position counter, and three small tensors it copies in (ids,
positions: int64; the attention mask: bool). Each piece of `CudaGraphRunner.__call__`
is timed on its own (host wall time of single calls, the GPU idle before each), with
a graph of `--kernels` tiny kernels standing in for the step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def per_call_us(fn: Callable[[], object], n: int = 500) -> float:
    """Median host time of one call made with the GPU idle: back to back, the calls would
    queue behind the GPU and time its throughput (a 360-kernel replay) instead."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main() -> None:
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner

    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=291)
    ap.add_argument("--statics", type=int, default=97)
    ap.add_argument("--kernels", type=int, default=360)
    ap.add_argument(
        "--check-parameters",
        action="store_true",
        help="check the parameters' addresses too (weights not frozen; frozen is the default)",
    )
    a = ap.parse_args()
    dev = "cuda"
    params = [torch.nn.Parameter(torch.zeros(8, device=dev)) for _ in range(a.params)]
    statics = [torch.zeros(8, device=dev) for _ in range(a.statics)]
    for t in statics:
        torch._dynamo.mark_static_address(t)
    copied = [
        torch.zeros(1, 1, dtype=torch.long, device=dev),
        torch.zeros(1, 1, dtype=torch.long, device=dev),
        torch.zeros(1, 1, 1, 300, dtype=torch.bool, device=dev),
    ]
    args = [*copied[:2], *params, copied[2], *statics]

    def step(*xs: torch.Tensor) -> torch.Tensor:
        y = xs[0].float()
        for _ in range(a.kernels - 1):
            y = y + 1  # one tiny kernel each
        return y

    runner = CudaGraphRunner(step, frozenset(), check_parameters=a.check_parameters)
    runner(*args)
    runner(*args)  # captured
    assert runner.graph is not None
    same = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
    dp = torch.Tensor.data_ptr
    idx, ptrs = runner.static_idx, [runner.ptr_at[i] for i in runner.static_idx]
    bufs = [b for _, group in runner.copy_groups for b in group]
    rows = [
        ("runner __call__, whole (check, copies, launch, clone)", lambda: runner(*args)),
        ("graph.replay() alone (cudaGraphLaunch)", runner.graph.replay),
        ("list(args)", lambda: list(args)),
        ("address check, the runner's", lambda: runner._statics_unchanged(args)),
        ("address check, Python loop", lambda: [dp(args[i]) for i in idx] == ptrs),
        ("output clone", lambda: runner.outs.clone()),
    ]
    if same is not None:
        rows.append(("address check, C++", lambda: same(args, runner.ptr_at, idx)))
    for positions, group in runner.copy_groups:
        src = [args[i] for i in positions]
        rows.append((f"copy in {len(group)} x {group[0].dtype}", lambda g=group, s=src: torch._foreach_copy_(g, s)))  # fmt: skip
    as_bytes = [b.view(torch.uint8) for b in bufs]
    srcs = [args[i] for positions, _ in runner.copy_groups for i in positions]
    rows.append(
        ("copy in, all as bytes (views made per call)",
         lambda: torch._foreach_copy_(as_bytes, [s.view(torch.uint8) for s in srcs])),
    )  # fmt: skip
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {len(args)} inputs, "
          f"{len(idx)} address-checked, {a.kernels} kernels in the graph")  # fmt: skip
    for name, fn in rows:
        print(f"  {per_call_us(fn):8.1f} us  {name}")


if __name__ == "__main__":
    main()
