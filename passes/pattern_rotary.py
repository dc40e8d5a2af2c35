"""Rotary position embedding (rotate-half layout) on q and k -> yirage::rotary.

Matches, per tensor (HF `apply_rotary_pos_emb`: `x * cos + rotate_half(x) * sin`):

    x1  = slice(x, -1, 0, D/2);  x2 = slice(x, -1, D/2, end)
    rot = cat([neg(x2), x1], -1)
    out = add(mul(x, cos), mul(rot, sin))          # either add order; cos/sin [.., D]

Two matches that share (cos, sin) — q and k of one attention layer — become one op:

    q_out, k_out = yirage.rotary(q, k, cos, sin, False)

The pair is formed in graph order and is placed after both inputs; a pair whose outputs
are read before that point is not formed. Sites left without a partner are rejected
(reported) and stay as ATen ops. The interleaved (GPT-J) layout exists in the op but none
of the covered HF models emits it, so no pattern is registered for it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .context import PassContext
from .pattern_utils import (
    ensure_ops,
    erase_dead,
    first_match,
    getitems,
    insert_call,
    lazy_patterns,
    note_reference,
    placement,
    refresh_layout,
    val,
)

aten = torch.ops.aten
NAME = "rotary"


@lazy_patterns
def _patterns() -> list:
    from .pattern_expr import CallFunction, KeywordArg

    x, cos, sin = KeywordArg("x"), KeywordArg("cos"), KeywordArg("sin")
    x2 = CallFunction(aten.slice.Tensor, x, KeywordArg("d2"), KeywordArg("h2"), KeywordArg("e2"))
    x1 = CallFunction(aten.slice.Tensor, x, KeywordArg("d1"), 0, KeywordArg("h1"))
    rot = CallFunction(aten.cat.default, [CallFunction(aten.neg.default, x2), x1], KeywordArg("cd"))
    a = CallFunction(aten.mul.Tensor, x, cos)
    b = CallFunction(aten.mul.Tensor, rot, sin)
    return [CallFunction(aten.add.Tensor, a, b), CallFunction(aten.add.Tensor, b, a)]


def extra_check(m) -> str | None:
    """Why a rotate-half match is not a full-head-dim rotary to fuse, or None."""
    k = m.kwargs
    xv, cv, sv = val(k["x"]), val(k["cos"]), val(k["sin"])
    if not all(isinstance(v, torch.Tensor) for v in (xv, cv, sv)):
        return "x/cos/sin are not tensors"
    nd, d = xv.dim(), xv.shape[-1]
    if any(dim not in (-1, nd - 1) for dim in (k["d1"], k["d2"], k["cd"])):
        return "rotation is not over the last dim"
    half = k["h1"]
    if isinstance(half, Node) or half != k["h2"] or 2 * half != d:
        return "rotate_half split is not at D/2"
    if isinstance(k["e2"], Node) or k["e2"] < d:
        return "second half slice does not reach the end"
    if cv.shape[-1] != d or sv.shape[-1] != d or cv.shape != sv.shape:
        return "cos/sin do not cover the head dim"
    return None


def _drop_empty_pass_through(out: Node) -> None:
    """Phi-3 style cat([rotated, x[..., rot:]], -1) with an empty pass-through -> rotated."""
    for cat in list(out.users):
        if cat.target is not aten.cat.default or len(cat.args[0]) != 2 or cat.args[0][0] is not out:
            continue
        rest = val(cat.args[0][1])
        if isinstance(rest, torch.Tensor) and rest.shape[-1] == 0 and cat.args[1] in (-1, 3):
            if val(cat).shape == val(out).shape and val(cat).dtype == val(out).dtype:
                dead = cat.args[0][1]
                cat.replace_all_uses_with(out)
                erase_dead([cat, dead])


def fuse_rotary(gm: GraphModule, ctx: PassContext) -> int:
    ensure_ops()
    sites: dict[tuple[Node, Node], list] = {}
    for node in gm.graph.nodes:
        if node.target is not aten.add.Tensor:
            continue
        found = first_match(node, ((p, None) for p in _patterns()), extra_check, ctx, NAME)
        if found is not None:
            m = found[0]
            sites.setdefault((m.kwargs["cos"], m.kwargs["sin"]), []).append((node, m))
    count = 0
    for (cos, sin), group in sites.items():
        while len(group) >= 2:
            (q_out, qm), (k_out, km) = group[0], group[1]
            q, k = qm.kwargs["x"], km.kwargs["x"]
            matched = list(qm.nodes) + list(km.nodes)
            where, why = placement(gm, [q, k, cos, sin], [q_out, k_out], matched)
            if where is None:
                ctx.report.reject(NAME, f"{q_out.name}+{k_out.name}: {why}")
                group.pop(0)
                continue
            fused = insert_call(gm, where, torch.ops.yirage.rotary.default, (q, k, cos, sin, False))
            new_q, new_k = getitems(gm, fused, 2)
            q_out.replace_all_uses_with(new_q)
            k_out.replace_all_uses_with(new_k)
            erase_dead(matched)
            _drop_empty_pass_through(new_q)
            _drop_empty_pass_through(new_k)
            refresh_layout(gm, [new_q, new_k])
            del group[:2]
            count += 1
        for node, _ in group:
            ctx.report.reject(NAME, f"{node.name}: no q/k partner sharing its cos/sin")
    if count:
        ctx.report.count_pattern(NAME, count)
        note_reference(ctx, "rotary")
    return count
