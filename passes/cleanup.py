"""Generic clean-up passes: no-op removal, CSE, dead-code elimination.

remove_noops, before:                     after:
    a = aten.clone(x)                        (uses of a read x)
    b = aten.view(y, y.shape)                (uses of b read y)
    c = aten.alias(z) / _to_copy same dtype  (uses of c read z)
    d = aten.mul(w, 1) / add(w, 0)           (uses of d read w)
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .context import PassContext, node_val

aten = torch.ops.aten

_VIEWLIKE = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
)


def _same_meta(a: Node, b: Node) -> bool:
    va, vb = node_val(a), node_val(b)
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return False
    return (
        va.dtype == vb.dtype
        and va.device == vb.device
        and va.shape == vb.shape
        and va.stride() == vb.stride()
    )


def _is_noop(node: Node) -> Node | None:
    """The node this one is equivalent to, or None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return None
    src = node.args[0]
    t = node.target
    if t in _VIEWLIKE or t in (aten.alias.default, aten.clone.default, aten._to_copy.default):
        if t is aten._to_copy.default and set(node.kwargs) - {"dtype", "device", "layout"}:
            return None
        if t is aten.clone.default and node.kwargs.get("memory_format") not in (
            None,
            torch.preserve_format,
        ):
            return None
        return src if _same_meta(node, src) else None
    if t in (aten.mul.Tensor, aten.div.Tensor) and len(node.args) == 2:
        if not isinstance(node.args[1], Node) and node.args[1] == 1 and _same_meta(node, src):
            return src
    if t in (aten.add.Tensor, aten.sub.Tensor) and len(node.args) == 2 and not node.kwargs:
        if not isinstance(node.args[1], Node) and node.args[1] == 0 and _same_meta(node, src):
            return src
    return None


def remove_noops(gm: GraphModule, ctx: PassContext) -> int:
    """Drop ops that return their input unchanged (same dtype, shape and strides).

    Never drops a node whose input is then mutated in-place (copy_ into a placeholder),
    since the node may be the copy that protects the old value.
    """
    mutated = {n.args[0] for n in gm.graph.nodes if n.target is aten.copy_.default}
    count = 0
    for node in list(gm.graph.nodes):
        src = _is_noop(node)
        if src is None or src in mutated:
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        count += 1
    return count


def _impure(node: Node) -> bool:
    if node.op != "call_function":
        return node.op != "get_attr"
    if node.is_impure():
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema and (schema.is_mutable or getattr(node.target, "is_view", False) is None))


def cse(gm: GraphModule, ctx: PassContext) -> int:
    """Common-subexpression elimination over pure, deterministic call_function nodes."""
    seen: dict[tuple, Node] = {}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _impure(node):
            continue
        tags = getattr(node.target, "tags", ())
        if torch.Tag.nondeterministic_seeded in tags:
            continue
        try:
            key = (node.target, _freeze(node.args), _freeze(node.kwargs))
            hash(key)
        except TypeError:
            continue
        prev = seen.get(key)
        if prev is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        count += 1
    return count


def _freeze(x):
    if isinstance(x, list | tuple):
        return (type(x).__name__, tuple(_freeze(i) for i in x))
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, torch.SymInt | torch.SymFloat | torch.SymBool):
        return ("sym", str(x))
    if isinstance(x, float) and x != x:  # NaN never equals itself
        return ("nan",)
    return x


def dce(gm: GraphModule, ctx: PassContext) -> int:
    """Remove nodes whose results are never used (mutating ops are kept)."""
    count = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.op == "call_function" and _impure(node):
            continue
        gm.graph.erase_node(node)
        count += 1
    for name, _ in list(gm.named_buffers(recurse=False)) + list(gm.named_parameters(recurse=False)):
        if not any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes):
            delattr(gm, name)
    return count
