"""Freeze parameters of inference graphs and fold what depends only on them.

freeze_parameters, before:                 after:
    p_w = placeholder  (nn.Parameter)         _frozen_0 = get_attr  (the same tensor, no copy)
    t = aten.t(p_w); mm(x, t)                 t = aten.t(_frozen_0); mm(x, t)

constant_fold, before:                     after:
    t = aten.t(_frozen_0)                     _folded_0 = get_attr  (t computed once, contiguous)
    y = aten.mm(x, t)                         y = aten.mm(x, _folded_0)
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .context import PassContext

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True, eq=False)
class Recipe:
    """How a constant derives from the graph's inputs, so a cached compiled graph can be
    re-armed with another model's weights (runtime/graph_cache.py) without re-tracing.

    kind "input": placeholder `ref`; "call": ATen op named `ref` on `args` (which may hold
    Recipes, also inside lists); "literal": the tensor `ref` itself. Recipes form a DAG by
    object identity (a constant re-registered under the same name does not loop).
    """

    kind: str
    ref: Any
    args: tuple = ()
    kwargs: tuple = ()  # (name, value) pairs

    @staticmethod
    def call(op: Any, args: tuple, kwargs: dict | None = None) -> Recipe | None:
        """A call recipe, or None if `op` or an argument cannot be recorded."""
        kwargs = kwargs or {}
        if not isinstance(op, torch._ops.OpOverload):
            return None
        if not all(_plain(a) for a in _recipe_leaves([args, list(kwargs.values())])):
            return None
        return Recipe("call", str(op), tuple(args), tuple(kwargs.items()))

    def evaluate(self, inputs: list[Any], memo: dict[int, Any]) -> Any:
        if id(self) in memo:
            return memo[id(self)]
        if self.kind == "input":
            out = inputs[self.ref].detach()
        elif self.kind == "literal":
            out = self.ref
        else:
            op = functools.reduce(getattr, self.ref.split("."), torch.ops)
            args, kwargs = _map_recipes(
                (self.args, [v for _, v in self.kwargs]), lambda r: r.evaluate(inputs, memo)
            )
            out = op(*args, **dict(zip([k for k, _ in self.kwargs], kwargs)))
        memo[id(self)] = out
        return out


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError, TypeError):  # no such symbol, or no dlopen(NULL)
        return None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS.

    Weights freed at compile time (re-pointed at their concatenation by horizontal GEMM
    fusion, or replaced by folded constants) and compile-time buffers are chunks below
    glibc's dynamic mmap threshold: freed, they stay resident, as holes a later weight-sized
    allocation rarely fits (+65 MB peak, +60 MB steady RSS for a 135M Llama). One
    malloc_trim costs about a millisecond; elsewhere than glibc this does nothing.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# A node argument that is not a recorded constant (a runtime value, or unrecorded).
_UNKNOWN = object()
_PLAIN = (Recipe, int, float, bool, str, torch.dtype, torch.device, torch.layout)


def _plain(a: Any) -> bool:
    """Recordable: a Recipe or a literal whose value does not depend on the weights."""
    if isinstance(a, torch.SymInt | torch.SymFloat | torch.SymBool):
        return False
    return a is None or isinstance(a, _PLAIN) or isinstance(a, torch.memory_format)


def _recipe_leaves(args: Any) -> list[Any]:
    if isinstance(args, list | tuple):
        return [x for a in args for x in _recipe_leaves(a)]
    return [args]


def _map_recipes(args: Any, fn: Any) -> Any:
    if isinstance(args, Recipe):
        return fn(args)
    if isinstance(args, list | tuple):
        return type(args)(_map_recipes(a, fn) for a in args)
    return args


def recipes(gm: GraphModule) -> dict[str, Recipe | None]:
    """Constant name -> its Recipe (None: derived in a way that was not recorded)."""
    return gm.meta.setdefault("yirage_recipes", {})


# A graph's own (lifted) tensor constants up to this size are recorded by value (and
# hashed into the whole-graph cache key).
MAX_LITERAL_BYTES = 1 << 20


def constant_recipe(gm: GraphModule, target: str) -> Recipe | None:
    """The recipe of constant `target`: recorded by add_constant, or, for a constant the
    graph came with (e.g. a lifted `torch.tensor([])`), its value if small and real."""
    table = recipes(gm)
    if target in table:
        return table[target]
    value = getattr(gm, target, None)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
        return None
    if value.numel() * value.element_size() > MAX_LITERAL_BYTES:
        return None
    table[target] = Recipe("literal", value.detach().clone())
    return table[target]


def recipe_of(gm: GraphModule, arg: Any, folded: set[Node] = frozenset()) -> Any:
    """The recipe-level value of a node argument: constants become their Recipes, as do
    nodes in `folded` (computed from constants: their op over their inputs' recipes);
    other nodes (runtime values) and unrecorded constants become _UNKNOWN; literals stay."""
    if isinstance(arg, Node):
        if arg.op == "get_attr":
            r = constant_recipe(gm, arg.target)
        elif arg in folded:
            args, kwargs = recipe_of(gm, (arg.args, dict(arg.kwargs)), folded)
            r = Recipe.call(arg.target, args, kwargs)
        else:
            r = None
        return _UNKNOWN if r is None else r
    if isinstance(arg, list | tuple):
        return type(arg)(recipe_of(gm, a, folded) for a in arg)
    if isinstance(arg, dict):
        return {k: recipe_of(gm, v, folded) for k, v in arg.items()}
    return arg


# Folding these would materialise a larger tensor than its inputs; keep them lazy.
_NO_FOLD = {aten.expand.default, aten.full.default, aten.zeros.default, aten.ones.default}


def add_constant(
    gm: GraphModule,
    prefix: str,
    value: torch.Tensor,
    before: Node,
    fake_mode,
    recipe: Recipe | None = None,
) -> Node:
    """Register `value` on gm (by reference) and insert a get_attr for it before `before`.

    `recipe` says how to recompute it from the graph inputs (None: unknown, which makes
    the compiled graph uncacheable)."""
    i = 0
    while hasattr(gm, f"{prefix}{i}"):
        i += 1
    name = f"{prefix}{i}"
    gm.register_buffer(name, value, persistent=False)
    recipes(gm)[name] = recipe
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
    if not ctx.inference or ctx.real_inputs is None or not ctx.options.freeze:
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
        const = add_constant(
            gm, "_frozen_", real.detach(), first, ctx.fake_mode, Recipe("input", i)
        )
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


# Tensors built from literals alone (arange(1), full([], -inf), ...) up to this many
# elements are folded too: the program would otherwise create them on every call (an
# ATen call each, a few microseconds on the CPU, per layer).
_SMALL_LITERAL = 4096


def _small_literal(node: Node) -> bool:
    """A factory call with literal arguments only and a small, static result."""
    if node.op != "call_function" or node.all_input_nodes:
        return False
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or op.is_view or "empty" in op.__name__:
        return False  # empty*: its contents are not a value
    if op._schema.is_mutable or torch.Tag.nondeterministic_seeded in op.tags:
        return False
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor) or any(not isinstance(d, int) for d in v.shape):
        return False
    return v.numel() <= _SMALL_LITERAL


def constant_fold(gm: GraphModule, ctx: PassContext) -> int:
    """Evaluate subgraphs whose inputs are all constants once, at compile time.

    Only the frontier (a folded node with a non-folded user) is materialised, so a chain
    like to(w, bf16) * 2 becomes one constant. Pure views are never folded. Small tensors
    made from literals alone (`_small_literal`: the cache positions' arange(1), a mask's
    fill values) count as constants too.
    """
    constant: set[Node] = {n for n in gm.graph.nodes if n.op == "get_attr"}
    # Nodes computed from small literals alone: the same value for any model's weights.
    literal: set[Node] = set()
    values: dict[Node, torch.Tensor] = {}
    folded = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        if _small_literal(node):
            constant.add(node)
            literal.add(node)
        elif _foldable(node, constant):
            constant.add(node)
            if all(n in literal for n in node.all_input_nodes):
                literal.add(node)
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
            if node in literal and any(u.op == "output" for u in node.users):
                continue  # returned, a shared constant could be changed by the caller
            result = value(node)
            if not isinstance(result, torch.Tensor):
                continue
            if node in literal:
                recipe = Recipe("literal", result)
            else:
                recipe = recipe_of(gm, node, constant)
                recipe = recipe if isinstance(recipe, Recipe) else None
            new = add_constant(gm, "_folded_", result, node, ctx.fake_mode, recipe)
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
            recipe = Recipe.call(node.target, recipe_of(gm, node.args))
            const = add_constant(gm, "_view_", view, node, ctx.fake_mode, recipe)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
            count += 1
    return count
