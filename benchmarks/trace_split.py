"""Where a decode token goes, from a torch.profiler Chrome trace of HF generate().

    python benchmarks/trace_split.py DIR/yirage_trace.json.gz [--skip 6]

Per decode token (one "Torch-Compiled Region" event per call of the compiled model; the
first `--skip` are left out as warm-up), medians in microseconds of:

  our call            the compiled region: Dynamo's bytecode and the backend's call
  after the call      from its return to the caller's last host sync before the next call
                      (HF: logits copy, argmax, stopping check, then the sync)
  before the call     from that sync's end to the next call (prepare_inputs, guards)
  sync waits          host time blocked in stream/event syncs between two calls
  GPU busy            the union of all streams' kernels and copies, per token

Why it matters: in order, the GPU step runs while HF works "after the call", so where
that is longer than the step the token is all host time and starting steps ahead cannot
shorten it (RESULTS.md, twenty-third session). The profiler slows the host (about 1.5x
on an H100 host), so compare variants within one trace set, not with unprofiled times.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path
from typing import Any

REGION = "Torch-Compiled Region"
SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str | Path) -> list[dict[str, Any]]:
    """The complete ("X") events of a Chrome trace, gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def _busy(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        start = max(start, end)
        if stop > start:
            total += stop - start
        end = max(end, stop)
    return total


def split_per_token(events: list[dict[str, Any]], skip: int = 6) -> dict[str, float]:
    """Medians per decode token (µs) of the parts named in the module docstring."""
    calls = sorted(
        (e for e in events if str(e.get("name", "")).startswith(REGION)), key=lambda e: e["ts"]
    )[skip:]
    if len(calls) < 2:
        raise ValueError(f"{len(calls)} compiled-region events after skipping {skip}: need 2")
    syncs = sorted(
        (e for e in events if e.get("cat") == "cuda_runtime" and e["name"] in SYNCS),
        key=lambda e: e["ts"],
    )
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATS]
    parts: dict[str, list[float]] = {
        k: [] for k in ("period", "our call", "after the call", "before the call", "sync waits")
    }
    busy = []
    for call, nxt in zip(calls, calls[1:]):
        end = call["ts"] + call["dur"]
        between = [s for s in syncs if end <= s["ts"] < nxt["ts"]]
        parts["period"].append(nxt["ts"] - call["ts"])
        parts["our call"].append(call["dur"])
        parts["sync waits"].append(sum(s["dur"] for s in between))
        if between:
            last = between[-1]
            parts["after the call"].append(last["ts"] - end)
            parts["before the call"].append(nxt["ts"] - (last["ts"] + last["dur"]))
        window = [(max(a, call["ts"]), min(b, nxt["ts"])) for a, b in gpu]
        busy.append(_busy([(a, b) for a, b in window if b > a]))
    out = {k: statistics.median(v) for k, v in parts.items() if v}
    out["GPU busy"] = statistics.median(busy)
    out["tokens"] = len(calls) - 1
    return out


def format_split(split: dict[str, float]) -> str:
    order = ("period", "our call", "after the call", "sync waits", "before the call", "GPU busy")
    lines = [f"{split['tokens']} decode tokens, medians (µs, under the profiler):"]
    lines += [f"  {split[k]:8.0f}  {k}" for k in order if k in split]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", nargs="+")
    ap.add_argument("--skip", type=int, default=6, help="warm-up calls left out")
    args = ap.parse_args()
    for path in args.trace:
        print(f"{path}:\n{format_split(split_per_token(load(path), args.skip))}")


if __name__ == "__main__":
    main()
