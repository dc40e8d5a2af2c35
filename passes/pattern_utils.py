"""Shared helpers of the LLM pattern passes (pattern_*.py).

Patterns are pattern_expr expressions (Inductor's pattern language, without importing
Inductor), built on first use and cached (`lazy_patterns`).
A pass walks the graph, calls `pattern.match(node)` on anchor nodes and rewrites matches
with the surgery helpers below; it owns its iteration, so no global handler state exists.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .context import PassContext, node_val, set_fake_val

aten = torch.ops.aten

_CAST_KWARGS = {"dtype", "layout", "device", "memory_format"}


def ensure_ops() -> None:
    """Register the yirage ops (idempotent; only pattern passes need them)."""
    importlib.import_module("yirage_dynamo.ops")


def lazy_patterns(build: Callable[[], Any]) -> Callable[[], Any]:
    """Cache what `build` returns; it runs on the first call, never at import."""
    return functools.lru_cache(maxsize=1)(build)


def match(pattern: Any, node: Node):
    """The Match of `pattern` (a pattern_expr expression) rooted at `node`, or None."""
    return pattern.match(node)


def first_match(
    node: Node, candidates: Iterable[tuple[Any, Any]], extra_check: Callable, ctx: Any, name: str
) -> tuple[Any, Any] | None:
    """(match, tag) of the first (pattern, tag) matching at `node` whose extra_check passes.

    A match that fails its extra_check is recorded as a rejection with the reason and ends
    the search (a later, looser pattern must not rewrite a site the check refused).
    """
    for pattern, tag in candidates:
        m = match(pattern, node)
        if m is None:
            continue
        why = extra_check(m)
        if why is not None:
            ctx.report.reject(name, f"{node.name}: {why}")
            return None
        return m, tag
    return None


def val(node: Any) -> Any:
    return node_val(node)


def is_cast(node: Any) -> bool:
    """A pure dtype conversion (to/type_as/float()) of one tensor."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target is aten._to_copy.default:
        if set(node.kwargs) - _CAST_KWARGS:
            return False
        return node.kwargs.get("memory_format") in (None, torch.preserve_format)
    return node.target is torch.ops.prims.convert_element_type.default


def transposed_weight(node: Any) -> Node | None:
    """W of a 2-D transpose node: t(W), permute(W, [1, 0]) (Inductor's decomposition of t)
    or transpose(W, 0, 1); else None."""
    if not isinstance(node, Node) or node.op != "call_function" or not node.args:
        return None
    w = node.args[0]
    if node.target is aten.t.default:
        return w
    if node.target is aten.permute.default and list(node.args[1]) == [1, 0]:
        return w
    if node.target is aten.transpose.int and sorted(node.args[1:]) in ([0, 1], [-2, -1]):
        v = val(w)
        return w if isinstance(v, torch.Tensor) and v.dim() == 2 else None
    return None


def strip_cast(node: Node) -> Node:
    return node.args[0] if is_cast(node) else node


def dtype_of(node: Any) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def order_of(gm: GraphModule) -> dict[Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def insert_call(
    gm: GraphModule, where: Node, target: Any, args: tuple, kwargs: dict | None = None
) -> Node:
    """Create `target(*args)` right before `where`, with meta["val"]."""
    with gm.graph.inserting_before(where):
        node = gm.graph.call_function(target, args, kwargs or {})
    node.meta["stack_trace"] = where.meta.get("stack_trace")
    set_fake_val(gm, node)
    return node


def getitems(gm: GraphModule, node: Node, n: int) -> list[Node]:
    """getitem nodes for each of the n outputs of a tuple-returning node."""
    import operator

    out = []
    anchor = node.next
    for i in range(n):
        with gm.graph.inserting_before(anchor):
            g = gm.graph.call_function(operator.getitem, (node, i))
        g.meta["val"] = node.meta["val"][i]
        out.append(g)
    return out


def placement(
    gm: GraphModule, inputs: Iterable[Any], replaced: Iterable[Node], ignore: Iterable[Node] = ()
) -> tuple[Node | None, str]:
    """Where a node computing `replaced` from `inputs` can go: right after its latest input.

    Returns (node to insert before, "") or (None, why) when a user of a replaced node runs
    before the inputs are ready (the rewrite would break topological order).
    """
    order = order_of(gm)
    nodes = [a for a in inputs if isinstance(a, Node)]
    latest = max(nodes, key=order.__getitem__) if nodes else next(iter(gm.graph.nodes))
    while latest.next.op == "placeholder":
        latest = latest.next
    pos = order[latest]
    replaced = list(replaced)
    skip = set(replaced) | set(ignore)
    for r in replaced:
        for u in r.users:
            if u not in skip and order[u] <= pos:
                return None, f"{u.name} uses {r.name} before all inputs are computed"
    return latest.next, ""


def refresh_layout(gm: GraphModule, roots: Sequence[Node]) -> None:
    """Re-derive meta["val"] downstream of rewritten nodes whose strides may have changed.

    Output strides follow input strides for views and elementwise ops, and lowerings read
    them, so stale metadata is walked forward until strides stop changing. A view that is
    no longer expressible on the new layout becomes a reshape (which copies only if it must).
    """
    todo = [u for r in roots for u in r.users]
    seen: set[Node] = set()
    while todo:
        node = todo.pop(0)
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            continue  # running it on fake inputs would mutate their metadata
        old = node.meta.get("val")
        try:
            set_fake_val(gm, node)
        except (RuntimeError, ValueError):
            if node.target not in (aten.view.default, aten._unsafe_view.default):
                raise
            node.target = aten.reshape.default
            set_fake_val(gm, node)
        new = node.meta.get("val")
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
            if old.stride() == new.stride():
                continue
        elif not isinstance(new, tuple | list):
            continue
        todo.extend(node.users)


def replace_and_erase(old: Node, new: Node, dead: Iterable[Node] = ()) -> None:
    """Point users of `old` to `new`, then drop `old` and any now-unused matched nodes."""
    old.replace_all_uses_with(new)
    erase_dead([old, *dead])


def erase_dead(nodes: Iterable[Node]) -> None:
    """Erase those of `nodes` left without users (repeatedly: chains die back to front)."""
    pending = [n for n in nodes if n.op == "call_function"]
    changed = True
    while changed:
        changed = False
        for n in pending:
            if not n._erased and not n.users:
                n.graph.erase_node(n)
                changed = True


def last_dim_is(dims: Any, ndim: int) -> bool:
    if not isinstance(dims, list | tuple) or len(dims) != 1 or not isinstance(dims[0], int):
        return False
    return dims[0] in (-1, ndim - 1)


def note(ctx: PassContext, text: str) -> None:
    if text not in ctx.report.notes:
        ctx.report.notes.append(text)


def note_reference(ctx: PassContext, op_name: str) -> None:
    """Say in the report that yirage::op_name runs its ATen reference on this lowering."""
    if op_name not in ctx.capabilities.native_custom_ops:
        note(ctx, f"yirage::{op_name} runs its ATen reference implementation (no native kernel)")
