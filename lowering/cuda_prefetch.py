"""L2 prefetch between decode GEMVs (an experiment, off by default): YIRAGE_CUDA_PREFETCH.

Between two GEMVs of a decode layer run small kernels that leave HBM almost idle: after
q/k/v come rotary, the KV-cache writes, attention and its merge; after the o-projection,
the second RMSNorm. On an H200 they are ~0.5 ms of a 3.8 ms 7B step (RESULTS.md). Here
each GEMV's programs, once their dot products are done, ask L2 for their share of the
*next* GEMV's weight (the last `frac` of every row; `_l2_prefetch` in triton_gemv.py).
Those bytes stream in while the small kernels run, and the next GEMV reads them from L2.

before:  q, k, v = yirage_cuda.gemv3(x, wq_t, wk_t, wv_t, bn, bk, nw)
         ... rotary, KV write, attention ...
         o = yirage_cuda.gemv(a, wo_t, None, bn, bk, nw)
after:   q, k, v = yirage_cuda.gemv3(x, wq_t, wk_t, wv_t, bn, bk, nw,
                                     prefetch=wo_t, prefetch_kind=1, prefetch_frac=0.5)
         ... (the rest unchanged)

A prefetch is a hint: results are bit-identical with or without it.

    YIRAGE_CUDA_PREFETCH=off            (default)
    YIRAGE_CUDA_PREFETCH=lines:0.5      prefetch.global.L2::evict_last per 128-byte line
    YIRAGE_CUDA_PREFETCH=bulk:0.5       cp.async.bulk.prefetch.L2 per row (compute capability 9+)
"""

from __future__ import annotations

import os

import torch
from torch.fx import GraphModule, Node
from yirage_dynamo.passes.context import PassContext

PREFETCH_ENV = "YIRAGE_CUDA_PREFETCH"
_KINDS = {"lines": 1, "bulk": 2}
# The weight operand (an mm-style [K, N] view) of each GEMV op: what its predecessor asks
# L2 for. gemv_gated: the gate weight; gemv3: the q weight.
_WEIGHT_ARG = 1
_OPS = ("gemv", "gemv_gated", "gemv3")


def prefetch_mode() -> tuple[int, float]:
    """(kind, fraction) from YIRAGE_CUDA_PREFETCH: kind 0 off, 1 lines, 2 bulk. An unknown
    value raises ValueError naming the variable and its values."""
    env = os.environ.get(PREFETCH_ENV, "").strip().lower()
    if env in ("", "off", "0", "none"):
        return 0, 0.0
    kind, _, frac = env.partition(":")
    expected = f"expected off, or one of {', '.join(_KINDS)} with ':<fraction in (0, 1]>'"
    if kind not in _KINDS:
        raise ValueError(f"{PREFETCH_ENV}={env!r}: {expected}")
    try:
        f = float(frac or "0.5")
    except ValueError:
        raise ValueError(f"{PREFETCH_ENV}={env!r}: {expected}") from None
    if not 0.0 < f <= 1.0:
        raise ValueError(f"{PREFETCH_ENV}={env!r}: {expected}")
    if not torch.cuda.is_available():
        return 0, 0.0
    if kind == "bulk" and torch.cuda.get_device_capability()[0] < 9:
        return 0, 0.0
    return _KINDS[kind], f


def _gemv_nodes(gm: GraphModule) -> list[Node]:
    ns = getattr(torch.ops, "yirage_cuda", None)
    targets = {getattr(ns, name).default for name in _OPS if ns is not None and hasattr(ns, name)}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def link_prefetches(
    gm: GraphModule, ctx: PassContext, mode: tuple[int, float] | None = None
) -> int:
    """Give every yirage GEMV node the weight of the GEMV that follows it in the graph as
    its prefetch target; returns the number of links."""
    kind, frac = mode if mode is not None else prefetch_mode()
    if kind == 0:
        return 0
    nodes = _gemv_nodes(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    links = 0
    for a, b in zip(nodes, nodes[1:]):
        w = b.args[_WEIGHT_ARG]
        if not isinstance(w, Node):
            continue
        if order[w] > order[a]:
            # A weight view defined just before its own GEMV: move it up, if what it
            # views is already there (a parameter input or a frozen constant).
            src = w.args[0] if w.args else None
            if not (isinstance(src, Node) and src.op in ("placeholder", "get_attr")):
                continue
            if order[src] > order[a]:
                continue
            a.prepend(w)
        a.kwargs = {**a.kwargs, "prefetch": w, "prefetch_kind": kind, "prefetch_frac": frac}
        links += 1
        ctx.report.count_pattern("l2_prefetch")
    if links:
        name = {v: k for k, v in _KINDS.items()}[kind]
        ctx.report.notes.append(f"GEMVs prefetch the next GEMV's weights ({name}, {frac:g})")
        gm.graph.lint()
        gm.recompile()
    return links
