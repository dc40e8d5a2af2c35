"""Memory-plan data and layout arithmetic (the analysis lives in memory_plan.py).

A plan is slots (buffers that share memory: one, or a chain of in-place reuses) with
symbolic byte sizes, live ranges over graph positions, and an order: for every two slots
live at the same time, which one lies below. `MemoryPlan.evaluate(sig)` turns that into
byte offsets for one concrete shape (longest path through the order, so never an
overlap), cached per shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
from torch.utils._sympy.printers import PythonPrinter

# Shapes whose layouts stay cached per plan (dynamic decode lengths would grow it forever).
MAX_CACHED_SHAPES = 64


def hint_value(expr: sympy.Expr, hints: dict[sympy.Symbol, int]) -> int | None:
    if not expr.free_symbols <= hints.keys():
        return None
    return int(expr.xreplace({k: sympy.Integer(v) for k, v in hints.items()}))


@dataclasses.dataclass(frozen=True)
class PlannedBuffer:
    name: str  # FX node name: the tag in layouts
    slot: int
    dtype: torch.dtype
    shape: tuple[sympy.Expr, ...]
    stride: tuple[sympy.Expr, ...]
    nbytes: sympy.Expr
    start: int
    inplace_of: str | None = None
    # Keyword the result goes to: "out" for most ops (silu_backward's is "grad_input").
    out_arg: str = "out"


@dataclasses.dataclass
class Slot:
    index: int
    device: str
    nbytes: sympy.Expr  # aligned in evaluation, raw here
    start: int
    end: int
    members: list[str]
    below: tuple[int, ...] = ()  # slots live at the same time that lie lower in the arena
    hint_offset: int = 0


@dataclasses.dataclass
class Layout:
    """A plan evaluated at one concrete shape."""

    sig: tuple[int, ...]
    offsets: list[int]  # per slot
    sizes: list[int]  # per slot, aligned
    arena_bytes: dict[str, int]  # per device
    shapes: list[tuple[int, ...]]  # per buffer
    strides: list[tuple[int, ...]]


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


class MemoryPlan:
    """Liveness, slots and their order; `evaluate(sig)` gives offsets for one shape."""

    def __init__(
        self,
        buffers: list[PlannedBuffer],
        slots: list[Slot],
        symbols: list[sympy.Symbol],
        bindings: list[tuple[int, int | None]],
        alignment: int,
        hint_sig: tuple[int, ...],
        fingerprint: tuple,
        node_names: list[str],
    ) -> None:
        self.buffers = buffers
        self.slots = slots
        self.symbols = symbols
        # Per symbol: (placeholder index, dim) or (placeholder index, None) for SymInt inputs.
        self.bindings = bindings
        self.alignment = alignment
        self.hint_sig = hint_sig
        self.fingerprint = fingerprint
        self.node_names = node_names  # graph order, to print live ranges
        self.index = {b.name: i for i, b in enumerate(buffers)}
        self._topo = sorted(range(len(slots)), key=lambda k: (slots[k].hint_offset, k))
        self._sizes_fn = _compile_sizes(buffers, slots, symbols)
        self._cache: dict[tuple[int, ...], Layout] = {}

    def __getstate__(self) -> dict:
        # The generated size function is rebuilt on load (runtime/graph_cache.py pickles plans).
        state = dict(self.__dict__)
        state.pop("_sizes_fn")
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sizes_fn = _compile_sizes(self.buffers, self.slots, self.symbols)

    def evaluate(self, sig: Sequence[int]) -> Layout:
        sig = tuple(sig)
        hit = self._cache.get(sig)
        if hit is not None:
            return hit
        slot_bytes, shapes, strides = self._sizes_fn(*sig)
        sizes = [_align(max(int(n), 0), self.alignment) for n in slot_bytes]
        offsets = [0] * len(self.slots)
        for k in self._topo:
            offsets[k] = max((offsets[p] + sizes[p] for p in self.slots[k].below), default=0)
        arena: dict[str, int] = {}
        for s in self.slots:
            arena[s.device] = max(arena.get(s.device, 0), offsets[s.index] + sizes[s.index])
        layout = Layout(sig, offsets, sizes, arena, list(shapes), list(strides))
        if len(self._cache) >= MAX_CACHED_SHAPES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[sig] = layout
        return layout

    def sig_source(self, placeholder_vars: Sequence[str]) -> str:
        """Python expression of the shape signature from the wrapper's input variables."""
        parts = [
            placeholder_vars[i] if d is None else f"{placeholder_vars[i]}.size({d})"
            for i, d in self.bindings
        ]
        return "(" + "".join(p + ", " for p in parts) + ")"

    def live_bytes(self, layout: Layout) -> tuple[int, int]:
        """(peak live bytes, time step of the peak) under a layout."""
        steps = max((s.end for s in self.slots), default=0) + 1
        delta = [0] * (steps + 1)
        for s in self.slots:
            delta[s.start] += layout.sizes[s.index]
            delta[s.end + 1] -= layout.sizes[s.index]
        best, at, run = 0, 0, 0
        for t in range(steps):
            run += delta[t]
            if run > best:
                best, at = run, t
        return best, at

    def layout_rows(
        self, layout: Layout, at: int, device: str | None = None
    ) -> list[tuple[int, int, str, str]]:
        """(offset, size, tag, live range) of the slots live at time step `at`."""
        rows = []
        for s in self.slots:
            if device is not None and s.device != device:
                continue
            if s.start <= at <= s.end and layout.sizes[s.index]:
                live = f"{self.node_names[s.start]}..{self.node_names[s.end]}"
                rows.append(
                    (layout.offsets[s.index], layout.sizes[s.index], "+".join(s.members), live)
                )
        return sorted(rows)

    def summary(self, sig: Sequence[int] | None = None) -> dict[str, Any]:
        """Numbers for report.memory, evaluated at `sig` (default: the example shape)."""
        from yirage_dynamo.runtime.arena import format_layout

        layout = self.evaluate(self.hint_sig if sig is None else sig)
        peak, at = self.live_bytes(layout)
        naive = sum(
            _align(_eval_int(b.nbytes, self, layout.sig), self.alignment) for b in self.buffers
        )
        naive_expr = sum((b.nbytes for b in self.buffers), sympy.Integer(0))
        return {
            "buffers": len(self.buffers),
            "slots": len(self.slots),
            "inplace_reuses": sum(1 for b in self.buffers if b.inplace_of),
            "shape": dict(zip((str(s) for s in self.symbols), layout.sig)),
            "naive_bytes": naive,
            "planned_peak_bytes": peak,
            "arena_bytes": sum(layout.arena_bytes.values()),
            "naive_bytes_expr": _short(naive_expr),
            "alignment": self.alignment,
            "layout": format_layout(
                self.layout_rows(layout, at), sum(layout.arena_bytes.values()), base=0
            ),
        }


def _eval_int(expr: sympy.Expr, plan: MemoryPlan, sig: tuple[int, ...]) -> int:
    return int(expr.xreplace(dict(zip(plan.symbols, map(sympy.Integer, sig)))))


def _short(expr: sympy.Expr) -> str:
    text = str(expr)
    return text if len(text) <= 200 else text[:197] + "..."


def _compile_sizes(
    buffers: list[PlannedBuffer], slots: list[Slot], symbols: list[sympy.Symbol]
) -> Callable:
    """Generated straight-line Python: symbol values -> slot bytes, shapes, strides."""
    pr = PythonPrinter()
    args = ", ".join(str(s) for s in symbols)
    body = [
        "slot_bytes = (" + "".join(f"{pr.doprint(s.nbytes)}, " for s in slots) + ")",
        "shapes = ("
        + "".join("(" + "".join(f"{pr.doprint(e)}, " for e in b.shape) + "), " for b in buffers)
        + ")",
        "strides = ("
        + "".join("(" + "".join(f"{pr.doprint(e)}, " for e in b.stride) + "), " for b in buffers)
        + ")",
        "return slot_bytes, shapes, strides",
    ]
    src = f"def sizes({args}):\n    " + "\n    ".join(body) + "\n"
    ns: dict[str, Any] = {"math": math}
    exec(compile(src, "<yirage_memory_plan>", "exec"), ns)
    return ns["sizes"]


def best_fit(slots: list[Slot], hints: dict, alignment: int) -> None:
    """Greedy best fit at the hint shape (largest first), then record for every pair of
    slots live at the same time which one lies below: that order is the plan."""
    # A slot empty at the hint shape but not always still gets a place (and an order).
    size = {
        s.index: _align(hint_value(s.nbytes, hints) or 0, alignment)
        or (0 if s.nbytes == 0 else alignment)
        for s in slots
    }
    placed: list[Slot] = []
    for s in sorted(slots, key=lambda s: (-size[s.index], s.start, s.index)):
        if size[s.index] == 0:
            continue
        busy = sorted(
            (p.hint_offset, p.hint_offset + size[p.index])
            for p in placed
            if p.start <= s.end and s.start <= p.end
        )
        best, best_gap, top = None, None, 0
        for lo, hi in busy:
            gap = lo - top
            if gap >= size[s.index] and (best_gap is None or gap < best_gap):
                best, best_gap = top, gap
            top = max(top, hi)
        s.hint_offset = top if best is None else best
        placed.append(s)
    for s in placed:
        s.below = tuple(
            p.index
            for p in placed
            if p is not s
            and p.start <= s.end
            and s.start <= p.end
            and p.hint_offset < s.hint_offset
        )


def describe(plan: MemoryPlan) -> str:
    """Human-readable plan: summary, every buffer with its slot and symbolic size."""
    s = plan.summary()
    lines = [f"{k}: {v}" for k, v in s.items() if k != "layout"]
    lines.append("")
    lines.append("buffer                          slot  bytes (symbolic)              inplace_of")
    for b in plan.buffers:
        lines.append(f"{b.name:<32}{b.slot:>4}  {_short(b.nbytes):<30}{b.inplace_of or ''}")
    lines += ["", "layout at the peak:", s["layout"]]
    return "\n".join(lines)
