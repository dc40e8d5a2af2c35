"""LoRA linear (PEFT `lora.Linear`, eval, no dropout) -> yirage::lora_linear.

Matches (views strip matmul's batch flattening; x2 = view(x, [M, K]) shared by both arms):

    base = view(addmm(b, x2, t(W)) | mm(x2, t(W)))                  # W [N, K], b [N]
    a    = view(mm(x2, t(A)))                                       # A [R, K]
    lora = view(mm(view(a), t(B)))                                  # B [N, R]
    out  = add(base, mul(lora, scale))                              # either order; scale float

Rewrite:
    out = yirage.lora_linear(x, W, b, A, B, scale)

Runs before horizontal GEMM fusion, so the base/A projections are not concatenated into a
neighbouring q/k/v GEMM first. Rejected (reported): a non-constant scale.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .context import PassContext
from .pattern_utils import (
    ensure_ops,
    erase_dead,
    insert_call,
    note_reference,
    refresh_layout,
    transposed_weight,
    val,
)

aten = torch.ops.aten
NAME = "lora_linear"
_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _strip(node: object, chain: list[Node]) -> object:
    while isinstance(node, Node) and node.target in _RESHAPES:
        chain.append(node)
        node = node.args[0]
    return node


def _linear(node: object, chain: list[Node]) -> tuple[object, Node, object] | None:
    """(input, weight, bias) of mm/addmm(x, t(W)) behind reshapes."""
    node = _strip(node, chain)
    if not isinstance(node, Node):
        return None
    if node.target is aten.mm.default:
        bias, (x, wt) = None, node.args
    elif node.target is aten.addmm.default and not node.kwargs:
        bias, x, wt = node.args
    else:
        return None
    w = transposed_weight(wt)
    if w is None:
        return None
    chain += [node, wt]
    return x, w, bias


def _site(add: Node, ctx: PassContext):
    if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs:
        return None
    for base_arg, scaled in (add.args, reversed(add.args)):
        if not (isinstance(scaled, Node) and scaled.target is aten.mul.Tensor):
            continue
        lora_out, scale = scaled.args
        chain: list[Node] = [add, scaled]
        outer = _linear(lora_out, chain)
        base = _linear(base_arg, chain)
        if outer is None or base is None or outer[2] is not None:
            continue
        inner = _linear(outer[0], chain)
        if inner is None or inner[2] is not None:
            continue
        x = _strip(base[0], [])
        if _strip(inner[0], []) is not x or not isinstance(x, Node):
            continue
        if isinstance(scale, Node):
            ctx.report.reject(NAME, f"{add.name}: scale not constant")
            return None
        return x, base[1], base[2], inner[1], outer[1], float(scale), chain
    return None


def fuse_lora(gm: GraphModule, ctx: PassContext) -> int:
    ensure_ops()
    count = 0
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        site = _site(node, ctx)
        if site is None:
            continue
        x, w, b, a, bw, scale, chain = site
        xv, ov = val(x), val(node)
        if tuple(xv.shape[:-1]) != tuple(ov.shape[:-1]) or val(w).shape[0] != ov.shape[-1]:
            ctx.report.reject(NAME, f"{node.name}: output shape is not x[..., :-1] + [N]")
            continue
        fused = insert_call(gm, node, torch.ops.yirage.lora_linear.default, (x, w, b, a, bw, scale))
        node.replace_all_uses_with(fused)
        erase_dead(chain)
        refresh_layout(gm, [fused])
        count += 1
    if count:
        ctx.report.count_pattern(NAME, count)
        note_reference(ctx, NAME)
    return count
