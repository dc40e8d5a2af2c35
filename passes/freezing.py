"""Freeze parameters of inference graphs and fold what depends only on them.

freeze_parameters, before:                 after:
    p_w = placeholder  (nn.Parameter)         _frozen_0 = get_attr  (the same tensor, no copy)
    t = aten.t(p_w); mm(x, t)                 t = aten.t(_frozen_0); mm(x, t)

constant_fold, before:                     after:
    t = aten.t(_frozen_0)                     _folded_0 = get_attr  (t computed once, contiguous)
    y = aten.mm(x, t)                         y = aten.mm(x, _folded_0)
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .context import PassContext

aten = torch.ops.aten

# Folding these would materialise a larger tensor than its inputs; keep them lazy.
_NO_FOLD = {aten.expand.default, aten.full.default, aten.zeros.default, aten.ones.default}


def add_constant(
    gm: GraphModule, prefix: str, value: torch.Tensor, before: Node, fake_mode
) -> Node:
    """Register `value` on gm (by reference) and insert a get_attr for it before `before`."""
    i = 0
    while hasattr(gm, f"{prefix}{i}"):
        i += 1
    name = f"{prefix}{i}"
    gm.register_buffer(name, value, persistent=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = (
        fake_mode.from_tensor(value, static_shapes=True) if fake_mode is not None else value
    )
    return node


def freeze_parameters(gm: GraphModule, ctx: PassContext) -> int:
    """Replace non-mutated parameter placeholders by constants held by reference.

    Only for inference graphs whose real inputs are known; a placeholder is frozen when
    its real input is an nn.Parameter whose fake value agrees in shape/dtype, and the
    graph does not mutate it.
    """
    if not ctx.inference or ctx.real_inputs is None:
        return 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(ctx.real_inputs):
        ctx.report.reject("freeze_parameters", "placeholder count differs from inputs")
        return 0
    first = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    count = 0
    for i, (node, real) in enumerate(zip(placeholders, ctx.real_inputs)):
        if not isinstance(real, torch.Tensor) or i in ctx.mutated_inputs:
            continue
        if not isinstance(real, torch.nn.Parameter):
            # Buffers may be updated outside this graph (caches, running stats): folding
            # anything derived from them would go stale.
            continue
        fake = node.meta.get("val")
        if not isinstance(fake, torch.Tensor) or fake.shape != real.shape:
            continue
        if fake.dtype != real.dtype:
            continue
        if not node.users or first is None:
            continue
        const = add_constant(gm, "_frozen_", real.detach(), first, ctx.fake_mode)
        # Passes that repack weights (horizontal GEMM fusion) re-point these parameters.
        ctx.artifacts.setdefault("frozen_params", {})[const.target] = real
        node.replace_all_uses_with(const)
        count += 1
    return count


def _foldable(node: Node, constant: set[Node]) -> bool:
    if node.op != "call_function" or node.target in _NO_FOLD:
        return False
    if not isinstance(node.target, torch._ops.OpOverload) or node.target.is_view:
        # Views of weights stay lazy: materialising t(w) would double weight memory.
        return False
    schema = node.target._schema
    if schema.is_mutable or torch.Tag.nondeterministic_seeded in node.target.tags:
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(n in constant for n in inputs)


def constant_fold(gm: GraphModule, ctx: PassContext) -> int:
    """Evaluate subgraphs whose inputs are all constants once, at compile time.

    Only the frontier (a folded node with a non-folded user) is materialised, so a chain
    like to(w, bf16) * 2 becomes one constant. Pure views are never folded.
    """
    constant: set[Node] = {n for n in gm.graph.nodes if n.op == "get_attr"}
    values: dict[Node, torch.Tensor] = {}
    folded = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        if _foldable(node, constant):
            constant.add(node)
    if len(constant) == sum(1 for n in gm.graph.nodes if n.op == "get_attr"):
        return 0

    def value(n: Node):
        if n in values:
            return values[n]
        if n.op == "get_attr":
            v = getattr(gm, n.target)
        else:
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), value)
            v = n.target(*args, **kwargs)
        values[n] = v
        return v

    with torch.no_grad(), torch._subclasses.fake_tensor.unset_fake_temporarily():
        for node in list(gm.graph.nodes):
            if node not in constant or node.op == "get_attr":
                continue
            if all(u in constant for u in node.users):
                continue
            result = value(node)
            if not isinstance(result, torch.Tensor):
                continue
            new = add_constant(gm, "_folded_", result, node, ctx.fake_mode)
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u not in constant)
            folded += 1
    return folded


def fold_weight_views(gm: GraphModule, ctx: PassContext) -> int:
    """Pre-compute views of constants (e.g. `t(w)` before every GEMM) as view constants.

    before:  t = aten.t(_frozen_0); mm(x, t)      after:  mm(x, _view_0)
    The new constant shares the weight's storage: no memory, one fewer call per GEMM.
    Runs after the pattern passes, which match on the explicit view ops.
    """
    count = 0
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            if not node.target.is_view or len(node.all_input_nodes) != 1:
                continue
            base = node.all_input_nodes[0]
            if base.op != "get_attr" or node.kwargs:
                continue
            args = [getattr(gm, base.target) if a is base else a for a in node.args]
            if any(isinstance(a, torch.fx.Node) for a in args):
                continue
            view = node.target(*args)
            const = add_constant(gm, "_view_", view, node, ctx.fake_mode)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
            count += 1
    return count
