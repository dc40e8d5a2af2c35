"""RMSNorm (Llama/Qwen2/Mistral/Phi-3 and Gemma styles) -> yirage::rms_norm[_residual].

Matches (what AOTAutograd emits for HF `LlamaRMSNorm`; casts absent in fp32 graphs):

    xf   = _to_copy(x, dtype=f32)                  # only when x is not fp32
    var  = mean.dim(pow.Tensor_Scalar(xf, 2) | mul(xf, xf), [-1], True)
         | div(sum.dim_IntList(<same square>, [-1], True), H)          # decomposed mean
    r    = rsqrt(add.Tensor(var, eps))             # eps: a Python float
    y    = mul(xf, r)                              # either operand order
    Llama: out = mul(w, _to_copy(y, dtype=x.dtype))   (w [H]; either order; cast only if x≠f32)
    Gemma: out = _to_copy(mul(y, w32), dtype=x.dtype) (w32 = fp32 (1 + w), folded when frozen)

Rewrite:
    out = yirage.rms_norm(x, w, eps, weight_fp32)
and, when x = add(residual, h) also feeds later nodes (the residual stream):
    out, x' = yirage.rms_norm_residual(h, residual, w, eps, weight_fp32); uses of x -> x'

Rejected (reported): eps not a constant, reduction not over the last dim, a norm computed
in reduced precision (no cast to fp32), an intermediate with users outside the pattern.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .context import PassContext
from .pattern_utils import (
    dtype_of,
    ensure_ops,
    erase_dead,
    getitems,
    insert_call,
    is_cast,
    last_dim_is,
    lazy_patterns,
    match,
    note_reference,
    placement,
    refresh_layout,
    replace_and_erase,
    val,
)

aten = torch.ops.aten
NAME = "rms_norm"


@lazy_patterns
def _patterns() -> list:
    from .pattern_expr import CallFunction, KeywordArg

    x, eps, dims = KeywordArg("x"), KeywordArg("eps"), KeywordArg("dims")
    squares = [
        CallFunction(aten.pow.Tensor_Scalar, x, 2),
        CallFunction(aten.mul.Tensor, x, x),
    ]
    out = []
    for sq in squares:
        means = [
            CallFunction(aten.mean.dim, sq, dims, True),
            # A decomposed mean: sum(sq, dims, True) / H (checked against H in _rewrite).
            CallFunction(
                aten.div.Tensor,
                CallFunction(aten.sum.dim_IntList, sq, dims, True),
                KeywordArg("count"),
            ),
        ]
        for mean in means:
            r = CallFunction(aten.rsqrt.default, CallFunction(aten.add.Tensor, mean, eps))
            out.append(CallFunction(aten.mul.Tensor, x, r))
            out.append(CallFunction(aten.mul.Tensor, r, x))
    return out


def _weight_of(mul: Node, other: Node, hidden: int) -> Node | None:
    """The [H] weight operand of `mul` (the operand that is not `other`)."""
    if mul.target is not aten.mul.Tensor or len(mul.args) != 2 or mul.kwargs:
        return None
    a, b = mul.args
    w = b if a is other else a if b is other else None
    wv = val(w)
    if not isinstance(wv, torch.Tensor) or wv.dim() != 1 or wv.shape[0] != hidden:
        return None
    return w


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def extra_check(m) -> str | None:
    """Why a core match (x * rsqrt(mean(x^2) + eps)) is not an RMSNorm to fuse, or None."""
    eps, dims, xf = m.kwargs["eps"], m.kwargs["dims"], m.kwargs["x"]
    if isinstance(eps, Node) or not isinstance(eps, float | int):
        return "eps not constant"
    xv = val(xf)
    if not isinstance(xv, torch.Tensor) or not last_dim_is(dims, xv.dim()):
        return "reduction is not over the last dim"
    count = m.kwargs.get("count", xv.shape[-1])
    if isinstance(count, Node) or count != xv.shape[-1]:
        return "sum is not divided by the hidden size"
    if xv.dtype != torch.float32:
        return f"computed in {xv.dtype}, not fp32"
    return None


def _rewrite(gm: GraphModule, ctx: PassContext, m, y: Node) -> bool:
    why = extra_check(m)
    if why is not None:
        ctx.report.reject(NAME, f"{y.name}: {why}")
        return False
    eps, xf = m.kwargs["eps"], m.kwargs["x"]
    xv = val(xf)
    x = xf.args[0] if is_cast(xf) else xf
    in_dtype = dtype_of(x)
    hidden = xv.shape[-1]
    matched = list(m.nodes) + ([xf] if xf is not x else [])
    weight, weight_fp32, out = None, False, y
    user = _only_user(y)
    if user is not None and is_cast(user) and dtype_of(user) == in_dtype:
        # Llama: weight * y.to(x.dtype)
        out = user
        matched.append(user)
        nxt = _only_user(user)
        w = _weight_of(nxt, user, hidden) if nxt is not None else None
        if w is not None:
            weight, out = w, nxt
            matched.append(nxt)
    elif user is not None and (w := _weight_of(user, y, hidden)) is not None:
        # Gemma: (y * w.float()).to(x.dtype), or fp32 Llama without casts.
        after = _only_user(user)
        if dtype_of(w) == torch.float32 and after is not None and is_cast(after):
            if dtype_of(after) == in_dtype:
                weight, weight_fp32, out = w, True, after
                matched += [user, after]
        elif in_dtype == torch.float32:
            weight, out = w, user
            matched.append(user)
    if in_dtype != torch.float32 and out is y:
        ctx.report.reject(NAME, f"{y.name}: no cast back to {in_dtype} after the norm")
        return False
    args = (weight, float(eps), weight_fp32)
    residual = _residual_add(x, matched)
    if residual is not None:
        res, h = residual.args
        where, why = placement(gm, [h, res, weight], [out, x], matched)
        if where is None:
            residual = None
            ctx.report.reject(f"{NAME}.residual", why)
    if residual is not None:
        fused = insert_call(gm, where, torch.ops.yirage.rms_norm_residual.default, (h, res, *args))
        normed, new_res = getitems(gm, fused, 2)
        replace_and_erase(out, normed, matched)
        erase_dead(matched)
        x.replace_all_uses_with(new_res)
        gm.graph.erase_node(x)
        refresh_layout(gm, [normed, new_res])
        ctx.report.count_pattern(f"{NAME}.residual_fused")
        note_reference(ctx, "rms_norm_residual")
    else:
        node = insert_call(gm, out, torch.ops.yirage.rms_norm.default, (x, *args))
        replace_and_erase(out, node, matched)
        refresh_layout(gm, [node])
        note_reference(ctx, "rms_norm")
    return True


def _residual_add(x: Node, matched: list[Node]) -> Node | None:
    """x = add(residual, h) whose sum is also read elsewhere (the residual stream)."""
    if x.op != "call_function" or x.target is not aten.add.Tensor or x.kwargs:
        return None
    if len(x.args) != 2 or not all(isinstance(a, Node) for a in x.args):
        return None
    if not any(u not in matched for u in x.users):
        return None  # nothing else reads the sum: plain norm of a fused add is enough
    xv = val(x)
    for a in x.args:
        av = val(a)
        if not isinstance(av, torch.Tensor) or av.shape != xv.shape or av.dtype != xv.dtype:
            return None
    return x


def fuse_rms_norm(gm: GraphModule, ctx: PassContext) -> int:
    ensure_ops()
    count = 0
    for node in reversed(list(gm.graph.nodes)):
        if node._erased or node.target is not aten.mul.Tensor:
            continue
        for pattern in _patterns():
            m = match(pattern, node)
            if m is not None:
                count += _rewrite(gm, ctx, m, node)
                break
    if count:
        ctx.report.count_pattern(NAME, count)
    return count
