"""Horizontal GEMM fusion of projections that share an input (q/k/v; gate/up).

Inference graphs with frozen weights only (after freeze_parameters the weights are get_attr
constants); training graphs are left unfused. Matches, for one input x:

    y_i = mm(x, t(W_i))            or  addmm(b_i, x, t(W_i))        i = 1..n, n >= 2
    (t(W) also as permute(W, [1, 0]), Inductor's decomposition of t)
    (W_i: get_attr [N_i, K], same K and dtype; b_i: get_attr [N_i])

Rewrite (W_cat/b_cat built once at compile time and registered as buffers on gm):

    y   = mm(x, t(W_cat))          or  addmm(b_cat, x, t(W_cat))   (missing b_i are zeros)
    y_i = slice(y, 1, off_i, off_i + N_i)

The slices are strided views; view-like users that cannot view them become reshapes.
Counted as "horizontal_gemm.qkv" (3 projections), "horizontal_gemm.gate_up" (2 feeding one
gated activation) or "horizontal_gemm.other".
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .context import PassContext
from .freezing import Recipe, add_constant, recipe_of, recipes, release_free_heap
from .pattern_utils import (
    erase_dead,
    insert_call,
    order_of,
    refresh_layout,
    transposed_weight,
    val,
)

aten = torch.ops.aten
NAME = "horizontal_gemm"


def _projection(node: Node, gm: GraphModule) -> tuple[Node, Node, Node | None] | None:
    """(x, W get_attr, bias get_attr or None) of y = x @ W.T (+ b), else None."""
    if node.target is aten.mm.default:
        x, wt = node.args
        bias = None
    elif node.target is aten.addmm.default and not node.kwargs:
        bias, x, wt = node.args
        if not (isinstance(bias, Node) and bias.op == "get_attr" and val(bias).dim() == 1):
            return None
    else:
        return None
    w = transposed_weight(wt)
    if not (isinstance(w, Node) and w.op == "get_attr"):
        return None
    if not isinstance(getattr(gm, w.target, None), torch.Tensor) or val(w).dim() != 2:
        return None
    return x, w, bias


def _label(outputs: list[Node]) -> str:
    if len(outputs) == 3:
        return "qkv"

    def consumers(n: Node, depth: int = 4) -> set:
        found = set()
        for u in n.users:
            if u.target is torch.ops.yirage.gated_act.default:
                found.add(u)
            elif depth:
                found |= consumers(u, depth - 1)
        return found

    if len(outputs) == 2:
        a, b = (consumers(o) for o in outputs)
        if a & b:
            return "gate_up"
    return "other"


def _share_storage(gm: GraphModule, ctx: PassContext, members: list, w_node: Node) -> int:
    """Re-point the module's own parameters at row slices of `w_cat`; bytes saved.

    Values are unchanged, so the eager module behaves the same, but the original weights are
    freed: without this, every fused projection would hold its weights twice (e.g. +280 MiB
    for a 135M Llama). Freezing already assumes weights are not reassigned after compiling.
    """
    frozen = ctx.artifacts.get("frozen_params", {})
    w_cat = getattr(gm, w_node.target)
    cat_recipe = recipes(gm).get(w_node.target)
    saved, offset = 0, 0
    with torch.no_grad():
        for _, w, _ in members:
            n = val(w).shape[0]
            param = frozen.get(w.target)
            part = w_cat[offset : offset + n]
            offset += n
            if param is None or param.shape != part.shape or param.dtype != part.dtype:
                continue
            # A cached compiled graph re-arms from these records (runtime/graph_cache.py).
            source = recipes(gm).get(w.target)
            if source is not None and source.kind == "input" and cat_recipe is not None:
                shares = ctx.artifacts.setdefault("shared_params", [])
                shares.append((source.ref, cat_recipe, offset - n, offset))
            else:
                ctx.artifacts["uncacheable"] = f"{w.target}: re-pointed weight without recipe"
            param.data = part
            # The frozen constant is dead after the rewrite; dropping it now frees the old
            # storage at once instead of after the pipeline (lower compile-time peak).
            gm.register_buffer(w.target, part, persistent=False)
            recipes(gm)[w.target] = Recipe.call(
                aten.slice.Tensor, (cat_recipe, 0, offset - n, offset)
            )
            saved += part.numel() * part.element_size()
    if saved:
        release_free_heap()  # the originals' pages, before the next group allocates
    return saved


def fuse_horizontal_gemm(gm: GraphModule, ctx: PassContext) -> int:
    if not ctx.inference:
        return 0
    groups: dict[Node, list[tuple[Node, Node, Node | None]]] = {}
    for node in gm.graph.nodes:
        proj = _projection(node, gm)
        if proj is not None:
            groups.setdefault(proj[0], []).append((node, proj[1], proj[2]))
    order = order_of(gm)
    count, extra = 0, 0
    for x, members in groups.items():
        if len(members) < 2:
            continue
        weights = [getattr(gm, w.target) for _, w, _ in members]
        if len({(t.dtype, t.shape[1], t.device) for t in weights}) != 1:
            ctx.report.reject(NAME, f"{x.name}: projections differ in dtype/K/device")
            continue
        members.sort(key=lambda m: order[m[0]])
        first = members[0][0]
        w_cat = torch.cat(weights, 0)
        w_recipe = Recipe.call(aten.cat.default, ([recipe_of(gm, w) for _, w, _ in members], 0))
        w_node = add_constant(gm, "_hgemm_w_", w_cat, first, ctx.fake_mode, w_recipe)
        extra += w_cat.numel() * w_cat.element_size() - _share_storage(gm, ctx, members, w_node)
        wt = insert_call(gm, first, aten.t.default, (w_node,))
        if any(b is not None for _, _, b in members):
            biases = [
                getattr(gm, b.target) if b is not None else w.new_zeros(w.shape[0])
                for (_, _, b), w in zip(members, weights)
            ]
            b_recipes = [
                recipe_of(gm, b)
                if b is not None
                else Recipe.call(aten.new_zeros.default, (recipe_of(gm, w), [val(w).shape[0]]))
                for _, w, b in members
            ]
            b_recipe = Recipe.call(aten.cat.default, (b_recipes, 0))
            b_node = add_constant(
                gm, "_hgemm_b_", torch.cat(biases, 0), first, ctx.fake_mode, b_recipe
            )
            fused = insert_call(gm, first, aten.addmm.default, (b_node, x, wt))
        else:
            fused = insert_call(gm, first, aten.mm.default, (x, wt))
        outputs, offset = [], 0
        for (node, _, _), w in zip(members, weights):
            n = w.shape[0]
            part = insert_call(gm, first, aten.slice.Tensor, (fused, 1, offset, offset + n))
            offset += n
            node.replace_all_uses_with(part)
            outputs.append(part)
        erase_dead([m[0] for m in members] + [m[0].args[-1] for m in members])
        refresh_layout(gm, outputs)
        ctx.report.count_pattern(f"{NAME}.{_label(outputs)}")
        count += 1
    if count:
        ctx.report.count_pattern(NAME, count)
        ctx.report.notes.append(
            f"{NAME}: {count} fused GEMMs; concatenated weights add {extra / 2**20:.2f} MiB"
        )
    return count
