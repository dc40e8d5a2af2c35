"""Decode GEMVs on CUDA: `yirage_cuda::gemv` / `gemv3` / `gemv_gated` for decode-shaped
projections (part of the CUDA lowering's op substitution, lowering/cuda_ops.py).

before:                                          after:
    y = aten.mm(x, t(W))     x [M <= 4, K]           y = yirage_cuda.gemv(x, W^T, None, bn, bk, w)
    q, k, v = mm(x, t(Wq)), mm(x, t(Wk)), ...        q, k, v = yirage_cuda.gemv3(x, ...)  (1 launch)
    a = gated_act(mm(x, t(Wg)), mm(x, t(Wu)))        a = yirage_cuda.gemv_gated(x, ...)  (1 launch)

W must be an nn.Linear weight, fp16/bf16: a frozen constant (get_attr), or, in a decoder
layer compiled once for every layer (yirage_dynamo/regional.py), the transpose of a
parameter input. Each shape is measured against cuBLAS on this GPU's own weights
(`cuda_kernels="auto"`), rotating through the other layers' copies, and cached. The
candidates of every uncached shape (and the decode attention's) are compiled first, all at
once in forked children (lowering/triton_pool.py): a cold 7B search compiled 22 kernels in
1.6 s, not ~5 s.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node
from yirage_dynamo.passes.context import PassContext, set_fake_val

from .cuda_ops import _ACTS, _args, _kernels, _static, _val
from .cuda_pdl import PDL_ENV, pdl_mode
from .cuda_timing import (
    MAX_ROTATION,
    Tuner,
    disjoint_groups,
    rand,
    rotation,
    rotation_groups,
    time_rotating,
)

# Decode-shaped matmuls: mm(x[M, K], t(W)) / addmm(b, x, t(W)) with M (batch x 1 token) at
# most this, W an nn.Linear weight [N, K]. Larger M is a GEMM: cuBLAS's job.
GEMV_MAX_M = 4
_GEMV_DTYPES = (torch.float16, torch.bfloat16)
# Benchmark/debug override of the GEMV decision: "on" (always where eligible, as with
# cuda_kernels="all"), "off" (never), unset or "auto": what Options.cuda_kernels says.
GEMV_ENV = "YIRAGE_CUDA_GEMV"
_VIEWS = ("view.default", "_unsafe_view.default", "reshape.default")
_GEMV_DEVICE = "cuda"


# (block_n, block_k, num_warps). Measured on an H200 (benchmarks/bench_gemv.py, a sweep of
# 27 configs over the Llama-7B/1B shapes): 4x2048/w4 is within 3.5% of the best everywhere
# but the gated kernel, whose two accumulators want shorter K tiles.
_GEMV_CONFIGS = ((4, 2048, 4), (4, 512, 4), (8, 512, 4), (1, 2048, 4), (2, 2048, 4), (8, 2048, 8))
_GEMV_GATED_CONFIGS = ((4, 512, 4), (8, 512, 4), (16, 256, 4), (8, 1024, 8))


def _gemv_candidates(n: int, k: int, gated: bool = False) -> list[dict[str, Any]]:
    """Configs to measure; the first is the unmeasured default. Each distinct config costs
    one Triton compile (~0.3 s) shared by all shapes."""
    bn_max = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    bk_max = max(64, 1 << max(0, math.ceil(math.log2(max(k, 1)))))
    out: list[dict[str, Any]] = []
    for bn, bk, nw in _GEMV_GATED_CONFIGS if gated else _GEMV_CONFIGS:
        c = {"block_n": min(bn, bn_max), "block_k": min(bk, bk_max), "num_warps": nw}
        if c not in out:
            out.append(c)
    return [{"impl": "triton", **c} for c in out]


def _is_view(node: Any) -> bool:
    return (
        isinstance(node, Node)
        and node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == "aten"
        and f"{node.target._opname}.{node.target._overloadname}" in _VIEWS
    )


def _strip_views(node: Any) -> Any:
    while _is_view(node) and len(node.users) == 1:
        node = node.args[0]
    return node


def _weight_value(gm: GraphModule, w: Any, ctx: PassContext | None) -> torch.Tensor | None:
    """The real W^T a GEMV would read: a frozen constant (get_attr), or the transpose of
    a parameter input (an unfrozen graph: a regional piece that every layer calls)."""
    if not isinstance(w, Node):
        return None
    if w.op == "get_attr":
        real = getattr(gm, w.target, None)
        return real if isinstance(real, torch.Tensor) else None
    aten = torch.ops.aten
    transposed = w.target is aten.t.default or (
        w.target is aten.permute.default and list(w.args[1]) == [1, 0]
    )
    if not transposed or ctx is None or ctx.real_inputs is None:
        return None
    index = _parameter_index(gm, w)
    real = ctx.real_inputs[index] if index is not None and index < len(ctx.real_inputs) else None
    if not isinstance(real, torch.nn.Parameter) or index in ctx.mutated_inputs:
        return None
    return real.detach().t()


def _parameter_index(gm: GraphModule, w: Node) -> int | None:
    """Input position of the parameter that `w` (a transpose of a placeholder) views."""
    p = w.args[0] if w.args else None
    if not isinstance(p, Node) or p.op != "placeholder":
        return None
    return [n for n in gm.graph.nodes if n.op == "placeholder"].index(p)


def _sibling_weights(real: torch.Tensor, own: list[torch.Tensor]) -> list[torch.Tensor]:
    """Other weights of `real`'s shape and layout in the model (not in `own`), when this
    graph is one piece of a regionally compiled model (yirage_dynamo/regional.py): the
    measurement rotates through them, as the whole model's GEMVs do, instead of through
    temporary copies."""
    from yirage_dynamo.regional import SIBLING_INPUTS

    out: list[torch.Tensor] = []
    seen = {real.data_ptr(), *(t.data_ptr() for t in own)}
    for inputs in SIBLING_INPUTS.get():
        for t in inputs:
            if not isinstance(t, torch.nn.Parameter) or t.dim() != 2:
                continue
            t = t.detach().t()
            same = t.shape == real.shape and t.dtype == real.dtype and t.stride() == real.stride()
            if same and t.device == real.device and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                out.append(t)
                if len(out) >= MAX_ROTATION:
                    return out
    return out


def _gemv_operands(
    gm: GraphModule, node: Node, ctx: PassContext | None = None
) -> tuple[Node, Node, Any, torch.Tensor] | str:
    """(x, w_t, bias, real w_t) of an eligible decode-shaped mm/addmm node, or why not."""
    aten = torch.ops.aten
    if node.target is aten.mm.default and len(node.args) == 2 and not node.kwargs:
        bias, (x, w) = None, node.args
    elif node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        bias, x, w = node.args
    else:
        return "not a plain mm/addmm"
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or xv.device.type != _GEMV_DEVICE:
        return "input is not a CUDA tensor"
    if xv.dtype not in _GEMV_DTYPES:
        return "input is not fp16/bf16"
    if xv.dim() != 2 or not _static(*xv.shape):
        return "input is not a static 2-D tensor"
    m, k = xv.shape
    if m > GEMV_MAX_M:
        return f"M={m} > {GEMV_MAX_M} (a GEMM)"
    real = _weight_value(gm, w, ctx)
    if real is None:
        return "weight is neither a frozen constant nor the transpose of a parameter"
    if real.device.type != _GEMV_DEVICE or real.dim() != 2:
        return "weight is not a 2-D CUDA constant"
    if real.dtype != xv.dtype or real.shape[0] != k:
        return "weight dtype/shape differs"
    if real.stride(0) != 1:
        return "weight is not the transpose of a row-major [N, K] matrix"
    if bias is not None:
        bv = _val(bias)
        n = real.shape[1]
        if not (isinstance(bv, torch.Tensor) and bv.dtype == xv.dtype and tuple(bv.shape) == (n,)):
            return "bias is not a 1-D [N] tensor of the input dtype"
        if bv.stride(0) != 1:
            return "bias is not contiguous"
    return x, w, bias, real


def _ops(pdl: bool) -> dict[str, Any]:
    """kernel name -> the op a site launches: the traced triton_op, or its opaque
    PDL twin (lowering/triton_gemv.py)."""
    k_ = _kernels()
    if pdl:
        return {"gemv": k_.gemv_pdl, "gemv3": k_.gemv3_pdl, "gemv_gated": k_.gemv_gated_pdl}
    return {"gemv": k_.gemv, "gemv3": k_.gemv3, "gemv_gated": k_.gemv_gated}


def _gemv_mode(ctx: PassContext) -> str:
    import os

    env = os.environ.get(GEMV_ENV, "").strip().lower()
    if env in ("on", "all", "1"):
        return "all"
    if env in ("off", "none", "0"):
        return "none"
    return ctx.options.cuda_kernels


@dataclasses.dataclass
class _Site:
    """One decode matmul, or a group of them for one launch, to choose a kernel for.
    `ours(cfg)` / `baseline()`: the calls to time, one per weight (group) in the rotation."""

    kernel: str  # "gemv", "gemv_gated" or "gemv3"
    dims: dict[str, Any]
    n: int
    k: int
    ours: Callable[[Mapping[str, Any]], list[Callable[[], Any]]]
    baseline: Callable[[], list[Callable[[], Any]]]

    def candidates(self, mode: str) -> list[dict[str, Any]]:
        """Measured triton configs, plus (in "auto") the ATen baseline, which wins when
        it is faster."""
        cands = _gemv_candidates(self.n, self.k, gated=self.kernel == "gemv_gated")
        return [{"impl": "aten"}, *cands] if mode == "auto" else cands

    def key_dims(self, mode: str) -> dict[str, Any]:
        return {**self.dims, "vs": "aten" if mode == "auto" else "-"}


def _pick_gemv(tuner: Tuner, mode: str, site: _Site) -> dict[str, Any]:
    def make_bench():
        def bench(cfg: Mapping[str, Any]) -> float:
            return time_rotating(site.baseline() if cfg["impl"] == "aten" else site.ours(cfg))

        return bench

    return tuner.pick(site.kernel, site.key_dims(mode), site.candidates(mode), make_bench)


def _precompile(
    tuner: Tuner,
    mode: str,
    sites: list[_Site],
    report: Any,
    also: Sequence[tuple[str, list[Callable[[], Any]]]] = (),
) -> None:
    """Compile the Triton candidates of every site whose config is not cached, all at once
    in forked children (lowering/triton_pool.py), before any is measured: a cold search
    otherwise compiles them one after another. `also`: other kernels' (shape key,
    candidate calls) for the same round (the decode attention's), marked as compiled."""
    from .triton_pool import precompile_calls

    calls = [
        site.ours(cfg)[0]
        for site in sites
        if not tuner.cached(site.kernel, site.key_dims(mode))
        for cfg in site.candidates(mode)
        if cfg["impl"] == "triton"
    ]
    if not calls:  # nothing of ours to search: the other kernels compile in their own round
        return
    with report.stage("gemv_precompile"):
        done = len(precompile_calls([*calls, *(c for _, cs in also for c in cs)]))
    tuner.precompiled.update(key for key, _ in also)
    if done:
        tuner.stats["precompiled"] = tuner.stats.get("precompiled", 0) + done


def _gemv_dims(m: int, n: int, k: int, dtype: torch.dtype, **extra: Any) -> dict[str, Any]:
    return {"m": m, "n": n, "k": k, "dt": str(dtype)[6:], **extra}


def _replace(
    gm: GraphModule, old: Node, op: Any, args: tuple, origin: list[str]
) -> tuple[Node, Any]:
    from yirage_dynamo.report import KernelRecord

    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(op, args)
    set_fake_val(gm, new)
    new.meta["yirage_origin"] = origin[0]
    return new, KernelRecord(op._opname, "cuda", None, origin)


def substitute_gemv(
    gm: GraphModule,
    ctx: PassContext,
    also_precompile: Sequence[tuple[str, list[Callable[[], Any]]]] = (),
) -> int:
    """Swap decode-shaped mm/addmm nodes for `yirage_cuda::gemv`, and a gated activation of
    two such GEMVs sharing their input for `yirage_cuda::gemv_gated` (one pass over both
    weights, activation in the epilogue: no intermediate tensors, two fewer launches).

    before:  g = mm(x, _view_0); u = mm(x, _view_1); a = yirage.gated_act(view(g), view(u))
             o = mm(view(a), _view_2)
    after:   a = view(yirage_cuda.gemv_gated(x, _view_0, _view_1, 0, 4, 512, 4))
             o = yirage_cuda.gemv(view(a), _view_2, None, 4, 512, 4)

    Options.cuda_kernels "all": wherever eligible; "auto": where it measured faster than
    the ATen ops it replaces (cuBLAS), per (M, N, K, dtype) on this GPU, cached; "none": never.
    """
    mode = _gemv_mode(ctx)
    if mode == "none" or not torch.cuda.is_available():
        return 0
    aten = torch.ops.aten
    mms = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in (aten.mm.default, aten.addmm.default)
    ]
    if not mms:
        return 0
    tuner = Tuner(ctx)
    report = ctx.report
    pdl = pdl_mode() != "off"
    kernel_ops = _ops(pdl)
    if pdl:
        report.notes.append(f"GEMVs: programmatic dependent launch ({PDL_ENV}={pdl_mode()})")
    # Same-shape weights of this graph: what the measurements rotate through.
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    ops: dict[Node, tuple] = {}
    for node in mms:
        got = _gemv_operands(gm, node, ctx)
        if isinstance(got, str):
            if "GEMM" not in got:
                report.reject("triton_gemv", f"{node.name}: {got}; ATen runs")
            continue
        ops[node] = got
        by_shape.setdefault((tuple(got[3].shape), got[3].dtype), []).append(got[3])
    for same in by_shape.values():
        same.extend(_sibling_weights(same[0], same))

    gated = _gated_sites(gm, ops, by_shape, kernel_ops)
    taken = {mm for g in gated for mm in g[1][:2]}
    groups = _gemv3_sites({n: op for n, op in ops.items() if n not in taken}, kernel_ops)
    taken |= {n for nodes, _ in groups for n in nodes}
    plain = {node: _gemv_site(op, by_shape, kernel_ops) for node, op in ops.items()}
    sites = [g[2] for g in gated] + [s for _, s in groups]
    rest = [s for n, s in plain.items() if n not in taken]
    _precompile(tuner, mode, sites + rest, report, also_precompile)

    swapped = 0
    for node, (g_mm, u_mm, xg, wg, wu, act, gv), site in gated:
        cfg = _pick_gemv(tuner, mode, site)
        if cfg["impl"] != "triton":
            report.reject("triton_gemv_gated", f"{node.name}: ATen measured faster")
            continue
        op = _default(kernel_ops["gemv_gated"])
        new, rec = _replace(gm, node, op, (xg, wg, wu, _ACTS[act], *_cfg(cfg)), [node.name])
        with gm.graph.inserting_before(node):
            view = gm.graph.call_function(aten.view.default, (new, list(gv.shape)))
        set_fake_val(gm, view)
        a = _args(node)  # before the erase clears its args
        chains = (a["gate"], a["up"])
        node.replace_all_uses_with(view)
        gm.graph.erase_node(node)
        for chain in chains:
            _erase_dead_chain(gm, chain)
        ops.pop(g_mm)
        ops.pop(u_mm)
        report.count_pattern("triton_gemv_gated")
        report.kernels.append(rec)
        swapped += 1

    swapped += _substitute_gemv3(
        gm, ops, groups, tuner, mode, report, _default(kernel_ops["gemv3"])
    )

    for node, (x, w, bias, _real) in ops.items():
        cfg = _pick_gemv(tuner, mode, plain[node])
        if cfg["impl"] != "triton":
            report.reject("triton_gemv", f"{node.name}: ATen (cuBLAS) measured faster")
            continue
        op = _default(kernel_ops["gemv"])
        new, rec = _replace(gm, node, op, (x, w, bias, *_cfg(cfg)), [node.name])
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        report.count_pattern("triton_gemv")
        report.kernels.append(rec)
        swapped += 1
    gm.graph.lint()
    gm.recompile()
    return swapped


def _gated_sites(
    gm: GraphModule,
    ops: dict[Node, tuple],
    by_shape: dict[tuple, list[torch.Tensor]],
    kernel_ops: dict[str, Any],
) -> list[tuple[Node, tuple, _Site]]:
    """Gated MLPs act(mm(x, Wg)) * mm(x, Wu) that one `gemv_gated` launch can replace:
    (gated_act node, (gate mm, up mm, x, Wg, Wu, act, gate value), site)."""
    k_ = _kernels()
    gemv_gated = kernel_ops["gemv_gated"]
    out = []
    for node in gm.graph.nodes:
        target = node.target
        if not (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)):
            continue
        if target.namespace != "yirage" or target._opname != "gated_act":
            continue
        a = _args(node)
        act = a["act"] or "silu"
        g_mm, u_mm = _strip_views(a["gate"]), _strip_views(a["up"])
        if act not in _ACTS or g_mm is u_mm or g_mm not in ops or u_mm not in ops:
            continue
        (xg, wg, bg, rg), (xu, wu, bu, ru) = ops[g_mm], ops[u_mm]
        gv = _val(a["gate"])
        if xg is not xu or bg is not None or bu is not None or rg.shape != ru.shape:
            continue
        if len(g_mm.users) != 1 or len(u_mm.users) != 1 or gv.dtype != rg.dtype:
            continue
        if tuple(_val(a["up"]).shape) != tuple(gv.shape) or not _static(*gv.shape):
            continue
        m, kk = _val(xg).shape
        n = rg.shape[1]
        dtype = rg.dtype
        weights = by_shape[(tuple(rg.shape), dtype)]

        def pairs(weights=weights):
            rot = rotation(weights)
            return list(zip(rot[::2], rot[1::2])) or [(rot[0], rot[0])]

        def ours(cfg, m=m, kk=kk, dtype=dtype, pairs=pairs, code=_ACTS[act]):
            xs = rand((m, kk), dtype)
            return [(lambda p=p: gemv_gated(xs, p[0], p[1], code, *_cfg(cfg))) for p in pairs()]

        def baseline(m=m, kk=kk, dtype=dtype, pairs=pairs, code=_ACTS[act]):
            # The unfused graph: two cuBLAS GEMVs and one fused activation kernel.
            xs = rand((m, kk), dtype)
            return [
                (lambda p=p: k_.gated_act(torch.mm(xs, p[0]), torch.mm(xs, p[1]), code, 1024, 4))
                for p in pairs()
            ]

        dims = _gemv_dims(m, n, kk, dtype, act=act, **_pdl_dims(kernel_ops))
        site = _Site("gemv_gated", dims, n, kk, ours, baseline)
        out.append((node, (g_mm, u_mm, xg, wg, wu, act, gv), site))
    return out


def _gemv_site(
    op: tuple, by_shape: dict[tuple, list[torch.Tensor]], kernel_ops: dict[str, Any]
) -> _Site:
    """One mm/addmm as one `gemv` launch."""
    gemv = kernel_ops["gemv"]
    x, _w, bias, real = op
    m, kk = _val(x).shape
    n = real.shape[1]
    dtype = real.dtype
    weights = by_shape[(tuple(real.shape), dtype)]
    has_bias = bias is not None

    def ours(cfg):
        xs = rand((m, kk), dtype)
        b = rand((n,), dtype) if has_bias else None
        return [(lambda w=w: gemv(xs, w, b, *_cfg(cfg))) for w in rotation(weights)]

    def baseline():
        xs = rand((m, kk), dtype)
        if has_bias:
            b = rand((n,), dtype)
            return [(lambda w=w: torch.addmm(b, xs, w)) for w in rotation(weights)]
        return [(lambda w=w: torch.mm(xs, w)) for w in rotation(weights)]

    dims = _gemv_dims(m, n, kk, dtype, bias=int(has_bias), **_pdl_dims(kernel_ops))
    return _Site("gemv", dims, n, kk, ours, baseline)


def _gemv3_sites(
    ops: dict[Node, tuple], kernel_ops: dict[str, Any]
) -> list[tuple[list[Node], _Site]]:
    """Three GEMVs of one input (q/k/v) for one `gemv3` launch: exactly three bias-free
    siblings, every N and K >= 16."""
    gemv3 = kernel_ops["gemv3"]
    siblings: dict[Node, list[Node]] = {}
    for node, (x, _w, bias, real) in ops.items():
        if bias is None and min(real.shape) >= 16:
            siblings.setdefault(x, []).append(node)
    groups = [nodes for nodes in siblings.values() if len(nodes) == 3]
    by_sig: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
    for nodes in groups:
        reals = tuple(ops[n][3] for n in nodes)
        same = by_sig.setdefault(tuple((tuple(r.shape), r.dtype) for r in reals), [])
        same.append(reals)
        # The other layers' q/k/v of a regional piece, triple by triple.
        same.extend(disjoint_groups([_sibling_weights(r, list(reals)) for r in reals]))
    out = []
    for nodes in groups:
        x = ops[nodes[0]][0]
        reals = tuple(ops[n][3] for n in nodes)
        m, kk = _val(x).shape
        dtype = reals[0].dtype
        triples = by_sig[tuple((tuple(r.shape), r.dtype) for r in reals)]

        def ours(cfg, m=m, kk=kk, dtype=dtype, triples=triples):
            xs = rand((m, kk), dtype)
            return [(lambda t=t: gemv3(xs, *t, *_cfg(cfg))) for t in rotation_groups(triples)]

        def baseline(m=m, kk=kk, dtype=dtype, triples=triples):
            xs = rand((m, kk), dtype)
            return [
                (lambda t=t: [torch.mm(xs, t[0]), torch.mm(xs, t[1]), torch.mm(xs, t[2])])
                for t in rotation_groups(triples)
            ]

        ns = "-".join(str(r.shape[1]) for r in reals)
        n_max = max(r.shape[1] for r in reals)
        dims = _gemv_dims(m, ns, kk, dtype, **_pdl_dims(kernel_ops))
        site = _Site("gemv3", dims, n_max, kk, ours, baseline)
        out.append((nodes, site))
    return out


def _substitute_gemv3(
    gm: GraphModule,
    ops: dict[Node, tuple],
    groups: list[tuple[list[Node], _Site]],
    tuner: Tuner,
    mode: str,
    report: Any,
    op: Any,
) -> int:
    """Each q/k/v group (`_gemv3_sites`) -> one `yirage_cuda::gemv3` launch, where it
    measured faster (pops them from `ops`)."""
    count = 0
    for nodes, site in groups:
        if any(n not in ops for n in nodes):
            continue
        cfg = _pick_gemv(tuner, mode, site)
        if cfg["impl"] != "triton":
            report.reject("triton_gemv3", f"{nodes[0].name}: ATen measured faster")
            continue
        x = ops[nodes[0]][0]
        ws = [ops[n][1] for n in nodes]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = min(nodes, key=order.__getitem__)
        for w in ws:  # weight views may be defined just before their own mm: hoist them
            if order[w] > order[first]:
                first.prepend(w)
        new, rec = _replace(gm, first, op, (x, *ws, *_cfg(cfg)), [n.name for n in nodes])
        for i, node in enumerate(nodes):
            with gm.graph.inserting_after(new):
                item = gm.graph.call_function(operator.getitem, (new, i))
            item.meta["val"] = new.meta["val"][i]
            node.replace_all_uses_with(item)
            gm.graph.erase_node(node)
            ops.pop(node)
        report.count_pattern("triton_gemv3")
        report.kernels.append(rec)
        count += 1
    return count


def _default(op: Any) -> Any:
    """The OpOverload behind a triton_op or custom_op object (graph nodes call that)."""
    return getattr(getattr(torch.ops, op._namespace), op._name).default


def _pdl_dims(kernel_ops: dict[str, Any]) -> dict[str, int]:
    """Cache-key dims: PDL kernels are measured (and cached) apart from the plain ones."""
    return {"pdl": 1} if kernel_ops["gemv"]._name.endswith("_pdl") else {}


def _cfg(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    return cfg["block_n"], cfg["block_k"], cfg["num_warps"]


def _erase_dead_chain(gm: GraphModule, node: Any) -> None:
    while isinstance(node, Node) and node.op == "call_function" and not node.users:
        nxt = node.args[0] if node.args else None
        gm.graph.erase_node(node)
        node = nxt
