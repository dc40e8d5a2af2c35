"""Decode step with L2 prefetch of the next GEMV's weights (experiment, CUDA only).

Between a decode layer's GEMVs run small kernels (norms, rotary, the KV write, attention)
that leave HBM almost idle: ~0.5 ms of a 7B step on an H200. If the next GEMV's weights
are brought into L2 meanwhile (PTX `prefetch.global.L2` per 128-byte line, or Hopper's
`cp.async.bulk.prefetch.L2` per row slice), that GEMV reads part of them from L2.

This script builds a 7B-shaped stack of layers from yirage's own GEMV kernels and a few
torch ops standing in for the small kernels, captures one step in a CUDA graph, and times
replays with and without a prefetch kernel launched right after each GEMV (for the next
GEMV's weight): which variant, which fraction of the weight, per-row prefix or suffix.

    python benchmarks/bench_l2_prefetch.py --layers 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from yirage_dynamo.lowering.triton_gemv import _launch_gemv


@triton.jit
def _prefetch_lines(W, ROWS, ROW_BYTES, COL0, COL_END, LINES: tl.constexpr, BLOCK_R: tl.constexpr):
    """Prefetch bytes [COL0, COL_END) of rows pid*BLOCK_R.. into L2, one
    `prefetch.global.L2::evict_last` per 128-byte line (LINES: a power of two at least
    the line count; lines past the end repeat the last one)."""
    pid = tl.program_id(0)
    r = tl.minimum(pid * BLOCK_R + tl.arange(0, BLOCK_R), ROWS - 1).to(tl.int64)
    c = tl.minimum(COL0 + tl.arange(0, LINES) * 128, COL_END - 128)
    ptrs = W + r[:, None] * ROW_BYTES + c[None, :]
    tl.inline_asm_elementwise(
        "prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _prefetch_bulk(W, ROWS, ROW_BYTES, COL0, NBYTES, BLOCK_R: tl.constexpr):
    """Prefetch bytes [COL0, COL0 + NBYTES) of rows pid*BLOCK_R.. into L2, one
    `cp.async.bulk.prefetch.L2.global` (the TMA unit) per row."""
    pid = tl.program_id(0)
    r = tl.minimum(pid * BLOCK_R + tl.arange(0, BLOCK_R), ROWS - 1).to(tl.int64)
    ptrs = W + r * ROW_BYTES + COL0
    nb = tl.zeros([BLOCK_R], tl.int32) + NBYTES
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r",
        [ptrs, nb],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def prefetch(w: torch.Tensor, frac: float, where: str, kind: str) -> None:
    """Bring `frac` of weight w [N, K] into L2: of every row (its start or its end), or
    the first rows ("head")."""
    n, k = w.shape
    row_bytes = k * w.element_size()
    b = w.view(torch.uint8).view(n, row_bytes)
    if where == "head":
        rows = max(1, int(n * frac))
        col0, nbytes = 0, row_bytes
    else:
        rows = n
        nbytes = max(128, int(row_bytes * frac) // 128 * 128)
        col0 = 0 if where == "prefix" else row_bytes - nbytes
    if kind == "bulk":
        grid = (triton.cdiv(rows, 16),)
        _prefetch_bulk[grid](b, rows, row_bytes, col0, nbytes, BLOCK_R=16, num_warps=1)
        return
    lines = nbytes // 128
    # Up to ~2048 lines per program: several rows of a short slice, or one row.
    block_r = 1 << ((2048 // lines).bit_length() - 1) if lines < 2048 else 1
    _prefetch_lines[(triton.cdiv(rows, block_r),)](
        b,
        rows,
        row_bytes,
        col0,
        col0 + nbytes,
        LINES=triton.next_power_of_2(lines),
        BLOCK_R=block_r,
    )


def build(layers: int, hidden: int, inter: int, heads: int, ctx: int):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16

    def w(n, k):
        return torch.randn(n, k, device=dev, dtype=dt) * 0.02

    ls = []
    for _ in range(layers):
        ls.append(
            dict(
                q=w(hidden, hidden),
                k=w(hidden, hidden),
                v=w(hidden, hidden),
                o=w(hidden, hidden),
                g=w(inter, hidden),
                u=w(inter, hidden),
                d=w(hidden, inter),
                n1=torch.ones(hidden, device=dev, dtype=dt),
                n2=torch.ones(hidden, device=dev, dtype=dt),
                kc=torch.randn(1, heads, ctx, hidden // heads, device=dev, dtype=dt),
                vc=torch.randn(1, heads, ctx, hidden // heads, device=dev, dtype=dt),
            )
        )
    return ls


def norm(h: torch.Tensor, wn: torch.Tensor) -> torch.Tensor:
    f = h.float()
    return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * wn


def step(x: torch.Tensor, ls: list[dict], pf: dict | None, heads: int) -> torch.Tensor:
    h = x
    sites = pf["sites"] if pf else ()
    for i, L in enumerate(ls):
        a = norm(h, L["n1"])
        q, k, v = _launch_gemv(a, L["q"].t(), None, None, 0, 4, 2048, 4, (L["k"].t(), L["v"].t()))
        if "o" in sites:
            prefetch(L["o"], pf["frac"], pf["where"], pf["kind"])
        d = q.shape[-1] // heads
        qh = (q * 1.01 + k * 0.01).view(1, heads, 1, d)
        L["kc"][:, :, -1:, :].copy_(k.view(1, heads, 1, d))
        L["vc"][:, :, -1:, :].copy_(v.view(1, heads, 1, d))
        att = F.scaled_dot_product_attention(qh, L["kc"], L["vc"]).reshape(1, -1)
        o = _launch_gemv(att, L["o"].t(), None, None, 0, 4, 2048, 4)[0]
        if "gu" in sites:
            prefetch(L["g"], pf["frac"], pf["where"], pf["kind"])
            prefetch(L["u"], pf["frac"], pf["where"], pf["kind"])
        h = h + o
        m = norm(h, L["n2"])
        g = _launch_gemv(m, L["g"].t(), L["u"].t(), None, 0, 8, 512, 4)[0]
        if "d" in sites:
            prefetch(L["d"], pf["frac"], pf["where"], pf["kind"])
        dn = _launch_gemv(g, L["d"].t(), None, None, 0, 4, 2048, 4)[0]
        if "qkv" in sites and i + 1 < len(ls):
            nxt = ls[i + 1]
            for key in ("q", "k", "v"):
                prefetch(nxt[key], pf["frac"], pf["where"], pf["kind"])
        h = h + dn
    return h


def time_graph(fn, reps: int = 30) -> float:
    """GPU ms of one call of `fn` captured in a CUDA graph: median of `reps` replays.
    A whole step (~6 ms) per replay, unlike lowering/cuda_timing.time_in_graph, which captures many
    calls of one kernel and keeps the best of three replays."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del g
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    hidden, inter, heads, ctx = 4096, 11008, 32, 384
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    ls = build(args.layers, hidden, inter, heads, ctx)
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)

    # Is a prefetch kernel asynchronous? 16 MB of lines / bulk, alone, back to back.
    big = torch.empty(4096, 4096, device="cuda", dtype=torch.bfloat16)
    flush = torch.empty(256 << 20, device="cuda", dtype=torch.uint8)
    for kind in ("lines", "bulk"):
        try:
            ms = time_graph(lambda kind=kind: prefetch(big, 0.5, "suffix", kind), reps=20)
            ms_flush = time_graph(lambda: flush.add_(1), reps=20)
            both = time_graph(
                lambda kind=kind: (flush.add_(1), prefetch(big, 0.5, "suffix", kind)), reps=20
            )
            print(
                f"prefetch 16 MB ({kind}): alone {ms * 1e3:.1f} us; after a 256 MB "
                f"stream: +{(both - ms_flush) * 1e3:.1f} us",
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001
            print(f"prefetch kind {kind} failed: {type(exc).__name__}: {exc}"[:400], flush=True)

    variants: dict[str, dict | None] = {"none": None}
    for kind in ("lines", "bulk"):
        for frac in (0.25, 0.5, 1.0):
            variants[f"{kind} o suffix {frac}"] = dict(
                sites=("o",), frac=frac, where="suffix", kind=kind
            )
        variants[f"{kind} all suffix 0.5"] = dict(
            sites=("o", "gu", "d", "qkv"), frac=0.5, where="suffix", kind=kind
        )
        variants[f"{kind} o+qkv suffix 0.5"] = dict(
            sites=("o", "qkv"), frac=0.5, where="suffix", kind=kind
        )
        variants[f"{kind} o prefix 0.5"] = dict(sites=("o",), frac=0.5, where="prefix", kind=kind)
        variants[f"{kind} o head 0.5"] = dict(sites=("o",), frac=0.5, where="head", kind=kind)
    results: dict[str, list[float]] = {k: [] for k in variants}
    t0 = time.time()
    for _ in range(args.rounds):
        for name, pf in variants.items():
            try:
                results[name].append(time_graph(lambda pf=pf: step(x, ls, pf, heads)))
            except Exception as exc:  # noqa: BLE001
                print(f"{name}: {type(exc).__name__}: {exc}"[:300], flush=True)
                results[name].append(float("nan"))
    base = statistics.median(results["none"])
    print(f"\n{args.layers} layers, 7B shapes, ctx {ctx}; {time.time() - t0:.0f} s")
    print("| variant | step ms (median) | vs none |\n|---|---|---|")
    for name, ts in results.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {base / med:.3f}x |")


if __name__ == "__main__":
    main()
