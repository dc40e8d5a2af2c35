"""Graph rewrites around CPU attention regions (lowering/c_attention.py), at lowering time.

`strip_repeat_kv`: attention reads un-repeated K/V where a symbolic-size graph still has
HF's repeat_kv (pattern_attention removes it in static graphs). `output_views`: the view
chain after attention that the kernel writes directly (no view call after the kernel).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from .c_renderer import CRenderer


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, Node) else x


_OUT_VIEWS = {
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.alias.default,
    torch.ops.aten.t.default,
}


def output_views(node: Node) -> list[Node]:
    """The view chain after attention that the kernel can write directly (or []).

    before: o = attention(..) [1, 9, 1, 64] strides (576, 64, 576, 1); t = transpose(o, 1, 2);
            v = view(t, [1, 576]); mm(v, w)
    after:  v = attention_0(..) writes [1, 576] contiguous; mm(v, w)
    The chain must only re-view the attention output (each link its only user) and end at
    a contiguous value at storage offset 0, like the attention output: both then describe
    one buffer, so the kernel writes with the attention strides into the chain's layout
    and the guarded view call after the kernel disappears.
    """
    r = CRenderer()
    chain: list[Node] = []
    cur = node
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if (
            u.op != "call_function"
            or u.target not in _OUT_VIEWS
            or u.kwargs
            or u.args[0] is not cur
            or u.all_input_nodes != [cur]
            or not isinstance(_val(u), torch.Tensor)
        ):
            break
        chain.append(u)
        cur = u

    def at_zero(v: torch.Tensor) -> bool:
        off = v.storage_offset()
        return not isinstance(off, torch.SymInt) and off == 0

    if not at_zero(_val(node)):
        return []
    while chain and not (r.is_contiguous(_val(chain[-1])) and at_zero(_val(chain[-1]))):
        chain.pop()
    return chain


def _full_slice(n: Node) -> bool:
    """slice(x, dim, 0, end >= any size, 1): the whole dim (a no-op view)."""
    a = list(n.args) + [None] * (5 - len(n.args))
    return (
        n.target is torch.ops.aten.slice.Tensor
        and not n.kwargs
        and a[2] in (None, 0)
        and isinstance(a[3], int)
        and a[3] >= 2**62
        and a[4] in (None, 1)
    )


def _unrepeat(x: Any, hq: int) -> Node | None:
    """k0 if x is HF's repeat_kv(k0) (as traced with symbolic sizes, where the `[:, :, None]`
    indexing leaves a full slice that static graphs do not have), else None.

    x = _unsafe_view(clone(expand(slice?(unsqueeze(k0, 2), 3, 0, MAX), [b, h, g, t, d])))
    """
    chain = []
    cur = x
    for targets in (
        (torch.ops.aten._unsafe_view.default, torch.ops.aten.view.default),
        (torch.ops.aten.clone.default,),
        (torch.ops.aten.expand.default,),
    ):
        if not isinstance(cur, Node) or cur.target not in targets:
            return None
        chain.append(cur)
        cur = cur.args[0]
    if isinstance(cur, Node) and _full_slice(cur):
        chain.append(cur)
        cur = cur.args[0]
    if not (isinstance(cur, Node) and cur.target is torch.ops.aten.unsqueeze.default):
        return None
    if cur.args[1] != 2 or any(len(n.users) != 1 for n in chain):
        return None
    k0 = cur.args[0]
    r = CRenderer()
    xv, kv = _val(x), _val(k0)
    if not (isinstance(kv, torch.Tensor) and kv.dim() == 4 and xv.dim() == 4):
        return None
    if isinstance(kv.shape[1], torch.SymInt) or hq % int(kv.shape[1]):
        return None
    same = [r.same(xv.shape[i], kv.shape[i]) for i in (0, 2, 3)]
    return k0 if all(same) and r.same(xv.shape[1], hq) else None


def strip_repeat_kv(gm: GraphModule, node: Node) -> None:
    """attention(q, repeat_kv(k0), repeat_kv(v0)) -> attention(q, k0, v0): the kernel reads
    each K/V row once per query group (pattern_attention does this where the graph has
    static sizes; with symbolic ones a full slice hides the pattern from it)."""
    q = _val(node.args[0])
    if not isinstance(q, torch.Tensor) or isinstance(q.shape[1], torch.SymInt):
        return
    hq = int(q.shape[1])
    k0, v0 = _unrepeat(node.args[1], hq), _unrepeat(node.args[2], hq)
    if k0 is None or v0 is None or not CRenderer().same(_val(k0).shape[1], _val(v0).shape[1]):
        return
    old = [node.args[1], node.args[2]]
    node.update_arg(1, k0)
    node.update_arg(2, v0)
    for x in old:
        while isinstance(x, Node) and not x.users and x.op == "call_function":
            nxt = x.args[0]
            gm.graph.erase_node(x)
            x = nxt
