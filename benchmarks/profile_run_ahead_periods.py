"""Every decode call's period (call to call: the caller's whole token) over HF generate(),
by position in the sequence and by whether the call handed out a step started ahead.

Why: on H100 hosts a 1B trial timed run-ahead faster than in order (2.17 against 2.45
ms), then the calls run ahead were slower (2.66; RESULTS.md, twenty-ninth session). The
trial runs early in the first sequence, before the bench compiles its other variants;
this separates the candidates: the position in the sequence, the time since the capture,
other variants compiled into the process.

    python benchmarks/profile_run_ahead_periods.py --shape 1b --variants yirage --rounds 4

Per variant and generate() ("compile": the first one), the median period in ms of the
calls that handed out a step started ahead (A) and of the others (O), per quarter of the
sequence's decode calls, and the runner's run-ahead state at the end. Where a token's
host time goes within a call: `profile_host_cuda.py --trace` and `trace_split.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Iterator

import torch
from bench_cuda_llama import SHAPES, Runner, build_model, compile_variant, use_compiled
from cuda_variants import ENV_VARIANTS, _env, variant_configs
from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner


@contextlib.contextmanager
def recorded_calls(log: list[tuple[float, bool]]) -> Iterator[None]:
    """Appends (entry time, a step started ahead was pending) for every runner call."""
    original = CudaGraphRunner.__call__

    def call(self, *args):
        log.append((time.perf_counter(), getattr(self, "_started", None) is not None))
        return original(self, *args)

    CudaGraphRunner.__call__ = call
    try:
        yield
    finally:
        CudaGraphRunner.__call__ = original


def quarters(log: list[tuple[float, bool]], new: int) -> str:
    """Median period per quarter of the decode calls, ahead (A) and in order (O)."""
    cells = []
    edges = [1 + (new - 1) * q // 4 for q in range(5)]
    for lo, hi in zip(edges, edges[1:]):
        by_mode: dict[bool, list[float]] = {True: [], False: []}
        for k in range(lo, min(hi, len(log))):
            by_mode[log[k][1]].append((log[k][0] - log[k - 1][0]) * 1e3)
        cell = " ".join(
            f"{'A' if m else 'O'} {statistics.median(v):.3f} ({len(v)})"
            for m, v in by_mode.items()
            if v
        )
        cells.append(cell or "-")
    return " | ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--variants", default="yirage")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    s = SHAPES[args.shape]
    variants = args.variants.split(",")
    model = build_model(s)
    runner = Runner(model, s)
    configs = variant_configs({})
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.shape}")
    print("| variant | generate | calls 1/4 | 2/4 | 3/4 | 4/4 |")
    print("|---|---|---|---|---|---|")
    compiled, runners = {}, {}
    with torch._dynamo.config.patch(recompile_limit=max(8, 4 * len(variants))):
        for name in variants:
            log: list[tuple[float, bool]] = []
            compiled[name], runners[name] = compile_variant(
                runner, args.shape, name, configs[name], functools.partial(recorded_calls, log)
            )
            print(f"| {name} | compile | {quarters(log, s['new'])} |", flush=True)
        for k in range(args.rounds):
            for name in variants:
                use_compiled(model, compiled[name], configs[name])
                log = []
                torch.cuda.synchronize()
                with _env(ENV_VARIANTS.get(name, {})), recorded_calls(log):
                    runner.generate(s["new"], configs[name])
                torch.cuda.synchronize()
                print(f"| {name} | round {k + 1} | {quarters(log, s['new'])} |", flush=True)
    for name in variants:
        for r in runners[name]:
            if hasattr(r, "hits"):
                print(
                    f"{name}: choice {r.choice}, trials {list(r.trials)}, hits {r.hits}, "
                    f"misses {r.misses}, learn_failed {r.learn_failed}"
                )


if __name__ == "__main__":
    main()
