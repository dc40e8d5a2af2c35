"""RMSNorm prologues and residual-add epilogues into the decode GEMVs (CUDA lowering).

A Llama decoder layer at decode time is, after lowering/cuda_gemv.py:

before:
    y1, h1 = yirage.rms_norm_residual(d0, h0, w_in, eps)     # Inductor: 1 kernel
    q, k, v = yirage_cuda.gemv3(view(y1), Wq, Wk, Wv, ...)
    ... rotary, KV-cache write, attention ...
    o = yirage_cuda.gemv(view(attn), Wo, None, ...)
    y2, h2 = yirage.rms_norm_residual(view(o), h1, w_post, eps)  # Inductor: 1 kernel
    a = yirage_cuda.gemv_gated(view(y2), Wg, Wu, ...)
    d1 = yirage_cuda.gemv(a, Wd, None, ...)                  # next layer's d0
after:
    q, k, v = yirage_cuda.gemv3(view(h1), Wq, Wk, Wv, ..., norm_weight=w_in, eps=eps)
    ...
    h2 = view(yirage_cuda.gemv(view(attn), Wo, None, ..., residual=view(h1)))
    a = yirage_cuda.gemv_gated(view(h2), Wg, Wu, ..., norm_weight=w_post, eps=eps)
    h3 = view(yirage_cuda.gemv(a, Wd, None, ..., residual=view(h2)))

Two launches fewer per layer (the norm kernels): in a decode step on a GPU each small
kernel costs a few microseconds of launch ramp and tail inside the CUDA graph, more than
its work. The GEMV prologue costs nothing extra: the normalised row is a per-row scalar
(1/rms) times x * w_norm, so the scalar is applied once to the finished dot products and
sum(x^2) is accumulated from the x tiles the kernel loads anyway.

Numerics: the unfused graph rounds the normalised row to bf16/fp16 before the GEMV; the
fused kernel does not (one rounding, at the output), like Inductor's own fused kernels.
The skip add is rounded exactly as the unfused graph rounds it.

When: with `Options.cuda_kernels="all"` (every yirage kernel), or `YIRAGE_CUDA_GEMV_FUSE=on`;
not by default ("auto" uses what measured faster). The fused launches get configs measured
for the fused kernels themselves (`retune_fused`): at the plain kernels' configs the 7B
GEMV time grew 4.40 -> 4.84 ms/token, with their own 4.39 -> 4.51, which about cancels
the two norm kernels per layer it removes (~0.14 ms/token). Measured on an H100 (7B
decode, benchmarks/RESULTS.md): GPU busy 5.31 -> 5.27 ms/token, end to end +1.7% in
an interleaved comparison whose rounds range -4%..+3%: within noise, so still opt-in.
Until the twentieth session it fused only whole graphs (frozen get_attr weights), so in
regional pieces, the default, it did nothing; now it fuses there too, and on an H200 the
step is the same either way (1B 0.910 -> 0.909 ms, 7B 3.884 -> 3.894: the GEMVs' +7% eats
the norms it removes, and the residual add at each piece's start stays an ATen add).
`YIRAGE_CUDA_GEMV_FUSE=off` disables it everywhere.
"""

from __future__ import annotations

import operator
import os

import torch
from torch.fx import GraphModule, Node
from yirage_dynamo.passes.context import PassContext, set_fake_val

from .cuda_gemv import (
    _cfg,
    _erase_dead_chain,
    _gemv_candidates,
    _gemv_dims,
    _is_view,
    _sibling_weights,
    _weight_value,
)
from .cuda_ops import _args, _kernels, _val
from .cuda_timing import Tuner, disjoint_groups, rand, rotation_groups, time_rotating

FUSE_ENV = "YIRAGE_CUDA_GEMV_FUSE"


def _is_op(node: object, namespace: str, name: str) -> bool:
    return (
        isinstance(node, Node)
        and node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == namespace
        and node.target._opname == name
    )


def _is_full_slice(node: object) -> bool:
    """aten.slice that keeps every element (HF's `h[:, -1:]` of a one-token step)."""
    if not (_is_op(node, "aten", "slice") and node.target._overloadname == "Tensor"):
        return False
    a, out = _val(node.args[0]), _val(node)
    step = node.args[4] if len(node.args) > 4 else 1
    return (
        isinstance(a, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and step == 1
        and tuple(a.shape) == tuple(out.shape)
    )


def _source(node: Node) -> Node:
    """Walk up single-user reshapes and full slices to the tensor they view."""
    while (_is_view(node) or _is_full_slice(node)) and len(node.users) == 1:
        node = node.args[0]
    return node


def _norm_of(src: Node) -> Node | None:
    """The yirage.rms_norm / rms_norm_residual node whose normalised output `src` is."""
    if _is_op(src, "yirage", "rms_norm"):
        return src
    if src.op == "call_function" and src.target is operator.getitem and src.args[1] == 0:
        if _is_op(src.args[0], "yirage", "rms_norm_residual"):
            return src.args[0]
    return None


def _stream_val(rn: Node) -> torch.Tensor | None:
    """Value of h = residual + x of a rms_norm_residual node when it is a plain add of two
    tensors of one dtype and shape (what the prologue form needs)."""
    xv, rv = _val(rn.args[0]), _val(rn.args[1])
    if not (isinstance(xv, torch.Tensor) and isinstance(rv, torch.Tensor)):
        return None
    if xv.dtype != rv.dtype or tuple(xv.shape) != tuple(rv.shape) or not xv.is_contiguous():
        return None
    return xv


def _residual_stream(gm: GraphModule, rn: Node) -> Node:
    """h = residual + x of a rms_norm_residual node as a plain add (inserted after it),
    the users of its residual output re-pointed there."""
    x, res = rn.args[0], rn.args[1]
    with gm.graph.inserting_after(rn):
        h = gm.graph.call_function(torch.ops.aten.add.Tensor, (res, x))
    set_fake_val(gm, h)
    for user in list(rn.users):
        if user.target is operator.getitem and user.args[1] == 1:
            user.replace_all_uses_with(h)
            gm.graph.erase_node(user)
    return h


def fuse_norm_prologues(gm: GraphModule, ctx: PassContext) -> int:
    """gemv*(view(rms_norm(h, w, eps))) -> gemv*(view(h), norm_weight=w, eps=eps)."""
    count = 0
    streams: dict[Node, Node] = {}
    for g in list(gm.graph.nodes):
        if not _fusible_gemv(gm, g, ctx) or "norm_weight" in g.kwargs:
            continue
        src = _source(g.args[0])
        rn = _norm_of(src)
        if rn is None:
            continue
        a = _args(rn)
        w, eps = a["weight"], a["eps"]
        with_residual = rn.target._opname == "rms_norm_residual"
        xv = _val(g.args[0])
        wv = _val(w) if isinstance(w, Node) else w
        hv = _stream_val(rn) if with_residual else _val(rn.args[0])
        why = None
        if len(src.users) != 1:
            why = "the normalised row has other users"
        elif not isinstance(wv, torch.Tensor) or tuple(wv.shape) != (xv.shape[-1],):
            why = "norm weight is not a [K] tensor"
        elif wv.stride(0) != 1 or not isinstance(eps, float):
            why = "norm weight is strided or eps is not a float"
        elif not isinstance(hv, torch.Tensor) or hv.dtype != xv.dtype:
            why = "norm input is not of the GEMV's dtype"
        elif hv.numel() != xv.numel() or not hv.is_contiguous():
            why = "norm input is not a dense [M, K] row block"
        if why is not None:
            ctx.report.reject("gemv_norm_prologue", f"{g.name}: {why}")
            continue
        if not with_residual:
            h = rn.args[0]
        else:
            if rn not in streams:
                streams[rn] = _residual_stream(gm, rn)
            h = streams[rn]
        with gm.graph.inserting_before(g):
            x2 = gm.graph.call_function(torch.ops.aten.view.default, (h, list(xv.shape)))
        set_fake_val(gm, x2)
        old_x = g.args[0]
        g.args = (x2, *g.args[1:])
        g.kwargs = {**g.kwargs, "norm_weight": w, "eps": eps}
        g.meta["yirage_fused"] = [*g.meta.get("yirage_fused", []), f"rms_norm:{rn.name}"]
        _erase_dead_chain(gm, old_x)  # the views, the normalised output and the norm itself
        count += 1
    if count:
        ctx.report.count_pattern("gemv_norm_prologue", count)
    return count


def fuse_residual_epilogues(gm: GraphModule, ctx: PassContext) -> int:
    """add(r, view(gemv(x, W))) -> view(gemv(x, W, residual=view(r)))."""
    count = 0
    aten = torch.ops.aten
    for add in list(gm.graph.nodes):
        if add.op != "call_function" or add.target is not aten.add.Tensor or add.kwargs:
            continue
        if len(add.args) != 2 or not all(isinstance(a, Node) for a in add.args):
            continue
        for gi in (1, 0):
            src = _source(add.args[gi])
            r = add.args[1 - gi]
            if (
                _is_op(src, "yirage_cuda", "gemv")
                and _fusible_gemv(gm, src, ctx)
                and len(src.users) == 1
            ):
                break
        else:
            continue
        g = src
        if "residual" in g.kwargs:
            continue
        yv, rv, av = _val(g), _val(r), _val(add)
        if not all(isinstance(t, torch.Tensor) for t in (yv, rv, av)):
            continue
        if not (rv.dtype == yv.dtype == av.dtype and rv.numel() == yv.numel() == av.numel()):
            continue
        if tuple(rv.shape) != tuple(av.shape) or not rv.is_contiguous():
            continue
        with gm.graph.inserting_before(add):
            r2 = gm.graph.call_function(aten.view.default, (r, list(yv.shape)))
            new = gm.graph.call_function(g.target, g.args, {**g.kwargs, "residual": r2})
            out = gm.graph.call_function(aten.view.default, (new, list(av.shape)))
        for n in (r2, new, out):
            set_fake_val(gm, n)
        new.meta.update({k: v for k, v in g.meta.items() if k != "val"})
        new.meta["yirage_fused"] = [*g.meta.get("yirage_fused", []), f"add:{add.name}"]
        old = add.args[gi]
        add.replace_all_uses_with(out)
        gm.graph.erase_node(add)
        _erase_dead_chain(gm, old)  # the views and the unfused gemv
        count += 1
    if count:
        ctx.report.count_pattern("gemv_residual_epilogue", count)
    return count


# Weights per launch, and where (block_n, block_k, num_warps) sit in the positional args.
_WEIGHTS = {"gemv": 1, "gemv_gated": 2, "gemv3": 3}
_CFG_AT = {"gemv": 3, "gemv_gated": 4, "gemv3": 4}


def _fusible_gemv(gm: GraphModule, g: Node, ctx: PassContext) -> bool:
    """A GEMV launch whose weights are known tensors (needed to retune it): frozen
    constants (get_attr) of a whole graph, or the parameter inputs of a regional piece
    that every layer calls. Regional compilation is the default, and with get_attr alone
    nothing fused there: `YIRAGE_CUDA_GEMV_FUSE=on` left the 1B step's 30 norm kernels."""
    if not any(_is_op(g, "yirage_cuda", op) for op in _WEIGHTS):
        return False
    ws = g.args[1 : 1 + _WEIGHTS[g.target._opname]]
    return all(_weight_value(gm, w, ctx) is not None for w in ws)


def _weights(gm: GraphModule, g: Node, ctx: PassContext) -> tuple[torch.Tensor, ...]:
    """The weight tensors (W^T) a GEMV launch reads."""
    ws = g.args[1 : 1 + _WEIGHTS[g.target._opname]]
    return tuple(_weight_value(gm, w, ctx) for w in ws)


def _signature(reals: tuple[torch.Tensor, ...], name: str) -> tuple:
    return (name, tuple((tuple(w.shape), w.stride()) for w in reals), reals[0].dtype)


def retune_fused(gm: GraphModule, ctx: PassContext) -> int:
    """Measure configs for the fused GEMVs themselves, per shape (cached like the others).

    The configs picked for the plain kernels cost the fused ones ~10% (4.40 -> 4.84 ms of
    GEMV per 7B token, RESULTS.md): the prologue's extra loads and the epilogue's change
    which (block_n, block_k, warps) streams best. Returns how many launches got a config.
    """
    k_ = _kernels()
    tuner = Tuner(ctx)
    fused = [g for g in gm.graph.nodes if g.meta.get("yirage_fused") and _fusible_gemv(gm, g, ctx)]
    # Same-shape weight groups for the rotation that defeats L2 (as in cuda_gemv): each
    # launch reads a different layer's weights, as the model does. A regional piece holds
    # one layer's: the other layers' come from the pieces' sibling inputs.
    weights = {g: _weights(gm, g, ctx) for g in fused}
    pools: dict[tuple, dict[tuple[int, ...], tuple[torch.Tensor, ...]]] = {}
    for g, reals in weights.items():
        pool = pools.setdefault(_signature(reals, g.target._opname), {})
        for ws in [reals, *disjoint_groups([_sibling_weights(r, list(reals)) for r in reals])]:
            # Keyed by address: two launches of one shape share their siblings.
            pool.setdefault(tuple(w.data_ptr() for w in ws), ws)
    for g, reals in weights.items():
        name = g.target._opname
        nw = len(reals)
        m, kk = _val(g.args[0]).shape
        n_max = max(r.shape[1] for r in reals)
        dtype = reals[0].dtype
        extra = tuple(g.args[1 + nw : _CFG_AT[name]])  # bias (gemv) / act (gemv_gated)
        pool = list(pools[_signature(reals, name)].values())

        def launches(
            cfg, g=g, m=m, kk=kk, n=n_max, dtype=dtype, nw=nw, pool=pool, name=name, extra=extra
        ):
            xs = rand((m, kk), dtype)
            kw: dict = {}
            if "norm_weight" in g.kwargs:
                kw.update(norm_weight=rand((kk,), dtype), eps=1e-6)
            if "residual" in g.kwargs:
                kw["residual"] = rand((m, n), dtype)
            if name == "gemv" and extra[0] is not None:
                extra = (rand((n,), dtype),)
            groups = rotation_groups([tuple(ws) for ws in pool])
            fn = getattr(k_, name)
            return [(lambda ws=ws: fn(xs, *ws, *extra, *_cfg(cfg), **kw)) for ws in groups]

        ns = "-".join(str(r.shape[1]) for r in reals)
        flags = {
            "norm": int("norm_weight" in g.kwargs),
            "res": int("residual" in g.kwargs),
            "bias": int(name == "gemv" and extra[0] is not None),
            "act": extra[0] if name == "gemv_gated" else "-",
        }
        dims = _gemv_dims(m, ns, kk, dtype, **flags)
        cands = _gemv_candidates(n_max, kk, gated=name == "gemv_gated")
        cfg = tuner.pick(
            f"{name}_fused",
            dims,
            cands,
            lambda launches=launches: lambda c: time_rotating(launches(c)),
        )
        at = _CFG_AT[name]
        g.args = (*g.args[:at], *_cfg(cfg), *g.args[at + 3 :])
    return len(fused)


def fuse_gemv_neighbours(gm: GraphModule, ctx: PassContext) -> int:
    """Both rewrites, prologues first (they turn norms into the adds the epilogues take),
    then the fused launches' own config search."""
    env = os.environ.get(FUSE_ENV, "").strip().lower()
    if env in ("off", "0", "none") or (
        env not in ("on", "1", "all") and ctx.options.cuda_kernels != "all"
    ):
        return 0
    n = fuse_norm_prologues(gm, ctx) + fuse_residual_epilogues(gm, ctx)
    if n:
        ctx.report.count_pattern("gemv_fused_retuned", retune_fused(gm, ctx))
        gm.graph.lint()
        gm.recompile()
    return n
