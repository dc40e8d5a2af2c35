"""Attention (SDPA and HF "eager"), with GQA repeat_kv undone -> yirage::attention.

Matches A — attn_implementation="sdpa" (the op AOTAutograd picks per device):

    k = _unsafe_view(clone(expand(unsqueeze(k0, 2), [B, Hkv, G, T, D])), [B, Hq, T, D])
    (same for v; absent when Hq == Hkv)                          # HF repeat_kv
    o = getitem(_scaled_dot_product_{flash_attention_for_cpu|flash_attention|
                efficient_attention|cudnn_attention}(q, k, v, ..., mask, is_causal, scale), 0)
      | scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, enable_gqa)

Matches B — attn_implementation="eager" (casts only in reduced-precision graphs):

    s = mul(view(bmm(view(q), view(transpose(k, 2, 3)))), scale) [+ mask]   # or permute
    p = _to_copy(_softmax(_to_copy(s, f32), -1, False), q.dtype)
        (_softmax also as its decomposition: div(exp(sub(s, amax(s))), sum(exp)))
    o = view(bmm(view(p), view(v)))           # view(x) also _unsafe_view(clone(x))

Rewrite (k0/v0 are the un-repeated K/V, e.g. the static cache written by index_copy_):

    o = yirage.attention(q, k0, v0, mask, scale, is_causal, None)

Also (counted as "attention_bool_mask"), match A only: a mask that is SDPA's own
conversion of the caller's bool keep-mask to an additive one (AOTAutograd's lowering of
SDPA inserts it) is replaced by the bool mask, so the per-layer conversion kernel goes
away (every attention lowering reads bool masks):

    m = where(keep, 0, c)   with keep bool, c -inf or <= -65504 (fp16's lowest; SDPA's
                            cuDNN path uses -65536)
    attention(q, k, v, m)   ->   attention(q, k, v, keep)

A key hidden by c gets exp(s + c - max) == 0 in fp32 for any score below ~1e4, so the
outputs agree; only a row with every key hidden differs (0 instead of the mean of V),
and the bool mask is what the model passed (HF's eager attention builds its additive
mask itself: match B keeps it).

Rejected (reported): dropout, extra outputs read (logsumexp), non-constant scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function

from .context import PassContext
from .pattern_utils import (
    dtype_of,
    ensure_ops,
    erase_dead,
    insert_call,
    is_cast,
    note_reference,
    refresh_layout,
    val,
)

aten = torch.ops.aten
NAME = "attention"


def _sdpa_ops() -> dict:
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    return {getattr(aten, n).default: n for n in names if hasattr(aten, n)}


def _unrepeat(node: Node, hq: int) -> tuple[Node, list[Node]]:
    """k0 and the repeat_kv nodes if `node` is repeat_kv(k0), else (node, [])."""
    chain = []
    cur = node
    if cur.target in (aten._unsafe_view.default, aten.view.default, aten.reshape.default):
        chain.append(cur)
        cur = cur.args[0]
        if isinstance(cur, Node) and cur.target is aten.clone.default:
            chain.append(cur)
            cur = cur.args[0]
        if isinstance(cur, Node) and cur.target is aten.expand.default:
            chain.append(cur)
            cur = cur.args[0]
            if isinstance(cur, Node) and cur.target is aten.unsqueeze.default and cur.args[1] == 2:
                chain.append(cur)
                k0 = cur.args[0]
                kv, k0v = val(node), val(k0)
                if (
                    isinstance(k0v, torch.Tensor)
                    and k0v.dim() == 4
                    and kv.shape[1] == hq
                    and hq % k0v.shape[1] == 0
                    and k0v.shape[0] == kv.shape[0]
                    and k0v.shape[2:] == kv.shape[2:]
                ):
                    return k0, chain
    return node, []


_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _through_reshape(node: Any, chain: list[Node]) -> Any:
    """The 4-D tensor behind matmul's batch flattening: view | _unsafe_view(clone(x))."""
    if isinstance(node, Node) and node.target in _RESHAPES:
        chain.append(node)
        node = node.args[0]
        if isinstance(node, Node) and node.target in (aten.clone.default, aten.expand.default):
            chain.append(node)
            node = node.args[0]
    return node


def _one(node: Any, target: Any) -> bool:
    return isinstance(node, Node) and node.target is target


def _softmax_input(p: Node, chain: list[Node]) -> Node | None:
    """s of p = softmax(s, -1), as _softmax or decomposed (amax/sub/exp/sum/div)."""
    if _one(p, aten._softmax.default) and p.args[1] in (-1, 3) and not p.args[2]:
        chain.append(p)
        return p.args[0]
    if not (_one(p, aten.div.Tensor) and _one(p.args[0], aten.exp.default)):
        return None
    e, total = p.args
    sub = e.args[0]
    if not (_one(total, aten.sum.dim_IntList) and total.args[0] is e):
        return None
    if not (_one(sub, aten.sub.Tensor) and _one(sub.args[1], aten.amax.default)):
        return None
    s, amax = sub.args
    if amax.args[0] is not s:
        return None
    chain += [p, e, total, sub, amax]
    return s


def _eager_site(node: Node, ctx: PassContext):
    """Match B (see the module docstring) rooted at the final view of `node`."""
    if node.target not in _RESHAPES or not _one(node.args[0], aten.bmm.default):
        return None
    chain: list[Node] = [node, node.args[0]]
    pv = node.args[0]
    v = _through_reshape(pv.args[1], chain)
    p = _through_reshape(pv.args[0], chain)
    cast_back = None
    if is_cast(p):
        cast_back, p = p, p.args[0]
        chain.append(cast_back)
    s = _softmax_input(p, chain) if isinstance(p, Node) else None
    if s is None:
        return None
    if is_cast(s):
        chain.append(s)
        s = s.args[0]
    mask = None
    if _one(s, aten.add.Tensor) and _one(s.args[0], aten.mul.Tensor):
        chain.append(s)
        s, mask = s.args
    if not _one(s, aten.mul.Tensor):
        return None
    qk, scale = s.args
    chain.append(s)
    if not (qk is not None and qk.target in _RESHAPES and _one(qk.args[0], aten.bmm.default)):
        return None
    chain += [qk, qk.args[0]]
    q = _through_reshape(qk.args[0].args[0], chain)
    kt = _through_reshape(qk.args[0].args[1], chain)
    swaps_last_two = (
        _one(kt, aten.transpose.int) and sorted(kt.args[1:]) in ([2, 3], [-2, -1])
    ) or (_one(kt, aten.permute.default) and list(kt.args[1]) == [0, 1, 3, 2])
    if not swaps_last_two:
        return None
    chain.append(kt)
    k = kt.args[0]
    if isinstance(scale, Node):
        ctx.report.reject(NAME, f"{node.name}: scale not constant")
        return None
    vals = [val(t) for t in (q, k, v)]
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in vals):
        return None
    if cast_back is not None and dtype_of(cast_back) != vals[0].dtype:
        ctx.report.reject(NAME, f"{node.name}: probabilities cast to another dtype")
        return None
    if val(node).shape != (*vals[0].shape[:3], vals[2].shape[-1]):
        return None
    return q, k, v, mask, float(scale), False, node, chain


def _sdpa_site(node: Node, ops: dict, ctx: PassContext):
    """(q, k, v, mask, scale, is_causal, anchor, matched) of an SDPA call, or None."""
    if node.target is aten.scaled_dot_product_attention.default:
        anchor, call = node, node
    elif node.target in ops:
        # The kernels return tuples; only the attention output may be read.
        users = list(node.users)
        if len(users) != 1 or users[0].args[1] != 0:
            ctx.report.reject(NAME, f"{node.name}: auxiliary outputs are read")
            return None
        anchor, call = users[0], node
    else:
        return None
    bound = normalize_function(
        call.target, call.args, call.kwargs, normalize_to_only_use_kwargs=True
    ).kwargs
    if bound.get("dropout_p", 0.0) not in (0, 0.0):
        ctx.report.reject(NAME, f"{call.name}: dropout")
        return None
    mask = bound.get("attn_mask", bound.get("attn_bias"))
    scale = bound.get("scale")
    if isinstance(scale, Node):
        ctx.report.reject(NAME, f"{call.name}: scale not constant")
        return None
    return (
        bound["query"],
        bound["key"],
        bound["value"],
        mask,
        scale,
        bool(bound.get("is_causal", False)),
        anchor,
        [anchor, call],
    )


# An additive mask value at or below this hides a key (see the module docstring).
_HIDES = -65504.0


def _scalar(gm: GraphModule, node: Any) -> float | None:
    """The value of a 0-d constant: a number, full([], v), scalar_tensor(v) or a folded one."""
    if isinstance(node, int | float):
        return float(node)
    if not isinstance(node, Node):
        return None
    value = None
    if node.op == "get_attr":
        value = getattr(gm, node.target, None)
    elif node.target is aten.full.default and list(node.args[0]) == []:
        value = node.args[1]
    elif node.target is aten.scalar_tensor.default:
        value = node.args[0]
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 and value.dim() == 0 else None
    return float(value) if isinstance(value, int | float) else None


def _keep_mask(gm: GraphModule, mask: Any) -> Node | None:
    """`keep` if `mask` is where(keep, 0, hidden) over a bool keep-mask, else None."""
    if not isinstance(mask, Node) or mask.target not in (
        aten.where.self,
        aten.where.ScalarSelf,
        aten.where.ScalarOther,
        aten.where.Scalar,
    ):
        return None
    keep, shown, hidden = mask.args[:3]
    kv, mv = val(keep), val(mask)
    if not (isinstance(kv, torch.Tensor) and kv.dtype == torch.bool):
        return None
    if not isinstance(mv, torch.Tensor) or tuple(kv.shape) != tuple(mv.shape):
        return None
    low = _scalar(gm, hidden)
    if _scalar(gm, shown) != 0.0 or low is None or not low <= _HIDES:
        return None
    return keep


def fuse_attention(gm: GraphModule, ctx: PassContext) -> int:
    ensure_ops()
    ops = _sdpa_ops()
    count = 0
    bool_masks = 0
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        site = _sdpa_site(node, ops, ctx)
        from_sdpa = site is not None
        site = site or _eager_site(node, ctx)
        if site is None:
            continue
        q, k, v, mask, scale, causal, anchor, matched = site
        qv = val(q)
        if not isinstance(qv, torch.Tensor) or qv.dim() != 4:
            ctx.report.reject(NAME, f"{anchor.name}: query is not [B, H, S, D]")
            continue
        k0, k_chain = _unrepeat(k, qv.shape[1])
        v0, v_chain = _unrepeat(v, qv.shape[1])
        if val(k0).shape[1] != val(v0).shape[1]:
            k0, v0, k_chain, v_chain = k, v, [], []
        keep = _keep_mask(gm, mask) if from_sdpa else None
        if keep is not None:
            mask = keep
            bool_masks += 1
        args = (q, k0, v0, mask, None if scale is None else float(scale), causal, None)
        fused = insert_call(gm, anchor, torch.ops.yirage.attention.default, args)
        anchor.replace_all_uses_with(fused)
        erase_dead(matched + k_chain + v_chain)
        refresh_layout(gm, [fused])
        count += 1
    if count:
        ctx.report.count_pattern(NAME, count)
        note_reference(ctx, "attention")
    if bool_masks:
        # The conversions left unused (shared by every layer of a whole graph) go in `dce`.
        ctx.report.count_pattern(NAME + "_bool_mask", bool_masks)
    return count
