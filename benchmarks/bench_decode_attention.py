"""Decode attention's GPU time per call, split + merge kernel against the split programs
merging themselves (`merge_sem`), for Llama 7B/1B decode shapes.

    python benchmarks/bench_decode_attention.py

Each config is timed inside a CUDA graph (`time_in_graph`: the way a decode step replays
it, launch gaps included), the cache filled to 3/4 as the config search does.
"""

from __future__ import annotations

import torch


def main() -> None:
    from yirage_dynamo.lowering import triton_kernels as k
    from yirage_dynamo.lowering.cuda_ops import _split_candidates
    from yirage_dynamo.lowering.cuda_timing import time_in_graph

    shapes = {"7b": (32, 32, 128, 384), "1b": (32, 8, 64, 192), "1b-long": (32, 8, 64, 4096)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape | split | block_n | warps | merge kernel, µs | last program merges, µs |")
    print("|---|---|---|---|---|---|")
    for name, (hq, hkv, d, t) in shapes.items():
        q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        pos = torch.tensor([3 * t // 4 - 1], device="cuda")
        sem = torch.zeros(hkv, dtype=torch.int32, device="cuda")
        for c in _split_candidates(t):
            args = (q, kc, vc, None, pos, d**-0.5, c["split"], c["block_n"], c["num_warps"])
            plain = time_in_graph(lambda a=args: k.decode_attention(*a), reps=50) * 1e3
            merged = time_in_graph(lambda a=args, s=sem: k.decode_attention(*a, s), reps=50) * 1e3
            print(f"| {name} | {c['split']} | {c['block_n']} | {c['num_warps']} | {plain:.2f} | {merged:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
