"""Decode GEMV micro-benchmark: yirage's Triton GEMV vs cuBLAS (torch.mm) on Llama shapes.

y[M, N] = x[M, K] @ W^T for an nn.Linear weight W [N, K] (bf16, fp32 accumulation), M = 1
(batch-1 decode) and 2. Each timed call reads a different weight: the weights of one shape
are rotated through a set larger than L2 (as in a model, where every weight is read once
per token), and the calls are captured in one CUDA graph and replayed (no launch overhead
in the numbers; the same harness the kernel-config search uses, lowering/cuda_ops.py).

Reported per shape: cuBLAS time, the best Triton config of a sweep and of the short
candidate list the compiler measures, GB/s (weight + activation bytes per call / time), %
of the GPU's spec HBM bandwidth and of a measured read bandwidth (torch.sum over 2 GiB),
and speed-up vs cuBLAS. `gated` rows: act(x @ Wg^T) * (x @ Wu^T) in one kernel vs two
cuBLAS GEMVs plus the activation kernel. `q+k+v gemv3` rows: a layer's three projections
in one launch vs three cuBLAS calls.

    python benchmarks/bench_gemv.py --json gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from typing import Any

import torch

# (name, N, K); q/k/v are separate GEMVs in HF Llama (no horizontal fusion by default).
SHAPES = {
    "7b": [
        ("q/k/v/o", 4096, 4096),
        ("gate/up", 11008, 4096),
        ("down", 4096, 11008),
        ("lm_head", 32000, 4096),
    ],
    "1b": [
        ("q/o", 2048, 2048),
        ("k/v", 512, 2048),
        ("gate/up", 8192, 2048),
        ("down", 2048, 8192),
        ("lm_head", 128256, 2048),
    ],
}
# q/k/v of one layer as one `gemv3` launch: (Nq, Nk, Nv, K).
GROUPS = {"7b": (4096, 4096, 4096, 4096), "1b": (2048, 512, 512, 2048)}
# Spec HBM bandwidth, bytes/s, by a substring of the device name.
SPEC_BW = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}
ROTATION_BYTES = 256 << 20


def spec_bw() -> float:
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in SPEC_BW.items() if key in name), float("nan"))


def read_bw() -> float:
    from yirage_dynamo.lowering.cuda_timing import time_in_graph

    x = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    ms = time_in_graph(lambda: x.sum(dtype=torch.float32), reps=5)
    return (1 << 31) / (ms / 1e3)


def sweep_configs() -> list[dict[str, int]]:
    out = []
    for bn, bk, nw in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8)):
        per_thread = bn * bk / (32 * nw)
        if 8 <= per_thread <= 64:
            out.append({"block_n": bn, "block_k": bk, "num_warps": nw})
    return out


def weights_for(n: int, k: int, dtype, count: int | None = None) -> list[torch.Tensor]:
    nbytes = n * k * torch.finfo(dtype).bits // 8
    count = count or max(2, min(64, math.ceil(ROTATION_BYTES / nbytes)))
    return [(torch.randn(n, k, device="cuda") / math.sqrt(k)).to(dtype) for _ in range(count)]


def bench_shape(m: int, n: int, k: int, dtype, configs, gated: bool) -> dict[str, Any]:
    from yirage_dynamo.lowering import triton_kernels as tk
    from yirage_dynamo.lowering.cuda_gemv import _gemv_candidates
    from yirage_dynamo.lowering.cuda_timing import time_rotating

    ws = weights_for(n, k, dtype)
    x = (torch.randn(m, k, device="cuda")).to(dtype)
    if gated:
        pairs = list(zip(ws[::2], ws[1::2]))
        calls = len(pairs)

        def base():
            return [lambda p=p: tk.gated_act(x @ p[0].t(), x @ p[1].t(), 0, 1024, 4) for p in pairs]

        def ours(c):
            return [
                lambda p=p: tk.gemv_gated(
                    x, p[0].t(), p[1].t(), 0, c["block_n"], c["block_k"], c["num_warps"]
                )
                for p in pairs
            ]

        nbytes = 2 * (n * k + m * k + m * n) * x.element_size()
        # Correctness on one pair.
        ref = tk.gated_act(x @ pairs[0][0].t(), x @ pairs[0][1].t(), 0, 1024, 4)
        got = ours(configs[0])[0]()
    else:
        calls = len(ws)

        def base():
            return [lambda w=w: x @ w.t() for w in ws]

        def ours(c):
            return [
                lambda w=w: tk.gemv(x, w.t(), None, c["block_n"], c["block_k"], c["num_warps"])
                for w in ws
            ]

        nbytes = (n * k + m * k + m * n) * x.element_size()
        ref = x @ ws[0].t()
        got = ours(configs[0])[0]()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    cublas_ms = time_rotating(base())
    results = []
    for c in configs:
        try:
            results.append((time_rotating(ours(c)), c))
        except Exception as exc:  # noqa: BLE001 - a config the GPU cannot run
            print(f"  config {c} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    results.sort(key=lambda r: r[0])
    cand_keys = [{kk: v for kk, v in c.items() if kk != "impl"} for c in _gemv_candidates(n, k)]
    cand = [r for r in results if r[1] in cand_keys]
    return {
        "calls_rotated": calls,
        "bytes": nbytes,
        "cublas_ms": cublas_ms,
        "best_ms": results[0][0],
        "best_cfg": results[0][1],
        "cand_ms": cand[0][0] if cand else float("nan"),
        "cand_cfg": cand[0][1] if cand else None,
        "top5": [(round(t * 1e3, 2), c) for t, c in results[:5]],
    }


def bench_group(m: int, ns: tuple[int, ...], k: int, dtype) -> dict[str, Any]:
    """q/k/v in one launch (gemv3) vs three cuBLAS calls, the compiler's candidates."""
    from yirage_dynamo.lowering import triton_kernels as tk
    from yirage_dynamo.lowering.cuda_gemv import _gemv_candidates
    from yirage_dynamo.lowering.cuda_timing import time_rotating

    per = sum(ns) * k * torch.finfo(dtype).bits // 8
    count = max(2, min(64, math.ceil(ROTATION_BYTES / per)))
    triples = [
        tuple((torch.randn(n, k, device="cuda") / math.sqrt(k)).to(dtype) for n in ns)
        for _ in range(count)
    ]
    x = torch.randn(m, k, device="cuda").to(dtype)
    got = tk.gemv3(x, *(w.t() for w in triples[0]), 4, 512, 4)
    for g, w in zip(got, triples[0]):
        torch.testing.assert_close(g, x @ w.t(), atol=2e-2, rtol=2e-2)
    cublas_ms = time_rotating([lambda t=t: [x @ w.t() for w in t] for t in triples])
    results = []
    for c in _gemv_candidates(max(ns), k):
        cfg = (c["block_n"], c["block_k"], c["num_warps"])
        fns = [lambda t=t, cfg=cfg: tk.gemv3(x, *(w.t() for w in t), *cfg) for t in triples]
        results.append((time_rotating(fns), {kk: v for kk, v in c.items() if kk != "impl"}))
    results.sort(key=lambda r: r[0])
    return {
        "bytes": (sum(ns) * k + m * k + m * sum(ns)) * x.element_size(),
        "cublas_ms": cublas_ms,
        "best_ms": results[0][0],
        "best_cfg": results[0][1],
        "cand_ms": results[0][0],
        "cand_cfg": results[0][1],
        "top5": [(round(t * 1e3, 2), c) for t, c in results[:5]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="7b,1b")
    p.add_argument("--m", default="1,2")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="only the compiler's candidate configs")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from yirage_dynamo.lowering.cuda_gemv import _gemv_candidates

    dtype = torch.bfloat16
    peak = spec_bw()
    rbw = read_bw()
    env = (
        f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
        f"{triton.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; spec HBM "
        f"{peak / 1e12:.2f} TB/s, measured read (torch.sum, 2 GiB) {rbw / 1e12:.2f} TB/s"
    )
    print(env, flush=True)
    rows = []
    for model in args.models.split(","):
        for m in (int(v) for v in args.m.split(",")):
            for name, n, k in SHAPES[model]:
                for gated in (False, True) if name == "gate/up" else (False,):
                    if gated and m != 1:
                        continue
                    if args.quick or gated:  # gated: the compiler's candidates only
                        configs = [
                            {kk: v for kk, v in c.items() if kk != "impl"}
                            for c in _gemv_candidates(n, k)
                        ]
                    else:
                        configs = sweep_configs()
                    t0 = time.perf_counter()
                    r = bench_shape(m, n, k, dtype, configs, gated)
                    r.update(model=model, name=name + (" gated" if gated else ""), m=m, n=n, k=k)
                    r["wall_s"] = time.perf_counter() - t0
                    rows.append(r)
                    print(row_line(r, peak, rbw), flush=True)
            if m == 1:
                *ns, k = GROUPS[model]
                r = bench_group(m, tuple(ns), k, dtype)
                r.update(model=model, name="q+k+v gemv3", m=m, n="+".join(map(str, ns)), k=k)
                rows.append(r)
                print(row_line(r, peak, rbw), flush=True)
    print("\n" + env)
    print(table(rows, peak, rbw))
    for r in rows:
        print(f"{r['model']} {r['name']} M={r['m']}: top5 (us, cfg) {r['top5']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1, default=str)
    return 0


HEAD = (
    "| model | GEMV | M | N | K | cuBLAS us | cuBLAS GB/s | Triton best us | GB/s | % spec | "
    "% read BW | vs cuBLAS | best config | candidates' best us | vs cuBLAS |"
)


def row_line(r: dict[str, Any], peak: float, rbw: float) -> str:
    gbs = lambda ms: r["bytes"] / (ms / 1e3) / 1e9  # noqa: E731
    c = r["best_cfg"]
    return (
        f"| {r['model']} | {r['name']} | {r['m']} | {r['n']} | {r['k']} | "
        f"{r['cublas_ms'] * 1e3:.2f} | {gbs(r['cublas_ms']):.0f} | {r['best_ms'] * 1e3:.2f} | "
        f"{gbs(r['best_ms']):.0f} | {100 * gbs(r['best_ms']) * 1e9 / peak:.0f}% | "
        f"{100 * gbs(r['best_ms']) * 1e9 / rbw:.0f}% | {r['cublas_ms'] / r['best_ms']:.2f}x | "
        f"{c['block_n']}x{c['block_k']}/w{c['num_warps']} | {r['cand_ms'] * 1e3:.2f} | "
        f"{r['cublas_ms'] / r['cand_ms']:.2f}x |"
    )


def table(rows: list[dict[str, Any]], peak: float, rbw: float) -> str:
    lines = [HEAD, "|" + "---|" * 15]
    lines += [row_line(r, peak, rbw) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
