"""Memory planning on CPU: planned peak, arena size and measured peak RSS vs eager.

Each configuration runs in a fresh subprocess (eager; yirage with memory_planning off;
yirage with it on). After loading and one warm-up call (compiling), the peak-RSS counter is
reset (/proc/self/clear_refs) and `--calls` forward passes run; the transient peak is
VmHWM minus the RSS just before those calls. The arena is allocated during warm-up and
stays resident, so for the planned run it is added back: "attributable" = transient
peak + arena. Linux only.

    .venv/bin/python benchmarks/bench_memory.py --size tiny --seq 64
    .venv/bin/python benchmarks/bench_memory.py --size 125m --seq 128
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "125m"])
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--last", action="store_true", help="logits of the last position only")
    p.add_argument("--child", default=None)
    a = p.parse_args()
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
