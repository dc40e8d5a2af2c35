"""Compile reports: what compilation did to each graph, readable and as JSON."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_graph_ids = itertools.count()
_REPORTS: list[CompileReport] = []


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    matches: int = 0


@dataclasses.dataclass
class KernelRecord:
    name: str
    device: str
    source_path: str | None = None
    origins: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class FallbackRecord:
    stage: str
    reason: str
    to: str


@dataclasses.dataclass
class CompileReport:
    graph_id: int = dataclasses.field(default_factory=lambda: next(_graph_ids))
    kind: str = "inference"  # inference | forward | backward
    # Dynamo's id of the frame compile this graph came from ("frame/recompile"), if any.
    dynamo_compile_id: str | None = None
    mode: str | None = None
    device: str = ""
    device_reason: str = ""
    lowering: str = ""
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    patterns: dict[str, int] = dataclasses.field(default_factory=dict)
    rejected: list[str] = dataclasses.field(default_factory=list)
    kernels: list[KernelRecord] = dataclasses.field(default_factory=list)
    extern_calls: int = 0
    fallbacks: list[FallbackRecord] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    memory: dict[str, Any] | None = None
    nodes_in: int = 0
    nodes_out: int = 0
    cache: dict[str, int] = dataclasses.field(default_factory=lambda: {"hits": 0, "misses": 0})
    # Whole-graph cache (runtime/graph_cache.py): "hit", "stored", or why it was not used.
    graph_cache: str = ""

    @contextmanager
    def stage(self, name: str):
        """Accumulate wall time of a stage (re-entered stages add up).

        Top-level stages do not overlap, so they sum to at most "total". A stage entered
        inside another is recorded as "parent/child" (e.g. "lowering/cpp_build") and is
        left out of that sum, so callers need not know what encloses them.
        """
        # Not a dataclass field: bookkeeping, not part of the report or its JSON.
        stack: list[str] = self.__dict__.setdefault("_open_stages", [])
        if stack and not name.startswith(stack[-1] + "/"):
            name = f"{stack[-1]}/{name}"
        stack.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            stack.pop()
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def count_pattern(self, name: str, n: int = 1) -> None:
        self.patterns[name] = self.patterns.get(name, 0) + n

    def reject(self, pattern: str, why: str) -> None:
        self.rejected.append(f"{pattern}: {why}")

    def fallback(self, stage: str, reason: str, to: str) -> None:
        self.fallbacks.append(FallbackRecord(stage, reason, to))

    @property
    def top_level_stages(self) -> dict[str, float]:
        """Non-overlapping stages: everything but "total" and "parent/child" sub-stages."""
        return {k: v for k, v in self.stages.items() if k != "total" and "/" not in k}

    @property
    def total_seconds(self) -> float:
        return self.stages.get("total", sum(self.top_level_stages.values()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompileReport:
        known = {f.name for f in dataclasses.fields(cls)}
        # Reports written by a newer version may carry fields this one does not know.
        data = {k: v for k, v in data.items() if k in known}
        data["passes"] = [PassRecord(**p) for p in data.get("passes", [])]
        data["kernels"] = [KernelRecord(**k) for k in data.get("kernels", [])]
        data["fallbacks"] = [FallbackRecord(**f) for f in data.get("fallbacks", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> CompileReport:
        return cls.from_dict(json.loads(text))

    def write(self, directory: str | Path) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        out = path / f"graph_{self.graph_id}_{self.kind}.json"
        out.write_text(self.to_json(indent=2))
        return out

    def __str__(self) -> str:
        lines = [
            f"yirage graph {self.graph_id} ({self.kind}, mode={self.mode}"
            + (f", dynamo frame {self.dynamo_compile_id}" if self.dynamo_compile_id else "")
            + "): "
            f"device={self.device} lowering={self.lowering} — {self.device_reason}",
            f"  nodes {self.nodes_in} -> {self.nodes_out}; kernels {len(self.kernels)}, "
            f"extern calls {self.extern_calls}; total {self.total_seconds * 1e3:.1f} ms",
        ]
        if self.stages:
            lines.append("  stage                          ms")
            for name, sec in self.stages.items():
                lines.append(f"  {name:<28}{sec * 1e3:>8.1f}")
        if self.passes:
            lines.append("  pass                           ms   nodes   matches")
            for p in self.passes:
                lines.append(
                    f"  {p.name:<28}{p.seconds * 1e3:>6.1f}  {p.nodes_before:>4}->{p.nodes_after:<4}"
                    f"  {p.matches}"
                )
        for k in self.kernels[:20]:
            origins = ", ".join(k.origins[:4]) + (" ..." if len(k.origins) > 4 else "")
            lines.append(f"  kernel {k.name} [{k.device}] {k.source_path or ''} <- {origins}")
        if len(self.kernels) > 20:
            lines.append(f"  ... {len(self.kernels) - 20} more kernels")
        if self.graph_cache:
            lines.append(f"  graph cache: {self.graph_cache}")
        if any(self.cache.values()):
            lines.append("  cache: " + ", ".join(f"{k}={v}" for k, v in self.cache.items()))
        if self.patterns:
            lines.append("  patterns: " + ", ".join(f"{k}={v}" for k, v in self.patterns.items()))
        for r in self.rejected[:20]:
            lines.append(f"  rejected {r}")
        if self.memory:
            lines.append(
                "  memory: "
                + ", ".join(f"{k}={v}" for k, v in self.memory.items() if k != "layout")
            )
        for f in self.fallbacks:
            lines.append(f"  FALLBACK at {f.stage} -> {f.to}: {f.reason}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


def format_reports(reports: list[CompileReport]) -> str:
    """Reports as text; a regionally compiled graph's re-armed pieces (one per repeated
    decoder layer, all running the same program) as one line instead of one report each."""
    rearmed = [r for r in reports if r.graph_cache.startswith("re-armed")]
    parts = [str(r) for r in reports if not r.graph_cache.startswith("re-armed")]
    if rearmed:
        ids = ", ".join(str(r.graph_id) for r in rearmed)
        n = len(rearmed)
        parts.append(f"yirage graphs {ids}: {rearmed[0].graph_cache} ({n} piece{'s' * (n > 1)})")
    return "\n".join(parts)


def record(report: CompileReport) -> None:
    _REPORTS.append(report)


def last_report() -> CompileReport | None:
    """The report of the most recently compiled graph, or None."""
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[CompileReport]:
    """Reports of every graph compiled in this process, oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    _REPORTS.clear()
