"""The `yirage` command: demo, compare, doctor, profile.

Exit codes: 0 ok, 1 failure (a backend failed, outputs differ, an exception), 2 bad
arguments (argparse's convention).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .models import DTYPES, MODELS, SIZES, is_generative
from .report import format_reports

BACKEND_CHOICES = ("eager", "inductor", "yirage")


class _ArgError(Exception):
    """A bad argument found after parsing (exit code 2)."""


def _backend_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in BACKEND_CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"invalid backend(s) {bad or [text]}; choose from {', '.join(BACKEND_CHOICES)}"
        )
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise _ArgError("--device cuda: CUDA is not available on this machine (try --device cpu)")
    return name


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODELS, default="llama", help="model family")
    p.add_argument("--size", choices=SIZES, default="tiny", help="approximate size")
    p.add_argument("--layers", type=_positive, help="override the number of layers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--task", choices=("forward", "generate"), default="forward")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--seq-len", type=_positive, default=32, help="prompt/input length")
    p.add_argument("--new-tokens", type=_positive, default=16, help="generate: new tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yirage", description="yirage_dynamo: a torch.compile backend for LLM inference"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="compile a small random-weight Llama and generate")
    demo.add_argument("--layers", type=_positive, default=2)
    demo.add_argument("--new-tokens", type=_positive, default=32)
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    cmp = sub.add_parser("compare", help="eager vs Inductor vs yirage on one HF model")
    _add_model_args(cmp)
    cmp.add_argument(
        "--backends", type=_backend_list, default=BACKEND_CHOICES, help="comma-separated"
    )
    cmp.add_argument("--warmup", type=_positive, default=2)
    cmp.add_argument("--iters", type=_positive, default=10)
    cmp.add_argument("--out", default="yirage_compare", help="directory for CSV, JSON, PNG")
    cmp.add_argument(
        "--fresh-caches",
        action="store_true",
        help="compile with empty Inductor/yirage on-disk caches (true cold-compile times)",
    )

    sub.add_parser("doctor", help="devices, toolchains, lowering chain, cache")

    prof = sub.add_parser("profile", help="per-kernel time table under torch.profiler")
    _add_model_args(prof)
    prof.add_argument("--backend", choices=BACKEND_CHOICES[1:], default="yirage")
    prof.add_argument("--steps", type=_positive, default=5)
    prof.add_argument("--trace", help="also write a Chrome trace (JSON) to this path")
    prof.add_argument("--explain", action="store_true", help="also list Dynamo graph breaks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for bad arguments
        return exc.code if isinstance(exc.code, int) else 2
    commands = {
        "demo": cmd_demo,
        "compare": cmd_compare,
        "doctor": cmd_doctor,
        "profile": cmd_profile,
    }
    try:
        return commands[args.command](args)
    except _ArgError as exc:
        print(f"yirage {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not dump a traceback
        print(f"yirage {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("YIRAGE_DEBUG"):
            raise
        return 1


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import CompileConfig

    import yirage_dynamo
    from yirage_dynamo.models import build_model, random_input_ids

    device = _resolve_device(args.device)
    net = build_model("llama", "tiny", device=device, layers=args.layers)
    ids = random_input_ids(net, 1, 8)
    gen: dict[str, Any] = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        cache_implementation="static",
    )
    cc = CompileConfig(backend="yirage")
    cc._compile_all_devices = True  # not an __init__ argument; lets generate() compile on CPU

    def timed(**kw: Any) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = net.generate(ids, **gen, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    print(f"yirage demo: LlamaForCausalLM ({args.layers} layers, random weights) on {device}")
    yirage_dynamo.clear_reports()
    with torch.no_grad():
        timed(disable_compile=True)  # warm eager up too, for a fair tok/s
        ref, t_eager = timed(disable_compile=True)
        out, t_cold = timed(compile_config=cc)
        out2, t_warm = timed(compile_config=cc)
    print(format_reports(yirage_dynamo.reports()))
    same = torch.equal(ref, out) and torch.equal(ref, out2)
    n = args.new_tokens
    print(f"tokens equal to eager: {same}")
    print(f"eager : {n / t_eager:8.1f} tok/s")
    print(f"yirage: {n / t_warm:8.1f} tok/s (first call incl. compile {t_cold:.2f} s)")
    if not yirage_dynamo.reports():
        print("yirage demo: generate() compiled no graph through yirage", file=sys.stderr)
        return 1
    return 0 if same else 1


# --------------------------------------------------------------------------- compare


def _check_task(args: argparse.Namespace) -> None:
    if args.task == "generate" and not is_generative(args.model):
        raise _ArgError(f"--task generate needs a generative model; {args.model} is an encoder")


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, format_table, run_compare, write_outputs

    _check_task(args)
    cfg = CompareConfig(
        model=args.model,
        size=args.size,
        device=_resolve_device(args.device),
        dtype=args.dtype,
        backends=args.backends,
        task=args.task,
        batch=args.batch,
        seq_len=args.seq_len,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        iters=args.iters,
        layers=args.layers,
        fresh_caches=args.fresh_caches,
    )
    results = run_compare(cfg)
    print(format_table(cfg, results))
    for kind, where in write_outputs(cfg, results, args.out).items():
        print(f"{kind}: {where}")
    failed = [r for r in results if r.error or r.tokens_match is False]
    return 1 if failed else 0


# --------------------------------------------------------------------------- doctor


def _compiler() -> str | None:
    from .options import parse_options

    for cand in (parse_options().cxx, os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


_OMP_TEST = """#include <omp.h>
#include <cstdio>
int main() { int n = 0;
#pragma omp parallel reduction(+:n)
  n += 1;
  std::printf("%d %d\\n", n, omp_get_max_threads()); return 0; }
"""


def _openmp_check(cxx: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp, "omp.cpp"), Path(tmp, "omp")
        src.write_text(_OMP_TEST)
        build = subprocess.run(
            [cxx, "-O2", "-fopenmp", str(src), "-o", str(exe)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if build.returncode != 0:
            return "NOT working: " + (build.stderr.strip().splitlines() or ["?"])[-1]
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
        threads = run.stdout.split()
        return f"ok ({threads[0]} threads ran)" if run.returncode == 0 else "built, failed to run"


def _module_version(name: str) -> str:
    try:
        mod = __import__(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return f"not available ({type(exc).__name__})"
    return f"{getattr(mod, '__version__', 'installed')}"


def _dir_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from .device import available_devices
    from .lowering import choose_lowering
    from .options import parse_options

    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print("devices:")
    print(f"  cpu: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("  cuda: not available")
    mps = getattr(torch.backends, "mps", None)
    print(f"  mps: {'available' if mps and mps.is_available() else 'not available'}")
    print(f"  neuron: torch_neuronx {_module_version('torch_neuronx')}")
    print("toolchains:")
    cxx = _compiler()
    print(f"  C++ compiler: {cxx or 'NOT FOUND (set YIRAGE_CXX or CXX)'}")
    if cxx:
        print(f"  OpenMP test compile: {_openmp_check(cxx)}")
    print(f"  triton: {_module_version('triton')}")
    metal = shutil.which("xcrun") and sys.platform == "darwin"
    print(f"  Metal: {'xcrun found' if metal else 'not available (macOS only)'}")
    neuronx_cc = shutil.which("neuronx-cc")
    print(f"  Neuron compiler: {neuronx_cc or 'neuronx-cc not found'}")
    default = "cuda" if torch.cuda.is_available() else "cpu"
    if default == "cpu" and mps and mps.is_available():
        default = "mps"
    options = parse_options()
    print(f"default device: {default} (devices seen: {', '.join(available_devices())})")
    for dev in dict.fromkeys([default, "cpu"]):
        lowering, why = choose_lowering(dev)
        chain = [lowering.name] + (["aten"] if lowering.name != "aten" else [])
        chain += {"inductor": ["inductor", "eager"], "eager": ["eager"]}.get(options.fallback, [])
        print(f"  {dev}: {' -> '.join(chain)}  ({why})")
    cache = options.cache_path
    count, size = _dir_size(cache)
    state = f"{count} files, {size / 2**20:.1f} MiB" if cache.is_dir() else "not created yet"
    print(f"cache dir: {cache} ({state})")
    return 0


# --------------------------------------------------------------------------- profile


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    import yirage_dynamo
    from yirage_dynamo.profiling import (
        STEP_RANGE,
        device_kernel_table,
        format_kernel_table,
        kernel_time_table,
    )

    from .compare import CompareConfig, _runner
    from .models import build_model, random_input_ids

    _check_task(args)
    device = _resolve_device(args.device)
    net = build_model(args.model, args.size, DTYPES[args.dtype], device, args.layers)
    ids = random_input_ids(net, args.batch, args.seq_len)
    cfg = CompareConfig(model=args.model, device=device, task=args.task, new_tokens=args.new_tokens)
    torch._dynamo.reset()
    n_reports = len(yirage_dynamo.reports())
    with torch.no_grad():
        if args.explain:
            fn = (lambda: net(input_ids=ids)) if args.model == "bert" else None
            fn = fn or (lambda: net(input_ids=ids, use_cache=False))
            print("graph breaks (forward):", yirage_dynamo.explain(fn), sep="\n")
        call = _runner(cfg, net, args.backend, ids)
        start = time.perf_counter()
        call()  # compile
        print(f"compiled in {time.perf_counter() - start:.2f} s; profiling {args.steps} steps")
        call()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                with torch.profiler.record_function(STEP_RANGE):
                    call()
                    if device == "cuda":
                        torch.cuda.synchronize()  # the step's range then covers its GPU work
    print(format_reports(yirage_dynamo.reports()[n_reports:]))
    events = prof.events()
    rows, step_us = kernel_time_table(events, use_device=device == "cuda")
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}")
    if not rows and device == "cuda":
        # No generated wrapper ran per step (Inductor-built graph, CUDA-graph replay):
        # the GPU's own kernel records name the kernels instead.
        rows, step_us = device_kernel_table(events)
        print(f"(no yirage wrapper ranges with backend={args.backend}; CUDA kernel records)")
    if not rows:
        print(f"no yirage wrapper ranges in the trace (backend={args.backend}); top ops instead:")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
        return 0
    print(f"per-kernel time over {args.steps} steps ({'device' if device == 'cuda' else 'CPU'}):")
    print(format_kernel_table(rows, step_us))
    return 0
