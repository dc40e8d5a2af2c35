"""CPU static-cache writes: a layer's K/V `index_copy_`s (and its position counter) as one kernel.

After passes/reinplace.py, HF's StaticCache update is, per layer, a counter bump and two
in-place scatters into graph inputs; `v` is a view chain of the fused QKV GEMM output:

before:                                          after:
    pos = fused_k(arange, counter)                   pos = fused_k(arange, counter)
    add_(counter, 1)                                 kv_write_0(k_cache, v_cache, pos, k, qkv,
    ck = index_copy_(k_cache, 2, pos, k)                        counter)
    v = transpose(view(view(slice(qkv, ..))))        attention(q, k_cache, v_cache, ...)
    cv = index_copy_(v_cache, 2, pos, v)
    attention(q, ck, cv, ...)

One `call_module` region (outlined here, at lowering time, like attention) replaces three
extern ATen calls and a guarded view per layer: its kernel checks every index first (an
out-of-range index raises IndexError before anything is written, as `index_copy_` does),
copies each source row into the cache, then adds the counter's increment. The view chain
costs nothing (the source is read through the chain's strides from its base tensor,
whose strides the launcher checks; other strides run the region's ATen graph). Users of
the `index_copy_` results read the cache inputs themselves, which hold the same tensor
object once the region has run (the region sits where the last write was).

Grouped: `index_copy_`s whose `self` is a graph input, sharing one index node and dim,
with distinct caches of one dtype; a counter bump is `add_.Tensor(c, int)` on a 0-d
integer graph input that the index node reads and that nothing reads after the bump.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .c_ops import RenderedKernel, Unsupported, region_graph, region_module
from .c_renderer import CRenderer, Signature

aten = torch.ops.aten
ENABLE_ENV = "YIRAGE_CPU_KV_WRITE"
REGION_TAG = "yirage_cpu_kv_write"
_STORAGE = {
    torch.float32: "float",
    torch.bfloat16: "uint16_t",
    torch.float16: "uint16_t",
    torch.int64: "int64_t",
    torch.int32: "int32_t",
}
_INDEX = {torch.int64: "int64_t", torch.int32: "int32_t"}
# Views a source may be read through (each returns a view of its input: no copy).
_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.select.int,
    aten.slice.Tensor,
    aten.expand.default,
    aten.t.default,
    aten.alias.default,
}


def is_kv_write_region(region: Any) -> bool:
    return getattr(region, "meta", {}).get(REGION_TAG, False) if region is not None else False


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, Node) else x


def _static(v: torch.Tensor) -> bool:
    vals = [*v.shape, *v.stride(), v.storage_offset()]
    return all(not isinstance(x, torch.SymInt) for x in vals)


def _view_base(src: Node) -> tuple[Node, list[Node]]:
    """(base, chain) for a static-layout view chain used only by the copy, else (src, [])."""
    chain: list[Node] = []
    node = src
    while (
        node.op == "call_function"
        and node.target in _VIEWS
        and not node.kwargs
        and len(node.users) == 1
        and isinstance(node.args[0], Node)
        and node.all_input_nodes == [node.args[0]]
        and isinstance(_val(node), torch.Tensor)
        and _static(_val(node))
    ):
        chain.append(node)
        node = node.args[0]
    base = _val(node)
    if not chain or not isinstance(base, torch.Tensor) or not _static(base):
        return src, []
    return node, chain


def _copy_ok(n: Node) -> str | None:
    """Why this index_copy_ node cannot join a kv-write region (None when it can)."""
    if len(n.args) != 4 or n.kwargs:
        return "unexpected arguments"
    cache, dim, index, src = n.args
    if not isinstance(cache, Node) or cache.op != "placeholder":
        return "destination is not a graph input"
    cv, iv, sv = _val(cache), _val(index), _val(src)
    if not all(isinstance(t, torch.Tensor) for t in (cv, iv, sv)):
        return "non-tensor operands"
    if not isinstance(dim, int) or cv.dim() == 0 or iv.dim() != 1:
        return "0-d cache or index not 1-D"
    if cv.dtype not in _STORAGE or sv.dtype != cv.dtype or iv.dtype not in _INDEX:
        return f"dtypes {cv.dtype}/{sv.dtype}/{iv.dtype}"
    if any(t.device.type != "cpu" for t in (cv, iv, sv)):
        return "not CPU tensors"
    d = dim % cv.dim()
    r = CRenderer()
    if sv.dim() != cv.dim() or not r.same(sv.shape[d], iv.shape[0]):
        return "source shape"
    if not all(r.same(a, b) for k, (a, b) in enumerate(zip(sv.shape, cv.shape)) if k != d):
        return "source shape"
    return None


def _aliases(node: Node, x: Node, gm: GraphModule) -> bool:
    """Whether node's result may share memory with its input x."""
    from yirage_dynamo.passes.memory_plan import _ALIASING, _aliased_inputs

    op = node.target
    if node.op == "call_function" and isinstance(op, torch._ops.OpOverload):
        fresh = not op.is_view and op not in _ALIASING
        if fresh and all(r.alias_info is None for r in op._schema.returns):
            return False
    return x in _aliased_inputs(node, gm)


def _counter_bump(gm: GraphModule, index: Node, at: Node, order: dict[Node, int]) -> Node | None:
    """The `add_(counter, int)` the index reads, movable to `at` (see module docstring).

    Moving it later is exact when nothing reads the counter after it: no other user comes
    later, and none of them (the index included) is a view of the counter."""
    for c in index.all_input_nodes:
        cv = _val(c)
        if c.op != "placeholder" or not isinstance(cv, torch.Tensor) or cv.dim() != 0:
            continue
        if cv.dtype not in _INDEX:
            continue
        bumps = [u for u in c.users if u.target is aten.add_.Tensor]
        if len(bumps) != 1:
            continue
        bump = bumps[0]
        if bump.kwargs or len(bump.args) != 2 or bump.args[0] is not c or bump.users:
            continue
        if type(bump.args[1]) is not int or order[bump] > order[at]:
            continue
        others = [u for u in c.users if u is not bump]
        if any(order[u] > order[bump] or _aliases(u, c, gm) for u in others):
            continue
        return bump
    return None


def outline_kv_writes(gm: GraphModule, ctx: Any) -> int:
    """Replace each group of static-cache writes by one call_module region.

    YIRAGE_CPU_KV_WRITE=0 turns this off (the writes stay extern ATen calls)."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[tuple[Node, int], list[Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not aten.index_copy_.default:
            continue
        why = _copy_ok(n)
        if why is not None:
            ctx.report.notes.append(f"cache write {n.name} stays an ATen call: {why}")
            continue
        key = (n.args[2], n.args[1] % _val(n.args[0]).dim())
        groups.setdefault(key, []).append(n)
    count = 0
    for (index, _), copies in groups.items():
        order = {n: i for i, n in enumerate(gm.graph.nodes)}  # earlier regions changed it
        # Distinct caches of one dtype; writes that no one reads before the last of them.
        caches = [c.args[0] for c in copies]
        if len(set(caches)) != len(caches) or len({_val(c).dtype for c in caches}) != 1:
            copies = copies[:1]
        while len(copies) > 1 and not _movable(copies, order):
            copies = copies[:-1]
        bump = _counter_bump(gm, index, copies[-1], order)
        if _make_region(gm, ctx, index, copies, bump, count):
            count += 1
    return count


def _movable(copies: list[Node], order: dict[Node, int]) -> bool:
    """Whether every write can move to the last one: between a write and the last, no
    node reads its result or its cache, and nothing else mutates memory."""
    last = order[copies[-1]]
    for c in copies[:-1]:
        if any(order[u] <= last for u in c.users):
            return False
        if any(u is not c and order[c] < order[u] <= last for u in c.args[0].users):
            return False
    first = order[copies[0]]
    inside = set(copies)
    for n, i in order.items():
        if first < i < last and n not in inside and n.op == "call_function":
            schema = getattr(n.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                return False
    return True


def _make_region(
    gm: GraphModule, ctx: Any, index: Node, copies: list[Node], bump: Node | None, count: int
) -> bool:
    inputs: list[Node] = [c.args[0] for c in copies] + [index]
    bases: list[tuple[Node, list[Node]]] = []
    for c in copies:
        base, chain = _view_base(c.args[3])
        bases.append((base, chain))
        if base not in inputs:
            inputs.append(base)
    if bump is not None:
        inputs.append(bump.args[0])
    sub, env = region_graph(inputs)
    if bump is not None:  # first, as in the graph (it also happens if an index is bad)
        env[bump] = sub.node_copy(bump, env.__getitem__)
    for c, (_, chain) in zip(copies, bases):
        for v in reversed(chain):
            if v not in env:
                env[v] = sub.node_copy(v, env.__getitem__)
        env[c] = sub.node_copy(c, env.__getitem__)
    sub.output(None)
    name, region = region_module(gm, sub, "kv_write", count, REGION_TAG)
    try:
        render_kv_write(region)
    except Unsupported as exc:
        ctx.report.notes.append(f"cache writes {[c.name for c in copies]} stay ATen calls: {exc}")
        return False
    gm.add_submodule(name, region)
    last = copies[-1]
    with gm.graph.inserting_before(last):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta = {"val": None}
    for c in copies:
        c.replace_all_uses_with(c.args[0])  # index_copy_ returns its `self`
    dead = [*copies, *(v for _, chain in bases for v in chain)]
    if bump is not None:
        dead.append(bump)
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(dead, key=lambda n: -pos[n]):
        gm.graph.erase_node(n)
    return True


def render_kv_write(region: GraphModule) -> RenderedKernel:
    """The kernel of a region made by `outline_kv_writes` (see the module docstring)."""
    r = CRenderer()
    nodes = list(region.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    copies = [n for n in nodes if n.target is aten.index_copy_.default]
    bump = next((n for n in nodes if n.target is aten.add_.Tensor), None)
    ptr = {ph: f"p{i}" for i, ph in enumerate(placeholders)}

    signature = Signature(r)
    for i, ph in enumerate(placeholders):
        pv = _val(ph)
        if pv.dtype not in _STORAGE:
            raise Unsupported(f"dtype {pv.dtype}")
        # No __restrict__: a source may view a cache.
        signature.tensor(i, pv, _STORAGE[pv.dtype] + "*", restrict=False)

    index = copies[0].args[2]
    n_idx = r.size(_val(index).shape[0])
    i_stride = r.size(_val(index).stride()[0])
    body = [f"const int64_t n = {n_idx};"]
    # Every index is checked before anything is written (index_copy_ raises first too).
    cache0 = _val(copies[0].args[0])
    d0 = copies[0].args[1] % cache0.dim()
    limit = r.size(cache0.shape[d0])
    body.append("int64_t bad = 0;")
    body.append(
        f"for (int64_t j = 0; j < n; ++j) {{ const int64_t x = {ptr[index]}[j * {i_stride}];"
    )
    body.append(f"  if (x < 0 || x >= {limit}) bad = 1; }}")
    bump_line = ""
    if bump is not None:
        bump_line = f"{ptr[bump.args[0]]}[0] += {int(bump.args[1])};"
    body.append(f"if (bad) {{ {bump_line} return 1; }}")
    for c in copies:
        cache, dim, _, src = c.args
        cv, sv = _val(cache), _val(src)
        d = dim % cv.dim()
        base = src
        while base.op != "placeholder":
            base = base.args[0]
        bv = _val(base)
        # Source element offset: the chain's layout relative to its base's first element.
        s_off = sv.storage_offset() - bv.storage_offset() if base is not src else 0
        if isinstance(s_off, torch.SymInt):
            raise Unsupported("symbolic source offset")
        loops, c_terms, s_terms = [], [], []
        for k in range(cv.dim()):
            loops.append(f"for (int64_t i{k} = 0; i{k} < {r.size(sv.shape[k])}; ++i{k})")
            pos = f"{ptr[index]}[i{k} * {i_stride}]" if k == d else f"i{k}"
            c_terms.append(f"{pos} * {r.size(cv.stride()[k])}")
            s_terms.append(f"i{k} * {r.size(sv.stride()[k])}")
        body.append("{")
        body += ["  " * k + lp for k, lp in enumerate(loops)]
        ind = "  " * len(loops)
        body.append(f"{ind}{ptr[cache]}[{' + '.join(c_terms)}] = ")
        body.append(f"{ind}    {ptr[base]}[{s_off} + {' + '.join(s_terms)}];")
        body.append("}")
    if bump_line:
        body.append(bump_line)
    body.append("return 0;")
    symbol_sources = signature.symbols(placeholders)
    src = [f'extern "C" int64_t FUNC({", ".join(signature.sig)}) {{']
    src += ["  " + ln for ln in body] + ["}", ""]
    return signature.kernel("\n".join(src), nodes, [], symbol_sources, returns_status=True)
