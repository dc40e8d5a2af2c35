"""Where the host time of a CUDA decode step goes: HF generate() under cProfile.

    python benchmarks/profile_host_cuda.py --shape 1b --variants inductor,yirage --out DIR

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
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_cuda_llama import SHAPES, Runner, build_model  # noqa: E402


def write_profile(prof: cProfile.Profile, path: Path, top: int = 60) -> None:
    """The top functions by own and by cumulative time as text at `path`, and the raw
    stats beside it (`.prof`, for pstats/snakeviz callers views)."""
    text = io.StringIO()
    st = pstats.Stats(prof, stream=text)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(2 * top)
    path.write_text(text.getvalue())
    prof.dump_stats(str(path.with_suffix(".prof")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--variants", default="inductor,yirage")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    import transformers

    from yirage_dynamo.backend import yirage

    s = dict(SHAPES[args.shape], new=args.new)
    model = build_model(s)
    runner = Runner(model, s)
    configs = {
        "inductor": transformers.CompileConfig(),
        "yirage": transformers.CompileConfig(backend=yirage, mode=None),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        torch._dynamo.reset()
        for attr in ("_compiled_call", "_last_compile_config"):
            if hasattr(model, attr):
                delattr(model, attr)
        cc = configs[name]
        runner.generate(args.new, cc)  # compile + warm up
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
        print(f"{name}: {plain:.3f} ms/token unprofiled", flush=True)


if __name__ == "__main__":
    main()
