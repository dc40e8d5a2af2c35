"""Where a cold CUDA compile goes: the first HF generate() of a backend, fresh caches.

    python benchmarks/profile_compile_cuda.py --shape 7b --variant yirage --out DIR [--cprofile]

Run it once per backend, each in a new process (a process's first compile pays one-time
set-up, see RESULTS.md "CUDA cold compile, each backend alone"). The Triton, Inductor and
yirage caches point at a fresh temporary directory before torch is imported. Printed: the
cold compile seconds (first generate minus a warm one of the same length), and for yirage
every compiled piece's stage times from its report. With --cprofile the first generate
runs under cProfile (inflated, but it shows the split), written to DIR/<variant>_compile.txt (and .prof).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # fresh caches, set before torch/triton read them
    _tmp = tempfile.mkdtemp(prefix="yirage_cold_")
    for _var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "YIRAGE_CACHE_DIR"):
        os.environ[_var] = os.path.join(_tmp, _var.lower())

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_cuda_llama import SHAPES, Runner, _sync_time, build_model, variant_configs  # noqa: E402
from profile_host_cuda import write_profile  # noqa: E402


def _time_runner_steps() -> dict[str, list[float]]:
    """Wall seconds of the CUDA-graph runner's first (eager) calls and captures: the part
    of a cold compile after the backend returned."""
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner

    timings: dict[str, list[float]] = {}
    for name in ("_eager", "_capture"):
        orig = getattr(CudaGraphRunner, name)

        def timed(self, *a, _orig=orig, _name=name):
            torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return _orig(self, *a)
            finally:
                torch.cuda.synchronize()
                if self.calls <= 2:
                    timings.setdefault(f"runner {_name}", []).append(time.perf_counter() - t)

        setattr(CudaGraphRunner, name, timed)
    return timings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--variant", default="yirage")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    import cProfile
    import logging

    import yirage_dynamo

    # The precompile rounds' "N of M Triton kernels compiled in W children, T s" lines.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    logging.getLogger("yirage_dynamo.triton_pool").addHandler(handler)
    logging.getLogger("yirage_dynamo.triton_pool").setLevel(logging.INFO)

    s = SHAPES[args.shape]
    model = build_model(s)
    runner = Runner(model, s)
    cc = variant_configs({})[args.variant]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = _time_runner_steps()
    prof = cProfile.Profile() if args.cprofile else None
    if prof:
        prof.enable()
    cold = _sync_time(lambda: runner.generate(s["new"], cc))[0]
    if prof:
        prof.disable()
        write_profile(prof, out / f"{args.variant}_compile.txt")
    warm = _sync_time(lambda: runner.generate(s["new"], cc))[0]
    print(
        f"{args.shape} {args.variant}: cold compile {cold - warm:.2f} s "
        f"(first generate {cold:.2f} s, warm {warm:.2f} s){' under cProfile' if prof else ''}"
    )
    # What Dynamo's own compile (trace, backend, guards) took; the rest of the cold
    # compile is the first generate's other one-time costs (first calls, capture, ...).
    inner = sum(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", []))
    print(
        f"  Dynamo compile (trace + backend + guards) {inner:.2f} s, outside it {cold - warm - inner:.2f} s"
    )
    for what, secs in timings.items():
        print(
            f"  {what}: {len(secs)} calls, {sum(secs):.2f} s ({', '.join(f'{x:.2f}' for x in secs[:4])})"
        )
    stats = dict(torch._dynamo.utils.counters["stats"])
    print(f"  dynamo: {stats}")
    print(torch._dynamo.utils.compile_times(repr="str", aggregate=True))
    for r in yirage_dynamo.reports():
        if not r.lowering:
            continue
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r.stages.items() if v >= 0.05)
        print(f"  graph {r.graph_id} ({r.nodes_in} nodes): {stages}")
        for note in r.notes:
            if "precompiled" in note:
                print(f"    {note}")


if __name__ == "__main__":
    main()
