"""Compile-time and run-time profiling helpers.

* `dynamo_trace_info()` reads torch's own compile-time accounting (`dynamo_timed`
  metrics) for the frame Dynamo is compiling right now, so a report can say how long
  Dynamo's bytecode tracing took before our backend was called.
* `explain(model, *args)` summarises graph breaks of a whole model via
  `torch._dynamo.explain`.
* `kernel_time_table(prof)` turns a `torch.profiler` trace of compiled code into a
  per-kernel table, using the `record_function` ranges the generated wrapper opens
  (only while the profiler runs, see runtime/wrapper.py).
* `cuda_graph_stats()` says what each live CUDA-graph runner did at run time: calls,
  captures, why graphs went off, and for run-ahead its rules, steps handed out or
  dropped, and its trial's timings.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

# Name prefix of the range around one whole generated-wrapper call (runtime/wrapper.py);
# the per-kernel / per-extern ranges are its direct children.
WRAPPER_RANGE_PREFIX = "[yirage] "
STEP_RANGE = "yirage_step"


def dynamo_trace_info() -> tuple[str | None, float | None]:
    """(Dynamo compile id, seconds of bytecode tracing) for the frame being compiled.

    Called from the backend, i.e. inside Dynamo's compile of a frame: its
    "bytecode_tracing" `dynamo_timed` region has just closed (Dynamo closes it right
    before calling the backend), so the last recorded value belongs to this frame.
    Outside a Dynamo compile (backend called directly) both are None. Falls back to the
    time since the frame's compile started when the metric is missing (older/newer torch).
    """
    try:
        from torch._dynamo import utils as dynamo_utils
    except Exception:  # noqa: BLE001 - no Dynamo, no trace time
        return None, None
    compile_id = torch._guards.CompileContext.current_compile_id()
    if compile_id is None:
        return None, None
    get_ctx = getattr(dynamo_utils, "get_metrics_context", None)
    ctx = get_ctx() if get_ctx else None
    start_ns = getattr(ctx, "_start_time_ns", 0) if ctx is not None else 0
    since_start = (
        (time.time_ns() - start_ns) / 1e9 if ctx and ctx.in_progress() and start_ns else None
    )
    metrics = getattr(dynamo_utils, "compilation_time_metrics", {})
    values = metrics.get("bytecode_tracing") or []
    # A value longer than this frame's whole compile so far is a previous frame's.
    if values and (since_start is None or values[-1] <= since_start):
        return str(compile_id), float(values[-1])
    return str(compile_id), since_start


@dataclasses.dataclass
class GraphBreak:
    reason: str
    where: list[str]


@dataclasses.dataclass
class GraphBreakSummary:
    """Graph breaks of a whole model, from `torch._dynamo.explain`."""

    graph_count: int
    graph_break_count: int
    op_count: int
    ops_per_graph: list[int]
    breaks: list[GraphBreak]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"graphs {self.graph_count}, graph breaks {self.graph_break_count}, "
            f"ops {self.op_count} (per graph: {self.ops_per_graph})"
        ]
        for i, b in enumerate(self.breaks, 1):
            # Dynamo's reasons run to several lines (explanation, hints, links): the first says it.
            lines.append(f"  break {i}: {b.reason.strip().splitlines()[0] if b.reason else '?'}")
            lines.extend(f"    at {w}" for w in b.where[-3:])
        return "\n".join(lines)


def explain(model: Callable, *args: Any, **kwargs: Any) -> GraphBreakSummary:
    """Run `model(*args, **kwargs)` under `torch._dynamo.explain` and summarise breaks.

    Like `torch._dynamo.explain`, this resets Dynamo's caches before and after, so
    compiled functions recompile on their next call.
    """
    out = torch._dynamo.explain(model)(*args, **kwargs)
    breaks = []
    for r in out.break_reasons:
        stack = [
            f"{f.filename}:{f.lineno} in {f.name}" for f in (getattr(r, "user_stack", None) or [])
        ]
        breaks.append(GraphBreak(reason=str(r.reason), where=stack))
    return GraphBreakSummary(
        graph_count=out.graph_count,
        graph_break_count=out.graph_break_count,
        op_count=out.op_count,
        ops_per_graph=[len(ops) for ops in (out.ops_per_graph or [])],
        breaks=breaks,
    )


def cuda_graph_stats() -> list[dict[str, Any]]:
    """One dict per live CUDA-graph runner (runtime/cuda_graphs.py), oldest first."""
    from yirage_dynamo.runtime.cuda_graphs import live_runners

    rows = []
    for r in live_runners():
        row = {"runner": type(r).__name__, "calls": r.calls, "captures": r.captures}
        row["graphs_off"] = r.disabled
        # A staged step's cache commit (lowering/cuda_kv_stage.py): its own graph.
        row["staged_kv_commit"] = r.commit is not None
        if hasattr(r, "hits"):  # run-ahead (runtime/run_ahead.py)
            row.update(rules=r.rules, learn_failed=r.learn_failed, handed_out=r.hits)
            row.update(
                dropped=r.misses,
                run_ahead_kept=r.choice,
                trial_ms=dict(r.trial_ms),
                trials=r.trial_count,
            )
            row["launch_error"] = r.launch_error  # why run-ahead went off, if it did
        rows.append(row)
    return rows


@dataclasses.dataclass
class KernelTime:
    name: str
    count: int
    total_us: float
    percent: float

    @property
    def mean_us(self) -> float:
        return self.total_us / self.count if self.count else 0.0


def _event_time_us(evt: Any, use_device: bool) -> float:
    if use_device:
        return float(evt.device_time_total)
    return float(evt.cpu_time_total)


def kernel_time_table(
    events: Iterable[Any], use_device: bool = False
) -> tuple[list[KernelTime], float]:
    """Per-kernel rows (sorted by total time) and the step time in µs.

    `events` is `prof.events()` of a torch.profiler run. Rows are the direct children of
    the generated wrappers' ranges ("[yirage] wrapper_*"), grouped by name. The step is the
    sum of "yirage_step" ranges when the caller opened them, else the wrapper ranges; the
    time of steps spent outside compiled graphs (Python, eager regions) is one extra row.
    With `use_device`, times are device (kernel) times instead of CPU times.
    """
    events = list(events)
    totals: dict[str, list[float]] = {}
    wrapper_us = 0.0
    step_us = 0.0
    for evt in events:
        if getattr(evt, "device_type", None) not in (None, torch.autograd.DeviceType.CPU):
            continue
        name = evt.name
        if name == STEP_RANGE:
            step_us += _event_time_us(evt, use_device)
        elif name.startswith(WRAPPER_RANGE_PREFIX):
            wrapper_us += _event_time_us(evt, use_device)
        parent = getattr(evt, "cpu_parent", None)
        if parent is not None and parent.name.startswith(WRAPPER_RANGE_PREFIX):
            row = totals.setdefault(name, [0, 0.0])
            row[0] += 1
            row[1] += _event_time_us(evt, use_device)
    if step_us <= 0.0:
        step_us = wrapper_us
    rows = [
        KernelTime(name, int(c), t, 100.0 * t / step_us if step_us else 0.0)
        for name, (c, t) in totals.items()
    ]
    rows.sort(key=lambda r: -r.total_us)
    outside = step_us - wrapper_us
    if step_us and outside > 0.0 and wrapper_us > 0.0:
        rows.append(KernelTime("(outside compiled graphs)", 0, outside, 100.0 * outside / step_us))
    return rows, step_us


def device_kernel_table(events: Iterable[Any]) -> tuple[list[KernelTime], float]:
    """Per-kernel rows from the device's own kernel events (e.g. CUDA), for code whose
    calls are not in a generated wrapper (a lowering that hands the graph to Inductor,
    CUDA-graph replays). The step is the sum of "yirage_step" ranges' wall time."""
    totals: dict[str, list[float]] = {}
    step_us = 0.0
    for evt in events:
        device_type = getattr(evt, "device_type", None)
        if evt.name == STEP_RANGE and device_type == torch.autograd.DeviceType.CPU:
            step_us += float(evt.cpu_time_total)
        elif device_type not in (None, torch.autograd.DeviceType.CPU):
            if getattr(evt, "is_user_annotation", False):
                continue  # the device-side copy of a record_function range, not a kernel
            row = totals.setdefault(evt.name, [0, 0.0])
            row[0] += 1
            row[1] += float(evt.device_time_total)
    busy = sum(t for _, t in totals.values())
    step_us = step_us or busy
    rows = [
        KernelTime(name, int(c), t, 100.0 * t / step_us if step_us else 0.0)
        for name, (c, t) in totals.items()
    ]
    rows.sort(key=lambda r: -r.total_us)
    return rows, step_us


def format_kernel_table(rows: list[KernelTime], step_us: float, limit: int = 40) -> str:
    # Device kernel names (templates) are long: as wide as needed, within reason.
    width = min(72, max([len("kernel / extern call")] + [len(r.name) for r in rows[:limit]]) + 1)
    lines = [
        f"{'kernel / extern call':<{width}}{'count':>7}{'total ms':>11}{'mean us':>10}{'% step':>8}"
    ]
    for r in rows[:limit]:
        count = str(r.count) if r.count else "-"
        mean = f"{r.mean_us:10.1f}" if r.count else f"{'-':>10}"
        lines.append(
            f"{r.name[: width - 1]:<{width}}{count:>7}{r.total_us / 1e3:>11.3f}{mean}{r.percent:>7.1f}%"
        )
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more")
    lines.append(f"{'step total':<{width}}{'':>7}{step_us / 1e3:>11.3f}")
    return "\n".join(lines)


__all__ = [
    "GraphBreak",
    "GraphBreakSummary",
    "KernelTime",
    "device_kernel_table",
    "dynamo_trace_info",
    "explain",
    "format_kernel_table",
    "kernel_time_table",
]
