"""Where the host time of a CUDA decode step goes: HF generate() under cProfile.

    python benchmarks/profile_host_cuda.py --shape 1b --variants inductor,yirage --out DIR
    python benchmarks/profile_host_cuda.py --shape 7b --timeline     (yirage only, no cProfile)
    python benchmarks/profile_host_cuda.py --shape 1b --trace --variants yirage,yirage_run_ahead_always

`--trace`: instead of cProfile, one generate under torch.profiler per variant (any name of
bench_cuda_llama.py's, environment variants included), its Chrome trace written to
DIR/<variant>_trace.json.gz: both streams' kernels and the host's waits, token by token;
the token's split (our call, HF's work after it up to its sync, HF's work before the next
call, GPU busy: benchmarks/trace_split.py) is printed.

Per variant: after a warm-up generate (compiles), one generate of `--new` tokens runs
under cProfile; the top functions by own time and by cumulative time are written to
DIR/<variant>_host.txt, and the wall ms/token with and without the profiler are printed.
The GPU work of a step is one CUDA-graph replay in both variants, so what differs is the
Python between replays: HF's loop (shared) and each backend's call path (Dynamo guards,
AOTAutograd's runtime wrapper, the CUDA-graph tree, our wrapper).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_cuda_llama import (  # noqa: E402
    ENV_VARIANTS,
    SHAPES,
    Runner,
    _env,
    build_model,
    forget_compiled,
    variant_configs,
)
from trace_split import format_split, load, split_per_token  # noqa: E402


def write_profile(prof: cProfile.Profile, path: Path, top: int = 60) -> None:
    """The top functions by own and by cumulative time as text at `path`, and the raw
    stats beside it (`.prof`, for pstats/snakeviz callers views)."""
    text = io.StringIO()
    st = pstats.Stats(prof, stream=text)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(2 * top)
    path.write_text(text.getvalue())
    prof.dump_stats(str(path.with_suffix(".prof")))


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3 if xs else float("nan")


def timeline(runner: Runner, model: Any, cc: Any, new: int) -> str:
    """Per decode token, host wall-clock stamps (no profiler) at: HF's call into the
    compiled model, our CUDA-graph runner's entry, cudaGraphLaunch's start and end, and
    the returns; medians over the tokens, against the step's GPU time (its graph replayed
    alone). What is not ours is HF's loop, which waits for the GPU once per token."""
    from yirage_dynamo.runtime import cuda_graphs as cg

    from yirage_dynamo.frozen_weights import FrozenWeightsGuard

    pc = time.perf_counter
    keys = ("call", "g", "run", "c0", "c1", "l0", "l1", "ret", "out")
    marks: dict[str, list[float]] = {k: [] for k in keys}
    compiled = model._compiled_call

    def timed_call(*a: Any, **k: Any) -> Any:
        marks["call"].append(pc())
        out = compiled(*a, **k)
        marks["out"].append(pc())
        return out

    runner_call, replay = cg.CudaGraphRunner.__call__, torch.cuda.CUDAGraph.replay
    check, guard_call = cg.CudaGraphRunner._statics_unchanged, FrozenWeightsGuard.__call__

    def timed_guard(self: Any, *a: Any) -> Any:
        marks["g"].append(pc())
        return guard_call(self, *a)

    def timed_runner(self: Any, *a: Any) -> Any:
        marks["run"].append(pc())
        out = runner_call(self, *a)
        marks["ret"].append(pc())
        return out

    def timed_check(self: Any, args: Any) -> bool:
        marks["c0"].append(pc())
        same = check(self, args)
        marks["c1"].append(pc())
        return same

    def timed_replay(self: Any) -> None:
        marks["l0"].append(pc())
        replay(self)
        marks["l1"].append(pc())

    model._compiled_call = timed_call
    cg.CudaGraphRunner.__call__, torch.cuda.CUDAGraph.replay = timed_runner, timed_replay
    cg.CudaGraphRunner._statics_unchanged = timed_check
    FrozenWeightsGuard.__call__ = timed_guard
    try:
        runner.generate(new, cc)
        torch.cuda.synchronize()
    finally:
        model._compiled_call = compiled
        cg.CudaGraphRunner.__call__, torch.cuda.CUDAGraph.replay = runner_call, replay
        cg.CudaGraphRunner._statics_unchanged = check
        FrozenWeightsGuard.__call__ = guard_call
    if not marks["g"]:  # no guard in front (freeze off): it took no time
        marks["g"] = list(marks["call"])
    n = min(len(v) for v in marks.values())
    if n < 3 or len(marks["l0"]) != len(marks["call"]):
        return f"timeline: stamps do not line up ({ {k: len(v) for k, v in marks.items()} })"
    m = {k: v[:n] for k, v in marks.items()}
    runners = [r for r in cg.live_runners() if r.graph is not None]
    gpu = cg.replay_ms(runners[-1]) if runners else float("nan")
    rows = [
        ("token period (call to next call)", [b - a for a, b in zip(m["call"], m["call"][1:])]),
        ("Dynamo: call -> our frozen-weights guard", [b - a for a, b in zip(m["call"], m["g"])]),
        ("guard: entry -> our runner (weights check)", [b - a for a, b in zip(m["g"], m["run"])]),
        ("runner: entry -> launch", [b - a for a, b in zip(m["run"], m["l0"])]),
        ("  of which: static inputs' address check", [b - a for a, b in zip(m["c0"], m["c1"])]),
        ("  of which: check -> launch (input copies)", [b - a for a, b in zip(m["c1"], m["l0"])]),
        ("cudaGraphLaunch (host)", [b - a for a, b in zip(m["l0"], m["l1"])]),
        ("runner: launch -> return (output clones)", [b - a for a, b in zip(m["l1"], m["ret"])]),
        ("Dynamo: runner return -> call return", [b - a for a, b in zip(m["ret"], m["out"])]),
        ("HF: call return -> next call (waits for the GPU)", [b - a for a, b in zip(m["out"], m["call"][1:])]),
    ]  # fmt: skip
    lines = [f"{n} decode calls; GPU step (graph replayed alone) {gpu:.3f} ms"]
    if runners:
        r = runners[-1]
        lines.append(
            f"runner: {len(r.ptr_at)} inputs, {len(r.static_idx)} address-checked, copied in "
            f"{[len(p) for p, _ in r.copy_groups]} (per dtype), {len(r.copy_back)} copied back; "
            f"C++ check: {hasattr(torch._C, '_tensors_data_ptrs_at_indices_equal')}"
        )
    lines += [f"  {_median_ms(v):8.3f} ms  {name}" for name, v in rows]
    period = _median_ms(rows[0][1])
    lines.append(f"  {period - gpu:8.3f} ms  host time not hidden behind the GPU (period - step)")
    return "\n".join(lines)


def trace(runner: Runner, cc: Any, new: int, stem: Path) -> float:
    """One generate under torch.profiler after two warm-ups; the trace at
    `stem`_trace.json.gz; returns the unprofiled ms/token of the second warm-up."""
    runner.generate(new, cc)  # compile (and, with run-ahead, learn and trial)
    torch.cuda.synchronize()
    t = time.perf_counter()
    runner.generate(new, cc)
    torch.cuda.synchronize()
    plain = (time.perf_counter() - t) / new * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        runner.generate(new, cc)
        torch.cuda.synchronize()
    prof.export_chrome_trace(f"{stem}_trace.json.gz")
    print(format_split(split_per_token(load(f"{stem}_trace.json.gz"))), flush=True)
    return plain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--variants", default="inductor,yirage")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", default=".")
    ap.add_argument("--timeline", action="store_true", help="stamps per token, yirage only")
    ap.add_argument("--trace", action="store_true", help="a torch.profiler trace per variant")
    args = ap.parse_args()
    s = dict(SHAPES[args.shape], new=args.new)
    model = build_model(s)
    runner = Runner(model, s)
    configs = variant_configs({})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        torch._dynamo.reset()
        forget_compiled(model)
        with _env(ENV_VARIANTS.get(name, {})):
            run_variant(args, name, configs[name], runner, model, out)


def run_variant(args: Any, name: str, cc: Any, runner: Runner, model: Any, out: Path) -> None:
    """One variant's trace, timeline or cProfile (its environment already set)."""
    if args.trace:
        print(f"{name}: {trace(runner, cc, args.new, out / name):.3f} ms/token", flush=True)
        return
    runner.generate(args.new, cc)  # compile + warm up
    if args.timeline:
        runner.generate(args.new, cc)
        print(f"{args.shape} {name}:\n{timeline(runner, model, cc, args.new)}", flush=True)
        # Diagnostic only (unsafe for real use): what Dynamo's guard checks cost.
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            print("  ... with guard evaluation skipped:", flush=True)
            print(timeline(runner, model, cc, args.new), flush=True)
        return
    torch.cuda.synchronize()
    t = time.perf_counter()
    runner.generate(args.new, cc)
    torch.cuda.synchronize()
    plain = (time.perf_counter() - t) / args.new * 1e3
    prof = cProfile.Profile()
    prof.enable()
    runner.generate(args.new, cc)
    torch.cuda.synchronize()
    prof.disable()
    write_profile(prof, out / f"{name}_host.txt")
    # The whole generate() over its new tokens: prefill and HF's set-up included (the
    # decode token alone: bench_cuda_llama.py).
    print(f"{name}: {plain:.3f} ms per new token, whole generate(), unprofiled", flush=True)


if __name__ == "__main__":
    main()
