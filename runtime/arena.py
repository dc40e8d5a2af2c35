"""A tracked memory arena: one allocation per device, sub-buffers as tensor views.

Like RTP-LLM's buffer manager: memory comes from the framework allocator once (the CUDA
caching allocator or the CPU allocator, via torch.empty(uint8)), every planned
intermediate of a compiled graph is a typed view into it at its planned offset, and the
layout (address, size, used/free, tag = FX node name, live range) can be printed.

`PlannedViews` is what the generated wrapper calls: `_bufs = _arena(sig)` returns the
views for one concrete shape signature, built once per shape and cached, so a CUDA graph
captured around the wrapper sees the same addresses on every replay. When a larger shape
needs a larger arena, the old allocation is dropped (cached views for other shapes are
rebuilt) unless `stable=True` or a CUDA stream capture is running: then each allocation
is kept alive, because a captured graph may still point into it.

Like a CUDA graph, a compiled graph's arena serves one call at a time: two threads running
the same compiled graph concurrently would share its intermediates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def format_layout(
    rows: Sequence[tuple[int, int, str, str]], arena_bytes: int, base: int = 0
) -> str:
    """Table of an arena: used rows (offset, size, tag, live range) and the free gaps.

    `base` is the arena's address (0 prints offsets)."""
    lines = [f"{'address':>18}  {'size':>12}  {'state':<5} tag (live range)"]
    top = 0
    for off, size, tag, live in sorted(rows):
        if off > top:
            lines.append(f"{base + top:#18x}  {off - top:>12}  free")
        lines.append(f"{base + off:#18x}  {size:>12}  used  {tag} ({live})")
        top = max(top, off + size)
    if arena_bytes > top:
        lines.append(f"{base + top:#18x}  {arena_bytes - top:>12}  free")
    used = sum(r[1] for r in rows)
    lines.append(f"arena {arena_bytes} B, {used} B used at this point, {len(rows)} buffers")
    return "\n".join(lines)


class Arena:
    """One uint8 allocation on one device; hands out typed views at byte offsets."""

    def __init__(self, device: torch.device | str, alignment: int = 64) -> None:
        self.device = torch.device(device)
        self.alignment = alignment
        self.storage: torch.Tensor | None = None
        self._retired: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return 0 if self.storage is None else self.storage.numel()

    @property
    def address(self) -> int:
        return 0 if self.storage is None else self.storage.data_ptr()

    def reserve(self, nbytes: int, keep_old: bool = False) -> bool:
        """Make the arena at least `nbytes` large; True if it was (re)allocated."""
        if self.storage is not None and self.storage.numel() >= nbytes:
            return False
        if keep_old and self.storage is not None:
            self._retired.append(self.storage)
        self.storage = None  # release first: the old block can serve the new one's peak
        self.storage = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        return True

    def view(
        self,
        offset: int,
        dtype: torch.dtype,
        shape: Sequence[int],
        stride: Sequence[int],
    ) -> torch.Tensor:
        """A tensor of `dtype`/`shape`/`stride` whose storage starts at byte `offset`."""
        assert self.storage is not None and offset % self.alignment == 0
        itemsize = dtype.itemsize
        span = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
        end = offset + span * itemsize
        if end > self.storage.numel():
            raise RuntimeError(f"arena view [{offset}, {end}) past the arena ({self.nbytes} B)")
        flat = self.storage[offset : offset + span * itemsize].view(dtype)
        return flat.as_strided(tuple(shape), tuple(stride))


class PlannedViews:
    """Runtime side of a memory plan: `self(sig)` -> one view per planned buffer.

    `plan` is a passes.memory_plan.MemoryPlan (duck-typed: evaluate, buffers, slots)."""

    def __init__(self, plan: Any, stable: bool = False) -> None:
        self.plan = plan
        self.stable = stable
        self.arenas: dict[str, Arena] = {}
        self._views: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self.last_sig: tuple[int, ...] | None = None
        self._dtype = [b.dtype for b in plan.buffers]
        self._slot = [b.slot for b in plan.buffers]
        self._device = [plan.slots[b.slot].device for b in plan.buffers]

    def __call__(self, sig: tuple[int, ...]) -> list[torch.Tensor]:
        views = self._views.get(sig)
        if views is not None:
            self.last_sig = sig
            return views
        return self._build(sig)

    def _build(self, sig: tuple[int, ...]) -> list[torch.Tensor]:
        layout = self.plan.evaluate(sig)
        keep = self.stable or _capturing()
        for device in layout.arena_bytes:
            if device not in self.arenas:
                self.arenas[device] = Arena(device, self.plan.alignment)
        grows = any(self.arenas[d].nbytes < n for d, n in layout.arena_bytes.items())
        if grows and not keep:
            # Views of other shapes hold the old allocation: drop them first, so the old
            # block is free (and reusable by the allocator) before the larger one exists.
            self._views.clear()
        for device, nbytes in layout.arena_bytes.items():
            self.arenas[device].reserve(nbytes, keep_old=keep)
        views = [
            self.arenas[self._device[i]].view(
                layout.offsets[self._slot[i]], self._dtype[i], layout.shapes[i], layout.strides[i]
            )
            for i in range(len(self._dtype))
        ]
        if len(self._views) >= 64 and not self.stable:
            # Stable (CUDA graph) mode never evicts: a recorded graph keeps these addresses.
            self._views.pop(next(iter(self._views)))
        self._views[sig] = views
        self.last_sig = sig
        return views

    def layout(self, sig: tuple[int, ...] | None = None) -> str:
        """The arena at the peak point of the (last used) shape, with real addresses."""
        sig = self.last_sig if sig is None else sig
        if sig is None:
            return "arena not allocated yet (the graph has not run)"
        layout = self.plan.evaluate(sig)
        _, at = self.plan.live_bytes(layout)
        out = []
        for device, arena in self.arenas.items():
            rows = self.plan.layout_rows(layout, at, device)
            out.append(f"[{device}] shape {sig}")
            out.append(format_layout(rows, arena.nbytes, base=arena.address))
        return "\n".join(out)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
