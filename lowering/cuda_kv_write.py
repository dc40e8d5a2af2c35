"""Fuse rotary embedding with the static KV-cache write that follows it (no-Inductor path).

HF's static cache writes each layer's new keys and values with two `index_copy_`s; with
rotary before them that is four launches per layer of a decode step, each moving a few
KB (~2.6 µs apiece on an H100: 0.24 ms of a 7B token). Inductor would fuse the writes with
its own rotary code; without Inductor, `TritonLowering.lower` runs this after the Triton
swaps:

before:                                            after:
    r = yirage_cuda.rotary(q, k, cos, sin)             q2 = yirage_cuda.rotary_kv_write(
    q2 = r[0]; k2 = r[1]                                        q, k, v, cos, sin, kc, vc, pos)
    kc2 = aten.index_copy_(kc, 2, pos, k2)             (kc, vc written in place)
    vc2 = aten.index_copy_(vc, 2, pos, v)
    o = attention(q2, kc2, vc2, ...)                   o = attention(q2, kc, vc, ...)

Matched only where the kernel does exactly that: rotated keys used by the cache write
alone, both writes along dim 2 at the same positions, caches with unit inner stride and
the dtypes of what is written, nothing between the two writes touching the caches.
`YIRAGE_CUDA_KV_WRITE=off` keeps the separate ops (benchmark A/Bs).

With `YIRAGE_CUDA_KV_POS` on (the default: 54 µs off a 7B H100 step; `off` keeps the add)
it also folds the positions' own launch, HF's `pos = arange(S) + cumulative_length`, into the kernel:

    pos = aten.add(offsets, counter)                   q2 = yirage_cuda.rotary_kv_write(
    aten.add_(counter, S)                                       ..., offsets, counter)
                                                       aten.add_(counter, S)

The fused call then goes where `pos` was, before the counter's in-place increment, so it
reads the counter's old value as the add did (only where nothing between there and the
writes touches the caches, and every operand is ready there).

`batch_counter_increments` then turns the layers' counter increments, one launch each
(~1.3 µs on an H200: 32 of a 7B step), into one multi-tensor launch where the last was
(`YIRAGE_CUDA_KV_COUNTERS=off` keeps them apart):

    aten.add_(counter_0, S)          ...                       (nothing reads a counter
    ...                              aten._foreach_add_(        after its increment, so
    aten.add_(counter_31, S)             [counter_0, ..., counter_31], S)   it can wait)
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.fx import GraphModule, Node
from yirage_dynamo.passes.context import PassContext, node_val, set_fake_val
from yirage_dynamo.passes.fusion import VIEW_OPS

_INDEX_COPY_ = torch.ops.aten.index_copy_.default
KV_WRITE_ENV = "YIRAGE_CUDA_KV_WRITE"
KV_POS_ENV = "YIRAGE_CUDA_KV_POS"
KV_COUNTERS_ENV = "YIRAGE_CUDA_KV_COUNTERS"
_ADD = torch.ops.aten.add.Tensor
_ADD_ = (torch.ops.aten.add_.Tensor, torch.ops.aten.add_.Scalar)


def _switch(env: str, default: str) -> bool:
    value = os.environ.get(env, "").strip().lower() or default
    if value not in ("on", "off"):
        raise ValueError(f"{env}={value!r}: expected 'on' or 'off'")
    return value == "on"


def enabled() -> bool:
    """YIRAGE_CUDA_KV_WRITE: "on" (default) or "off"; another value raises ValueError."""
    return _switch(KV_WRITE_ENV, "on")


def folds_positions() -> bool:
    """YIRAGE_CUDA_KV_POS: "on" (default) or "off"; another value raises ValueError."""
    return _switch(KV_POS_ENV, "on")


def batches_counters() -> bool:
    """YIRAGE_CUDA_KV_COUNTERS: "on" (default) or "off"; another value raises ValueError."""
    return _switch(KV_COUNTERS_ENV, "on")


def rotary_kv_write_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    pos_base: torch.Tensor | None = None,
) -> torch.Tensor:
    """What `yirage_cuda::rotary_kv_write` computes, in ATen (tests, CPU)."""
    pos = pos if pos_base is None else pos + pos_base
    q2, k2 = torch.ops.yirage.rotary(q, k, cos, sin, False)
    k_cache.index_copy_(2, pos, k2)
    v_cache.index_copy_(2, pos, v)
    return q2


def _cache_write(node: Node) -> tuple[Node, Node, Node] | None:
    """(cache, positions, source) of `aten.index_copy_(cache, 2, positions, source)`."""
    if node.op != "call_function" or node.target is not _INDEX_COPY_ or len(node.args) != 4:
        return None
    cache, dim, pos, src = node.args
    cv = node_val(cache)
    if not isinstance(cv, torch.Tensor) or cv.dim() != 4 or dim not in (2, -2):
        return None
    return cache, pos, src


def _aliases(*roots: Node) -> set[Node]:
    """Every user of `roots` or of a view of them (a view read later sees the write)."""
    seen: set[Node] = set()
    todo = list(roots)
    while todo:
        for u in todo.pop().users:
            if u in seen:
                continue
            seen.add(u)
            target = getattr(u.target, "_opname", None)
            if u.op == "call_function" and target in VIEW_OPS:
                todo.append(u)
    return seen


def _why_not(
    rot: Node, k_write: Node, v_write: Node, order: dict[Node, int], q_out: Node
) -> str | None:
    kc, pos, k2 = _cache_write(k_write)
    vc, _, v = _cache_write(v_write)
    q, k, cos, sin = rot.args[:4]
    qv, kv, vv, kcv, vcv, pv = (node_val(n) for n in (q, k, v, kc, vc, pos))
    if not all(isinstance(t, torch.Tensor) for t in (qv, kv, vv, kcv, vcv, pv)):
        return "a value without metadata"
    if not all(isinstance(d, int) for t in (qv, kv, vv, pv, kcv, vcv) for d in t.shape):
        return "symbolic sizes (comparing them would specialise them)"
    if vv.shape != kv.shape or vv.dim() != 4 or pv.dim() != 1 or pv.shape[0] != kv.shape[2]:
        return "values and keys differ in shape, or not one position per new token"
    if not (qv.dtype == kv.dtype == kcv.dtype and vv.dtype == vcv.dtype):
        return "dtypes differ between what is written and the cache"
    if kcv.stride(-1) != 1 or vcv.stride(-1) != 1 or kcv.shape[-1] != kv.shape[-1]:
        return "a cache without unit inner stride or of another head dim"
    first, last = sorted((k_write, v_write), key=order.__getitem__)
    span = range(order[first] + 1, order[last])
    if any(order[u] in span for u in _aliases(kc, vc, first)):
        return "the caches are used between the two writes"
    if any(order[u] <= order[last] for u in q_out.users):
        return "rotated queries used before the cache writes"
    return None


def _position_add(pos: Node, writes: set[Node]) -> tuple[Node, Node] | None:
    """(offsets[S], counter[1]) of `pos = aten.add(offsets, counter)`, int64, read by the
    two cache writes alone."""
    if (
        pos.op != "call_function"
        or pos.target is not _ADD
        or pos.kwargs
        or set(pos.users) != writes
    ):
        return None
    if len(pos.args) != 2 or not all(isinstance(a, Node) for a in pos.args):
        return None
    pv = node_val(pos)
    for offsets, counter in (pos.args, pos.args[::-1]):
        ov, cv = node_val(offsets), node_val(counter)
        if not all(isinstance(t, torch.Tensor) for t in (ov, cv)):
            continue
        if not all(type(d) is int for d in (*ov.shape, *cv.shape)):
            continue  # symbolic: comparing would specialise
        if ov.dtype == cv.dtype == pv.dtype == torch.int64 and ov.shape == pv.shape:
            if cv.numel() == 1 and ov.stride(-1) == 1:
                return offsets, counter
    return None


def _fold_point(
    pos: Node,
    operands: Iterable[Node],
    caches: tuple[Node, Node],
    writes: set[Node],
    last: Node,
    order: dict[Node, int],
) -> bool:
    """Whether the fused call may run where `pos` is computed: every operand ready there,
    nothing after it touching the caches before the last write but the writes."""
    if any(order[n] >= order[pos] for n in operands):
        return False
    span = range(order[pos] + 1, order[last] + 1)
    return not any(order[u] in span for u in _aliases(*caches) - writes)


def fuse_rotary_kv_write(
    gm: GraphModule,
    ctx: PassContext,
    rotary_ops: Iterable[Any] | None = None,
    fused: Callable[..., Any] | None = None,
    fold_positions: bool | None = None,
) -> int:
    """Replace rotary + both cache writes of each layer by one fused call; count them.
    `rotary_ops`/`fused` default to the Triton ops (tests pass the references);
    `fold_positions` to YIRAGE_CUDA_KV_POS (see module)."""
    from yirage_dynamo.report import KernelRecord

    if rotary_ops is None:
        rotary_ops = (torch.ops.yirage_cuda.rotary.default,)
        fused = torch.ops.yirage_cuda.rotary_kv_write.default
    rotary_ops = tuple(rotary_ops)
    if fold_positions is None:
        fold_positions = folds_positions()
    count = folded = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for rot in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in rotary_ops]:
        if len(rot.args) > 4 and rot.args[4]:  # yirage.rotary's interleaved flag
            continue
        outs = {u.args[1]: u for u in rot.users if u.target is operator.getitem}
        if len(outs) != 2 or len(rot.users) != 2 or len(outs[1].users) != 1:
            continue
        k_write = next(iter(outs[1].users))
        kw = _cache_write(k_write)
        if kw is None or kw[2] is not outs[1]:
            continue
        kc, pos, _ = kw
        # The value write: same positions, another cache, the nearest one after.
        later = sorted(
            (u for u in pos.users if u is not k_write and _cache_write(u) is not None),
            key=lambda u: (order[u] < order[k_write], abs(order[u] - order[k_write])),
        )
        v_write = next((u for u in later if _cache_write(u)[0] is not kc), None)
        if v_write is None:
            continue
        why = _why_not(rot, k_write, v_write, order, outs[0])
        if why:
            ctx.report.reject("rotary_kv_write", f"{rot.name}: {why}")
            continue
        vc, _, v = _cache_write(v_write)
        q, k, cos, sin = rot.args[:4]
        last = max(k_write, v_write, key=order.__getitem__)
        writes = {k_write, v_write}
        parts = _position_add(pos, writes) if fold_positions else None
        if parts and _fold_point(pos, (q, k, v, cos, sin, kc, vc), (kc, vc), writes, last, order):
            with gm.graph.inserting_after(pos):
                new = gm.graph.call_function(fused, (q, k, v, cos, sin, kc, vc, *parts))
            order[new] = order[pos]
        else:
            parts = None
            with gm.graph.inserting_before(last):
                new = gm.graph.call_function(fused, (q, k, v, cos, sin, kc, vc, pos))
            order[new] = order[last]
        set_fake_val(gm, new)
        origins = [rot.meta.get("yirage_origin", rot.name), k_write.name, v_write.name]
        origins += [pos.name] if parts else []
        new.meta["yirage_origin"] = "+".join(origins)
        # The rotary kernel this call replaces is no longer launched: not in the report.
        ctx.report.kernels[:] = [
            r for r in ctx.report.kernels if not (r.name == "rotary" and r.origins == origins[:1])
        ]
        outs[0].replace_all_uses_with(new)
        k_write.replace_all_uses_with(kc)
        v_write.replace_all_uses_with(vc)
        for n in (v_write, k_write, outs[0], outs[1], rot, *([pos] if parts else [])):
            gm.graph.erase_node(n)
        ctx.report.kernels.append(KernelRecord("rotary_kv_write", "cuda", None, origins))
        count += 1
        folded += bool(parts)
    if folded:
        ctx.report.count_pattern("triton_kv_write_positions", folded)
    if count:
        ctx.report.count_pattern("triton_rotary_kv_write", count)
        gm.graph.lint()
        gm.recompile()
    return count


def _counter_increment(node: Node, order: dict[Node, int]) -> tuple[Any, ...] | None:
    """The group key (step, dtype, device) of `aten.add_(counter, step)` on a one-element
    graph input that nothing uses after it; None for any other node."""
    if node.op != "call_function" or node.target not in _ADD_ or node.kwargs or node.users:
        return None
    if len(node.args) != 2:
        return None
    counter, step = node.args
    if not isinstance(counter, Node) or counter.op != "placeholder":
        return None
    if type(step) is not int:
        return None
    cv = node_val(counter)
    if not isinstance(cv, torch.Tensor) or not all(type(d) is int for d in cv.shape):
        return None
    if cv.numel() != 1 or cv.dtype != torch.int64:
        return None
    if any(order[u] > order[node] for u in counter.users if u is not node):
        return None  # read or written after its increment: it must stay where it is
    return step, cv.dtype, cv.device


def batch_counter_increments(gm: GraphModule, ctx: PassContext) -> int:
    """One `_foreach_add_` per group of counter increments (see module); the number of
    increments merged."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[tuple[Any, ...], list[Node]] = {}
    for node in gm.graph.nodes:
        key = _counter_increment(node, order)
        if key is not None:
            groups.setdefault(key, []).append(node)
    merged = 0
    for (step, _, _), adds in groups.items():
        if len(adds) < 2 or len({a.args[0] for a in adds}) != len(adds):
            continue
        with gm.graph.inserting_after(adds[-1]):
            new = gm.graph.call_function(
                torch.ops.aten._foreach_add_.Scalar, ([a.args[0] for a in adds], step)
            )
        new.meta["val"] = None
        new.meta["yirage_origin"] = "+".join(a.name for a in adds)
        for a in adds:
            gm.graph.erase_node(a)
        merged += len(adds)
    if merged:
        ctx.report.count_pattern("batched_counter_increments", merged)
        gm.graph.lint()
        gm.recompile()
    return merged
