"""Memory planning on CPU: planned peak, arena size and measured peak RSS vs eager.

Each configuration runs in a fresh subprocess (eager; yirage with memory_planning off;
yirage with it on). After loading and one warm-up call (compiling), the peak-RSS counter is
reset (/proc/self/clear_refs) and `--calls` forward passes run; the transient peak is
VmHWM minus the RSS just before those calls. The arena is allocated during warm-up and
stays resident, so for the planned run it is added back: "attributable" = transient
peak + arena. Linux only.

    .venv/bin/python benchmarks/bench_memory.py --size tiny --seq 64
    .venv/bin/python benchmarks/bench_memory.py --size 125m --seq 128

--floors: host memory of a whole compiled HF generate() (static cache) against the floors
torch.compile itself sets, each in a fresh process: eager; a no-op backend (Dynamo,
guards, FX: the torch.compile floor); AOTAutograd only (the AOT floor); yirage on a cold
cache, yirage with graph_cache=False, yirage again on the now warm cache (a graph cache
hit); Inductor. Peak RSS is ru_maxrss (it includes building the model); steady RSS is
/proc/self/statm after three generate() calls. Model: bench_cpu_llama's SmolLM-135M shape
("smol") or the same 30 layers at width 64 ("tiny", weights ~0: what is left is code).

    .venv/bin/python benchmarks/bench_memory.py --floors --size smol --new-tokens 8
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(size: str, seq: int, calls: int, config: str, last: bool) -> dict:
    import torch

    import yirage_dynamo
    from yirage_dynamo.models import build_model, random_input_ids

    model = build_model("llama", size)
    ids = random_input_ids(model, 1, seq)
    fn = model
    # Prefill as generate() runs it (logits of the last position only), or all logits.
    kw = {"logits_to_keep": 1} if last else {}
    if config != "eager":
        opts = {"fallback": "error", "memory_planning": config == "planned"}
        fn = torch.compile(model, backend="yirage", options=opts)
    with torch.no_grad():
        ref = fn(ids, **kw).logits  # warm-up / compile
        del ref
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status("VmRSS")
        for _ in range(calls):
            out = fn(ids, **kw).logits
            del out
        peak = _status("VmHWM")
    mems = [r.memory for r in yirage_dynamo.reports() if r.memory]
    arena = sum(m["arena_bytes"] for m in mems)
    return {
        "config": config,
        "transient_peak": peak - before,
        "arena": arena,
        "attributable": peak - before + arena,
        "planned_peak": sum(m["planned_peak_bytes"] for m in mems),
        "naive": sum(m["naive_bytes"] for m in mems),
        "buffers": sum(m["buffers"] for m in mems),
        "fallbacks": [f.to for r in yirage_dynamo.reports() for f in r.fallbacks],
    }


FLOORS = ("eager", "noop", "aot", "yirage_nocache", "yirage", "yirage_hit", "inductor")


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def floor_child(config: str, size: str, new: int) -> dict:
    import resource

    import torch
    from bench_cpu_llama import SMOL, TINY, _generate, _model

    torch.set_num_threads(1)
    cfg = SMOL if size == "smol" else TINY
    model = _model(cfg)
    ids = torch.randint(0, cfg["vocab_size"], (1, 16))
    gc.collect()
    model_rss = _rss()
    backend: object = None if config == "eager" else config
    if config == "noop":
        backend = lambda gm, example_inputs, **kw: gm.forward  # noqa: E731
    elif config == "aot":
        from torch._dynamo.backends.common import aot_autograd

        aot = aot_autograd(fw_compiler=lambda g, _: g, keep_inference_input_mutations=True)
        backend = lambda gm, example_inputs, **kw: aot(gm, example_inputs)  # noqa: E731
    elif config.startswith("yirage"):
        backend = "yirage"
    with torch.no_grad():
        for _ in range(3):
            _generate(model, ids, new, backend)
    gc.collect()
    out = {
        "config": config,
        "model": model_rss,
        "steady": _rss(),
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if config.startswith("yirage"):
        out["graph_cache"] = [r.graph_cache for r in yirage_reports()]
        out["fallbacks"] = [f.to for r in yirage_reports() for f in r.fallbacks]
    return out


def yirage_reports() -> list:
    import yirage_dynamo

    return yirage_dynamo.reports()


def floors(size: str, new: int) -> None:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in FLOORS:
            env = dict(
                os.environ,
                OMP_NUM_THREADS="1",
                YIRAGE_DEVICE="cpu",
                YIRAGE_CACHE_DIR=os.path.join(tmp, "yirage"),
                TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
            )
            if config == "yirage_nocache":
                env["YIRAGE_GRAPH_CACHE"] = "0"
            cmd = [sys.executable, __file__, "--floor-child", config, "--size", size]
            cmd += ["--new-tokens", str(new)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"{config}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    mib = 1 / 2**20
    print(f"HF Llama {size}, fp32, CPU, static cache, generate() x3 of {new} new tokens")
    print(f"{'config':<15} {'model MiB':>9} {'steady MiB':>10} {'peak MiB':>9}  graph cache")
    for r in rows:
        print(
            f"{r['config']:<15} {r['model'] * mib:>9.0f} {r['steady'] * mib:>10.0f} "
            f"{r['peak'] * mib:>9.0f}  {r.get('graph_cache', '')}"
            + (f" fallbacks={r['fallbacks']}" if r.get("fallbacks") else "")
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # tiny/125m: yirage_dynamo.models sizes; smol/tiny with --floors: bench_cpu_llama's.
    p.add_argument("--size", default="tiny", choices=["tiny", "125m", "smol"])
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--last", action="store_true", help="logits of the last position only")
    p.add_argument("--child", default=None)
    p.add_argument("--floors", action="store_true", help="whole-generate() RSS vs floors")
    p.add_argument("--floor-child", default=None, choices=FLOORS)
    p.add_argument("--new-tokens", type=int, default=8)
    a = p.parse_args()
    if a.floor_child:
        print(json.dumps(floor_child(a.floor_child, a.size, a.new_tokens)))
        return
    if a.floors:
        floors(a.size, a.new_tokens)
        return
    if a.child:
        print(json.dumps(child(a.size, a.seq, a.calls, a.child, a.last)))
        return
    rows = []
    for config in ("eager", "unplanned", "planned"):
        cmd = [sys.executable, __file__, "--size", a.size, "--seq", str(a.seq)]
        cmd += ["--calls", str(a.calls), "--child", config] + (["--last"] if a.last else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    mib = 1 / 2**20
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default (dynamic)")
    print(
        f"llama {a.size}, seq {a.seq}, batch 1, fp32, CPU, {a.calls} calls, "
        f"logits {'last position' if a.last else 'all positions'}, mmap threshold {malloc}"
    )
    print(
        f"{'config':<10} {'transient MiB':>13} {'arena MiB':>10} {'attrib. MiB':>11} "
        f"{'planned peak MiB':>16} {'naive MiB':>10} {'buffers':>8}"
    )
    for r in rows:
        print(
            f"{r['config']:<10} {r['transient_peak'] * mib:>13.2f} {r['arena'] * mib:>10.2f} "
            f"{r['attributable'] * mib:>11.2f} {r['planned_peak'] * mib:>16.2f} "
            f"{r['naive'] * mib:>10.2f} {r['buffers']:>8}"
            + (f"  fallbacks={r['fallbacks']}" if r["fallbacks"] else "")
        )
    eager = rows[0]["attributable"]
    for r in rows[1:]:
        print(f"{r['config']}: attributable - eager = {(r['attributable'] - eager) * mib:+.2f} MiB")


if __name__ == "__main__":
    main()
