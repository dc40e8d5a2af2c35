"""Turn functionalized input mutations back into in-place ops.

AOTAutograd functionalizes `cache.index_copy_(2, pos, k)` (HF StaticCache) into a full
out-of-place copy plus a copy back into the input, which costs a whole KV-cache copy per
layer per token:

before:                                        after:
    new = aten.index_copy(cache, 2, pos, k)        new = aten.index_copy_(cache, 2, pos, k)
    ... readers of `new` ...                       ... readers of `new` (it aliases cache) ...
    aten.copy_(cache, new)                         (copy_ removed)

Safe only when nothing reads `cache` after `new` is computed (the old value is dead) and
`new` has the same shape/dtype/strides as `cache`.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .context import PassContext

aten = torch.ops.aten


def _inplace_variant(target) -> torch._ops.OpOverload | None:
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    base = target.overloadpacket.__name__
    packet = getattr(torch.ops.aten, base + "_", None)
    if packet is None or target._overloadname not in packet.overloads():
        return None
    op = getattr(packet, target._overloadname)
    mutable = [a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments]
    return op if mutable and mutable[0] and not any(mutable[1:]) else None


def reinplace_input_mutations(gm: GraphModule, ctx: PassContext) -> int:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for copy in list(gm.graph.nodes):
        if copy.target is not aten.copy_.default:
            continue
        dst, src = copy.args[0], copy.args[1]
        if not isinstance(src, Node) or dst.op != "placeholder" or not src.args:
            continue
        if src.args[0] is not dst:
            continue
        inplace = _inplace_variant(src.target)
        if inplace is None:
            ctx.report.reject("reinplace", f"{src.target} has no in-place variant")
            continue
        later_readers = [u for u in dst.users if u is not copy and order[u] > order[src]]
        if later_readers:
            ctx.report.reject("reinplace", f"{dst.name} is read after {src.name}")
            continue
        sv, dv = src.meta.get("val"), dst.meta.get("val")
        if not isinstance(sv, torch.Tensor) or not isinstance(dv, torch.Tensor):
            continue
        if sv.shape != dv.shape or sv.dtype != dv.dtype or sv.stride() != dv.stride():
            continue
        src.target = inplace
        copy.replace_all_uses_with(src)
        gm.graph.erase_node(copy)
        count += 1
    return count
