"""Decode GEMV prologue/epilogue fusion micro-benchmark (lowering/cuda_gemv_fusion.py).

For the Llama-7B and 1B decode projections, times each Triton GEMV with and without its
fusion, over a sweep of (block_n, block_k, num_warps) configs: q/k/v `gemv3` and gate/up
`gemv_gated` and lm_head with the RMSNorm prologue (`norm_weight`), o and down `gemv` with
the skip-add epilogue (`residual`). Same harness as benchmarks/bench_gemv.py: weights
rotated past L2, calls replayed from one CUDA graph. The unfused graph also runs a norm
kernel (Inductor's, ~2 µs each, see RESULTS.md) which is not in these numbers.

    python benchmarks/bench_gemv_fusion.py [--models 7b,1b]
"""

from __future__ import annotations

import argparse
import sys

import torch

CASES = {
    "7b": [
        ("qkv", "gemv3", (4096, 4096, 4096), 4096),
        ("gate/up", "gated", (11008,), 4096),
        ("o", "res", (4096,), 4096),
        ("down", "res", (4096,), 11008),
        ("lm_head", "norm", (32000,), 4096),
    ],
    "1b": [
        ("qkv", "gemv3", (2048, 512, 512), 2048),
        ("gate/up", "gated", (8192,), 2048),
        ("o", "res", (2048,), 2048),
        ("down", "res", (2048,), 8192),
        ("lm_head", "norm", (128256,), 2048),
    ],
}


def _call(tk, kind, x, g, c, fused, nw, r):
    cfg = (c["block_n"], c["block_k"], c["num_warps"])
    extra = {}
    if fused and kind == "res":
        extra = {"residual": r}
    elif fused:
        extra = {"norm_weight": nw, "eps": 1e-6}
    if kind == "gemv3":
        return tk.gemv3(x, *(w.t() for w in g), *cfg, **extra)
    if kind == "gated":
        return tk.gemv_gated(x, g[0].t(), g[1].t(), 0, *cfg, **extra)
    return tk.gemv(x, g[0].t(), None, *cfg, **extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="7b,1b")
    args = p.parse_args(argv)
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_gemv import spec_bw, sweep_configs, weights_for
    from yirage_dynamo.lowering import triton_kernels as tk
    from yirage_dynamo.lowering.cuda_timing import time_rotating

    dt = torch.bfloat16
    peak = spec_bw()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | GEMV | fusion | plain best µs (cfg) | fused best µs (cfg) | fused/plain |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for name, kind, ns, k in CASES[model]:
            n = ns[0]
            per = 3 if kind == "gemv3" else 2 if kind == "gated" else 1
            ws = weights_for(n, k, dt, None)
            groups = [tuple(ws[i : i + per]) for i in range(0, len(ws) - per + 1, per)]
            if kind == "gemv3" and ns[1] != n:
                small = weights_for(ns[1], k, dt, 2 * len(groups))
                groups = [(g[0], small[2 * i], small[2 * i + 1]) for i, g in enumerate(groups)]
            x = torch.randn(1, k, device="cuda").to(dt)
            nw = (torch.rand(k, device="cuda") + 0.5).to(dt)
            r = torch.randn(1, n, device="cuda").to(dt)

            best = {}
            for fused in (False, True):
                res = []
                for c in sweep_configs():
                    try:
                        a = (tk, kind, x)
                        fns = [
                            lambda g=g, c=c, f=fused, a=a, e=(nw, r): _call(*a, g, c, f, *e)
                            for g in groups
                        ]
                        res.append((time_rotating(fns), c))
                    except Exception as exc:  # noqa: BLE001 - a config the GPU cannot run
                        print(f"  {c} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                res.sort(key=lambda t: t[0])
                best[fused] = res[0]
            fusion = "skip add" if kind == "res" else "RMSNorm"
            (tp, cp), (tf, cf) = best[False], best[True]
            fmt = "{block_n}x{block_k}/w{num_warps}"
            nbytes = sum(w.numel() for w in groups[0]) * 2
            print(
                f"| {model} | {name} | {fusion} | {tp * 1e3:.1f} ({fmt.format(**cp)}) | "
                f"{tf * 1e3:.1f} ({fmt.format(**cf)}) | {tf / tp:.3f} |"
                f" {nbytes / (tf / 1e3) / peak * 100:.0f}% spec"
            )
            del ws, groups
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
