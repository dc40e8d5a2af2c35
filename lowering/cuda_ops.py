"""Swap yirage fused ops for their Triton kernels in a post-pass CUDA graph.

Runs in the CUDA lowering's `inner_compile`, after the pass pipeline and before Inductor:

before:                                            after:
    y = yirage.rms_norm(x, w, eps, False)              y = yirage_cuda.rms_norm(x, w, eps, False, 4)
    o = yirage.attention(q, kc, vc, m, s, _, cp)       o = yirage_cuda.decode_attention(
                                                               q, kc, vc, m, cp, s, 256, 64, 4)

Decode GEMVs run first (lowering/cuda_gemv.py): aten.mm/addmm of x [M <= 4, K] and a frozen
nn.Linear weight become `yirage_cuda::gemv` / `gemv3` / `gemv_gated`.

A node is swapped only where the kernel computes exactly the op's function for those inputs
(dtype, shapes, layout: see each `_try_*`); otherwise it stays and runs the ATen reference,
and the report says why. Launch parameters come from lowering/kernel_tuning.py: measured on
this GPU for static shapes (cached per kernel, shape bucket and GPU), a heuristic otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node
from yirage_dynamo.passes.context import PassContext, set_fake_val

from .cuda_timing import Tuner, rand, time_in_graph
from .kernel_tuning import bucket

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_MAX_NORM_DIM = 65536


@functools.cache
def _kernels():
    """Import (and so register) the Triton ops on first use, never at package import."""
    from . import triton_kernels

    return triton_kernels


def _args(node: Node) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, Node) else x


def _static(*sizes: Any) -> bool:
    return all(isinstance(s, int) for s in sizes)


def _cuda_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_cuda and t.dtype in _FLOATS


# ------------------------------------------------------------------------ rms_norm


def _try_rms_norm(node: Node, tuner: Tuner, residual: bool) -> tuple[Any, tuple] | str:
    a = _args(node)
    x, w = _val(a["x"]), _val(a["weight"])
    if not _cuda_float(x):
        return "input is not a floating CUDA tensor"
    n = x.shape[-1]
    if not _static(n) or n > _MAX_NORM_DIM:
        return f"normalised dim {n} is symbolic or too large"
    if w is not None and (not _cuda_float(w) or tuple(w.shape) != (n,)):
        return "weight is not a 1-D CUDA tensor over the last dim"
    if residual:
        r = _val(a["residual"])
        if not _cuda_float(r) or r.dtype != x.dtype or tuple(r.shape) != tuple(x.shape):
            return "residual differs from x in shape or dtype"
    rows = math.prod(x.shape[:-1])
    # One row per program: more warps than ~2 elements per thread only adds idle lanes.
    cands = [{"num_warps": nw} for nw in (4, 8, 16, 2, 1) if nw * 32 <= max(32, n // 2)]
    make_bench = None
    if _static(rows):
        rows_b, dtype = bucket(rows), x.dtype

        def make_bench():
            k = _kernels()
            xs, ws = rand((rows_b, n), dtype), rand((n,), w.dtype if w is not None else dtype)
            rs = rand((rows_b, n), dtype)
            if residual:
                return lambda c: time_in_graph(
                    lambda: k.rms_norm_residual(xs, rs, ws, 1e-6, False, c["num_warps"])
                )
            return lambda c: time_in_graph(lambda: k.rms_norm(xs, ws, 1e-6, False, c["num_warps"]))

    dims = {"n": n, "rows": bucket(rows) if _static(rows) else "dyn", "dt": str(x.dtype)[6:]}
    name = "rms_norm_residual" if residual else "rms_norm"
    cfg = tuner.pick(name, dims, cands, make_bench)
    op = getattr(torch.ops.yirage_cuda, name).default
    if residual:
        args = (a["x"], a["residual"], a["weight"], a["eps"], a["weight_fp32"], cfg["num_warps"])
    else:
        args = (a["x"], a["weight"], a["eps"], a["weight_fp32"], cfg["num_warps"])
    return op, args


# ------------------------------------------------------------------------ gated_act

_ACTS = {"silu": 0, "gelu_tanh": 1}


def _try_gated_act(node: Node, tuner: Tuner) -> tuple[Any, tuple] | str:
    a = _args(node)
    g, u = _val(a["gate"]), _val(a["up"])
    act = a["act"] or "silu"
    if act not in _ACTS:
        return f"activation {act!r} has no Triton kernel"
    if not (_cuda_float(g) and _cuda_float(u)) or g.dtype != u.dtype:
        return "gate/up are not CUDA tensors of one floating dtype"
    if tuple(g.shape) != tuple(u.shape):
        return "gate/up shapes differ (broadcast)"
    n = g.shape[-1]
    if not _static(n):
        return "feature dim is symbolic"
    rows = math.prod(g.shape[:-1])
    cands = [
        {"block": b, "num_warps": nw}
        for b, nw in ((1024, 4), (2048, 8), (512, 4), (4096, 8), (256, 2))
        if b <= max(256, 1 << math.ceil(math.log2(n)))
    ]
    make_bench = None
    if _static(rows):
        rows_b, dtype = bucket(rows), g.dtype

        def make_bench():
            k = _kernels()
            gs, us = rand((rows_b, n), dtype), rand((rows_b, n), dtype)
            return lambda c: time_in_graph(
                lambda: k.gated_act(gs, us, _ACTS[act], c["block"], c["num_warps"])
            )

    dims = {"n": n, "rows": bucket(rows) if _static(rows) else "dyn", "dt": str(g.dtype)[6:]}
    cfg = tuner.pick("gated_act", dims, cands, make_bench)
    op = torch.ops.yirage_cuda.gated_act.default
    return op, (a["gate"], a["up"], _ACTS[act], cfg["block"], cfg["num_warps"])


# ------------------------------------------------------------------------ rotary


def _try_rotary(node: Node, tuner: Tuner) -> tuple[Any, tuple] | str:
    a = _args(node)
    q, k, cos, sin = (_val(a[n]) for n in ("q", "k", "cos", "sin"))
    if a["interleaved"]:
        return "interleaved layout has no Triton kernel"
    if not all(_cuda_float(t) for t in (q, k, cos, sin)):
        return "inputs are not floating CUDA tensors"
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        return "mixed dtypes (the reference would promote)"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() not in (3, 4):
        return "expected q/k [B, H, S, D] and cos/sin [B|1, (1,) S, D]"
    if cos.dim() == 4 and cos.shape[1] != 1:
        return "cos/sin vary per head"
    if tuple(cos.shape) != tuple(sin.shape):
        return "cos/sin shapes differ"
    d = q.shape[-1]
    if cos.shape[-1] != d or k.shape[-1] != d or not _static(d) or d % 2:
        return "partial rotary dim (pass-through features)"
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or cos.shape[-2] != q.shape[2]:
        return "q/k/cos batch or sequence sizes differ"
    if cos.shape[0] not in (1, q.shape[0]):
        return "cos/sin batch does not broadcast"
    return torch.ops.yirage_cuda.rotary.default, (a["q"], a["k"], a["cos"], a["sin"])


# ------------------------------------------------------------------------ attention


ATTN_MERGE_ENV = "YIRAGE_CUDA_ATTN_MERGE"


def merge_in_last_program(ctx: PassContext) -> bool:
    """YIRAGE_CUDA_ATTN_MERGE: "kernel" (default: a merge kernel after the split kernel)
    or "search" (the search also measures configs whose last split program merges, one
    launch instead of two; the no-Inductor codegen only, where the op runs as is)."""
    value = os.environ.get(ATTN_MERGE_ENV, "").strip().lower() or "kernel"
    if value not in ("kernel", "search"):
        raise ValueError(f"{ATTN_MERGE_ENV}={value!r}: expected 'kernel' or 'search'")
    return value == "search" and ctx.artifacts.get("cuda_codegen") == "direct"


def _split_candidates(max_len: int, merge_last: bool = False) -> list[dict[str, Any]]:
    """Few candidates on purpose: each costs a Triton compile (~0.3 s) in a cold compile.
    They cover what won on an H200 for Llama 7B/1B shapes, caches of 32 to 4096 slots;
    `merge_last`: the first two again, merged by their last split program."""
    long = max_len >= 2048
    cands = [
        # The default (used when nothing can be measured): short chunks, many programs.
        {"split": 256 if max_len >= 4096 else 64, "block_n": 64, "num_warps": 4},
        {"split": 128, "block_n": 64, "num_warps": 4},
        {"split": 64, "block_n": 32, "num_warps": 2},
        {"split": 512 if long else 128, "block_n": 128, "num_warps": 4},
    ]
    if merge_last:
        cands += [{**c, "merge": "last"} for c in cands[:2] if c["split"] < max_len]
    out: list[dict[str, Any]] = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def _attention_plan(node: Node, merge_last: bool = False) -> _AttentionPlan | str:
    """What `_try_attention` needs to choose and call the decode-attention kernel, or why
    the node keeps its reference."""
    a = _args(node)
    q, k, v = _val(a["q"]), _val(a["k"]), _val(a["v"])
    cp, mask = _val(a["cache_position"]), _val(a["attn_mask"])
    if cp is None and a["is_causal"]:
        return "is_causal without cache_position (top-left causal decode)"
    if not all(_cuda_float(t) for t in (q, k, v)) or len({q.dtype, k.dtype, v.dtype}) != 1:
        return "q/k/v are not CUDA tensors of one floating dtype"
    if q.dim() != 4 or k.dim() != 4 or tuple(k.shape) != tuple(v.shape):
        return "expected q [B, Hq, S, D] and k/v [B, Hkv, T, D] of one shape"
    b, hq, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    if not (_static(s) and s == 1):
        return "not a single-token decode step (prefill runs the reference)"
    if not _static(hq, hkv, d) or hq % hkv or d > 256 or d < 16:
        return "head counts/dim unsupported"
    if k.shape[0] != b or k.shape[-1] != d:
        return "k/v batch or head dim differ from q"
    if cp is not None and (cp.dim() != 1 or cp.dtype not in (torch.int32, torch.int64)):
        return "cache_position is not a 1-D integer tensor"
    if mask is not None:
        # [B|1, 1|Hq (broadcast), 1, T]: the efficient-attention op gets it expanded
        # over heads (stride 0), which the kernel reads as one row per batch.
        heads_ok = mask.dim() == 4 and (
            mask.shape[1] == 1 or (mask.shape[1] == hq and mask.stride(1) == 0)
        )
        if not heads_ok or mask.shape[2] != 1 or mask.shape[3] != t:
            return f"attn_mask {tuple(mask.shape)} is not [B|1, 1, 1, T]"
        if mask.shape[0] not in (1, b) or not mask.is_cuda:
            return "attn_mask batch does not broadcast"
        if mask.dtype != torch.bool and mask.dtype not in _FLOATS:
            return "attn_mask dtype unsupported"
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    make_call = None
    if _static(b, t):
        dtype = q.dtype

        @functools.cache  # one set of inputs for the precompile and the measurements
        def make_call():
            kk = _kernels()
            qs = rand((b, hq, 1, d), dtype)
            ks, vs = rand((b, hkv, t, d), dtype), rand((b, hkv, t, d), dtype)
            # Tune for a cache that is 3/4 full (decode steps sweep the whole range), bounded
            # the way this node will be: by cache_position, or by a mask hiding the tail.
            fill = max(1, (3 * t) // 4)
            pos = torch.tensor([fill - 1], device="cuda") if cp is not None else None
            m = None
            if mask is not None:
                keep = torch.arange(t, device="cuda") < fill
                m = keep.view(1, 1, 1, t).expand(mask.shape[0], 1, 1, t)
                if mask.dtype != torch.bool:
                    m = torch.zeros(m.shape, dtype=mask.dtype, device="cuda").masked_fill(
                        ~m, float("-inf")
                    )
            sem = torch.zeros(b * hkv, dtype=torch.int32, device="cuda")
            return lambda c: kk.decode_attention(
                qs, ks, vs, m, pos, scale, c["split"], c["block_n"], c["num_warps"],
                sem if c.get("merge") == "last" else None,
            )  # fmt: skip

    dims = {
        "b": b if _static(b) else "dyn",
        "hq": hq,
        "hkv": hkv,
        "d": d,
        "t": bucket(t) if _static(t) else "dyn",
        "dt": str(q.dtype)[6:],
        "bound": "cp" if cp is not None else "mask" if mask is not None else "none",
    }
    merge_last = merge_last and make_call is not None
    if merge_last:  # another search, so another cached pick
        dims["merge"] = "search"
    max_len = t if _static(t) else 4096
    args = (a["q"], a["k"], a["v"], a["attn_mask"], a["cache_position"], float(scale))
    return _AttentionPlan(dims, _split_candidates(max_len, merge_last), args, make_call)


@dataclasses.dataclass
class _AttentionPlan:
    """One decode-attention node's search: its shape key's dims, the configs to measure,
    the op's arguments before the config, and the measurement inputs' maker."""

    dims: dict[str, Any]
    candidates: list[dict[str, Any]]
    args: tuple
    make_call: Callable[[], Callable[[Mapping[str, Any]], Any]] | None  # None: nothing to measure

    def precompile_calls(self) -> list[Callable[[], Any]]:
        if self.make_call is None:
            return []
        call = self.make_call()
        return [lambda c=c: call(c) for c in self.candidates]


def _try_attention(node: Node, tuner: Tuner) -> tuple[Any, tuple] | str:
    plan = _attention_plan(node, tuner.merge_last)
    if isinstance(plan, str):
        return plan
    make_bench = None
    if plan.make_call is not None:
        make_call = plan.make_call

        def make_bench():
            call = make_call()
            return lambda c: time_in_graph(lambda: call(c))

        key = tuner.key("decode_attention", plan.dims)
        if not tuner.cached("decode_attention", plan.dims) and key not in tuner.precompiled:
            from .triton_pool import precompile_calls

            precompile_calls(plan.precompile_calls())  # all at once, in children
    cfg = tuner.pick("decode_attention", plan.dims, plan.candidates, make_bench)
    op = torch.ops.yirage_cuda.decode_attention.default
    args = (*plan.args, cfg["split"], cfg["block_n"], cfg["num_warps"])
    if cfg.get("merge") == "last":
        args += (_merge_counters(node),)
    return op, args


def _merge_counters(node: Node) -> Node:
    """A get_attr of int32 zeros owned by this call site, one per (batch, kv head): the
    counts the split programs keep to find the last one (each launch leaves them zero).
    Per call site, so no two launches that could overlap share them."""
    gm = node.graph.owning_module
    q, k = _val(_args(node)["q"]), _val(_args(node)["k"])
    name = f"_yirage_merge_counters_{node.name}"
    gm.register_buffer(name, torch.zeros(q.shape[0] * k.shape[1], dtype=torch.int32, device="cuda"))
    with gm.graph.inserting_before(node):
        counters = gm.graph.get_attr(name)
    set_fake_val(gm, counters)
    return counters


def attention_precompiles(gm: GraphModule, ctx: PassContext) -> list[tuple[str, list]]:
    """(cache key, candidate calls) of each decode-attention shape in `gm` whose config is
    not cached: the GEMV search compiles them in its own round of forked children (one
    round's wait, not two; lowering/triton_pool.py)."""
    if not torch.cuda.is_available():
        return []
    tuner = Tuner(ctx)
    out: dict[str, list] = {}
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.yirage.attention.default):
        plan = _attention_plan(node, tuner.merge_last)
        if isinstance(plan, str) or plan.make_call is None:
            continue
        key = tuner.key("decode_attention", plan.dims)
        if key not in out and not tuner.cached("decode_attention", plan.dims):
            out[key] = plan.precompile_calls()
    return list(out.items())


# ------------------------------------------------------------------------ inlining

# Ops whose ATen reference Inductor compiles better than a separate kernel: pointwise and
# row-reduction work that Inductor fuses with its neighbours (the residual add, casts, the
# KV-cache write after rotary, the GEMM epilogue feeding the activation). Measured on an
# H200 (benchmarks/RESULTS.md): our Triton rms_norm/rotary kernels as separate launches
# cost 0.1-0.2 ms/token more than Inductor's fused kernels at batch 1. Decode attention
# is the exception: a single fused flash-decoding kernel that skips the unwritten cache.
INLINE_BY_DEFAULT = frozenset({"rms_norm", "rms_norm_residual", "rotary", "gated_act"})


def _trace_key(key: Any, fake_args: list[torch.Tensor]) -> Any:
    """A memo key for a trace, or None when a size is symbolic (traces differ then)."""
    meta = []
    for v in fake_args:
        sizes = (*v.shape, *v.stride())
        if not _static(*sizes):
            return None
        meta.append((sizes, v.dtype, v.device))
    return key, tuple(meta)


def _splice(
    gm: GraphModule,
    node: Node,
    fn: Callable[..., Any],
    inputs: list[Node],
    memo: dict[Any, GraphModule] | None = None,
    key: Any = None,
) -> bool:
    """Replace `node` by the ATen graph of `fn(*inputs)` traced with Inductor's
    decomposition table on the inputs' fake values. False (graph untouched) if the trace
    holds constants or a tuple output is used other than through getitem. Traces are
    shared through `memo` between nodes of equal `key` and input metadata (every layer
    of a model has the same rms_norm), which keeps compile time down."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_args = [n.meta.get("val") for n in inputs]
    if not all(isinstance(v, torch.Tensor) for v in fake_args):
        return False
    full_key = _trace_key(key, fake_args) if memo is not None and key is not None else None
    traced = memo.get(full_key) if full_key is not None else None
    if traced is None:
        fake_mode = torch._guards.detect_fake_mode(fake_args)
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            traced = make_fx(fn, decomposition_table=select_decomp_table())(*fake_args)
        if full_key is not None:
            memo[full_key] = traced
    sub_nodes = list(traced.graph.nodes)
    if any(n.op == "get_attr" for n in sub_nodes):
        return False
    output = next(n for n in sub_nodes if n.op == "output").args[0]
    is_tuple = isinstance(output, list | tuple)
    if is_tuple and any(u.target is not operator.getitem for u in node.users):
        return False
    env: dict[Node, Any] = {}
    args = iter(inputs)
    with gm.graph.inserting_before(node):
        for sub in sub_nodes:
            if sub.op == "placeholder":
                env[sub] = next(args)
            elif sub.op != "output":
                env[sub] = gm.graph.node_copy(sub, lambda n: env[n])
    out_value = torch.fx.node.map_arg(output, lambda n: env[n])
    if is_tuple:
        for user in list(node.users):
            user.replace_all_uses_with(out_value[user.args[1]])
            gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(out_value)
    gm.graph.erase_node(node)
    return True


def inline_reference(
    gm: GraphModule, node: Node, memo: dict[Any, GraphModule] | None = None
) -> bool:
    """Replace a yirage op node by the ATen ops of its reference implementation.

    before:  y = yirage.rms_norm(x, w, eps, False)
    after:   xf = _to_copy(x, f32); v = mean(pow(xf, 2), [-1], True); ...; y = mul(w, ...)

    The reference is traced (make_fx, Inductor's decomposition table) on the node's fake
    inputs and spliced in, so Inductor sees plain ATen ops it can fuse.
    """
    from torch._library.custom_ops import _maybe_get_opdef

    fn = getattr(_maybe_get_opdef(node.target), "_init_fn", None)
    if fn is None:
        return False
    names = [a.name for a in node.target._schema.arguments]
    bound = _args(node)
    tensor_names = [n for n in names if isinstance(bound[n], Node)]
    consts = {n: bound[n] for n in names if n not in tensor_names}

    def call(*tensors):
        return fn(**dict(zip(tensor_names, tensors)), **consts)

    try:
        key = (node.target, repr(sorted(consts.items())))
    except TypeError:
        key = None
    return _splice(gm, node, call, [bound[n] for n in tensor_names], memo, key)


def decompose_for_inductor(gm: GraphModule, ctx: PassContext) -> int:
    """Decompose ops our passes inserted that Inductor expects decomposed already.

    AOTAutograd hands Inductor a graph decomposed with Inductor's table; a pass that
    inserts e.g. `aten.t` (horizontal GEMM fusion) would make Inductor fail ("both a
    fallback and a decomp"). before: t = aten.t(w)   after: t = aten.permute(w, [1, 0])
    """
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings

    table = select_decomp_table()
    count = 0
    for node in list(gm.graph.nodes):
        target = node.target
        if node.op != "call_function" or target not in table or target in lowerings:
            continue
        inputs = list(node.all_input_nodes)
        index = {n: i for i, n in enumerate(inputs)}
        args, kwargs = node.args, node.kwargs

        def call(*tensors, target=target, args=args, kwargs=kwargs, index=index):
            a, k = torch.fx.node.map_arg((args, kwargs), lambda arg: tensors[index[arg]])
            return target(*a, **k)

        if _splice(gm, node, call, inputs):
            count += 1
        else:
            ctx.report.reject("decompose_for_inductor", f"{node.name} ({target}) kept")
    if count:
        ctx.report.count_pattern("decomposed_for_inductor", count)
    return count


# ------------------------------------------------------------------------ driver

TRIES: dict[str, Callable[[Node, Tuner], tuple[Any, tuple] | str]] = {
    "rms_norm": lambda n, t: _try_rms_norm(n, t, residual=False),
    "rms_norm_residual": lambda n, t: _try_rms_norm(n, t, residual=True),
    "gated_act": _try_gated_act,
    "rotary": _try_rotary,
    "attention": _try_attention,
}


def substitute(
    gm: GraphModule, ctx: PassContext, inline: frozenset[str] = INLINE_BY_DEFAULT
) -> int:
    """Replace yirage op nodes by their yirage_cuda Triton ops where exact (ops named in
    `inline` go back to ATen for Inductor to fuse instead); count Triton swaps."""
    from yirage_dynamo.report import KernelRecord

    candidates = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace == "yirage"
        and n.target._opname in TRIES
    ]
    if not candidates:
        return 0
    tuner: Tuner | None = None
    swapped = 0
    memo: dict[Any, GraphModule] = {}
    for node in candidates:
        name = node.target._opname
        if name in inline:
            if inline_reference(gm, node, memo):
                ctx.report.count_pattern(f"inductor_{name}")
            else:
                ctx.report.reject(f"inline_{name}", f"{node.name}: not inlinable; op call stays")
            continue
        if not torch.cuda.is_available():
            ctx.report.reject(f"triton_{name}", f"{node.name}: no CUDA device; reference runs")
            continue
        if tuner is None:
            _kernels()
            tuner = Tuner(ctx)
        result = TRIES[name](node, tuner)
        if isinstance(result, str):
            ctx.report.reject(f"triton_{name}", f"{node.name}: {result}; reference runs")
            continue
        op, args = result
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(op, args)
        set_fake_val(gm, new)
        new.meta["yirage_origin"] = node.name
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        ctx.report.count_pattern(f"triton_{name}")
        ctx.report.kernels.append(KernelRecord(op._opname, "cuda", None, [node.name]))
        swapped += 1
    gm.graph.lint()
    gm.recompile()
    return swapped
