"""Regional compilation: a model's repeated blocks (decoder layers) are compiled once.

An LLM's Dynamo graph is N copies of one decoder layer between an embedding and a head.
Compiling all N copies is most of a cold compile: AOTAutograd traces every op of every
layer, our passes and Inductor walk each of them. Here the Dynamo graph is split at the
boundaries of its repeated blocks and every piece is compiled as a graph of its own;
pieces with the same code and input metadata share one compilation:

  * CPU: the first block is compiled; every later identical block re-arms its program
    with its own weights (the whole-graph cache's recipes, kept in memory: one trace, one
    pass run, one C++ build, one arena).
  * CUDA: one Inductor compile of the block, its weights graph inputs (not frozen), called
    with each layer's tensors. CUDA graphs capture the stitched step as a whole.

Blocks are found from each node's `nn_module_stack`: the outermost module whose path
ends in an index (`model.layers.7`). Before -> after, for a 3-layer Llama decode step:

    ids, w_emb, w0..., k0, v0, w1..., w2..., w_head     segment_0(ids, w_emb)      -> x
    x = embedding(ids)                                   segment_1(x, w0.., k0, v0) -> h, r
    layers.0: norm, attention, +, norm, mlp, +           segment_2(h, r, w1.., ...) -> h, r
    layers.1: ...                                        segment_2(h, r, w2.., ...) -> h, r
    layers.2: ...                                        segment_3(h, r, w_head)    -> logits
    norm, lm_head

The residual add that ends a block is moved into the next piece, where it still fuses
with that block's input norm (the RMSNorm + residual pattern). Layer 0, which starts at
the embedding output, then opens with an add of a zero tensor, so that all N layers are
one program (`open_first_block_with_zero_residual`).

Applies to inference graphs with static shapes and at least two identical blocks; any
other graph, or any failure here, compiles as one graph (the report says why).
"""

from __future__ import annotations

import contextvars
import logging
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx._lazy_graph_module import _LazyGraphModule, _use_lazy_graph_module

log = logging.getLogger("yirage_dynamo")

# While a piece compiles: the example inputs of the graph's other pieces (other layers'
# weights), for kernel measurements that should read many layers' weights as the model
# does (lowering/cuda_gemv.py). Empty outside regional compilation.
SIBLING_INPUTS: contextvars.ContextVar[tuple[list[Any], ...]] = contextvars.ContextVar(
    "yirage_sibling_inputs", default=()
)

# A module path ending in an index: "L['self'].model.layers.7" or "...layers[7]".
_INDEXED = re.compile(r"^(.*?)(?:\.(\d+)|\[(\d+)\])$")
_ADDS = (operator.add, torch.add, operator.iadd)


# A block smaller than this (call nodes) is not worth a graph of its own: splitting
# nn.Sequential(Linear, SiLU, ...) into one-op pieces would only cost fusion.
MIN_BLOCK_NODES = 8


def block_of(node: Node) -> tuple[str, int, str] | None:
    """(container path, index, module type) of the outermost indexed module `node` was
    traced in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for value in stack.values():  # outermost first
        path = value[0] if isinstance(value, tuple) else str(value)
        match = _INDEXED.match(path)
        if match:
            kind = value[1] if isinstance(value, tuple) and len(value) > 1 else None
            name = getattr(kind, "__qualname__", str(kind))
            return match.group(1), int(match.group(2) or match.group(3)), name
    return None


def _is_add(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target == "add"


def plan(
    gm: GraphModule,
    example_inputs: list[Any],
    move_closing_add: bool = True,
    defer_increments: bool = False,
) -> tuple[dict[Node, int] | None, str]:
    """(partition index per node, "") when regional compilation applies, else (None, why).

    `move_closing_add`: a block's closing residual add goes to the next piece, where it
    fuses with that block's input norm; then the first block (no add before it) is a
    program of its own. Without, every block is alike (one program fewer to compile) and
    the add is one small extra kernel per block.

    `defer_increments`: the blocks' step counters (HF's static cache has one per layer)
    are incremented in the last piece instead, all together, where a lowering can make
    them one launch (lowering/cuda_kv_write.py's `batch_counter_increments`): 31
    launches fewer per 7B decode step. This edits `gm` (`defer_increments_in`). Off on
    the CPU, where the increments are part of each layer's one-call kernel program and,
    in the last piece, would be ATen calls that keep it from having one."""
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    ):
        return None, "graph may need gradients (training)"
    for t in example_inputs:
        if not isinstance(t, torch.Tensor) or not all(type(s) is int for s in t.shape):
            return None, "dynamic shapes"
    if defer_increments:
        defer_increments_in(gm)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    # A moved increment runs after the blocks, whichever block it came from.
    owner = [None if n.meta.get("yirage_deferred_increment") else block_of(n) for n in nodes]
    spans: dict[tuple[str, int, str], list[int]] = {}
    for i, b in enumerate(owner):
        if b is not None:
            spans.setdefault(b, [i, i])[1] = i
    if len(spans) < 2:
        return None, "no repeated blocks"
    # Nodes traced between two nodes of one block (helpers outside any module) join it;
    # interleaved blocks cannot be split apart.
    for b, (first, last) in spans.items():
        for i in range(first, last + 1):
            if owner[i] is None:
                owner[i] = b
            elif owner[i] != b:
                return None, "blocks interleave"
    runs: list[list[int]] = []
    for i, b in enumerate(owner):
        if runs and owner[runs[-1][0]] == b:
            runs[-1].append(i)
        else:
            runs.append([i])
    index = {n: i for i, n in enumerate(nodes)}
    for r, run in enumerate(runs[:-1]):
        last = nodes[run[-1]]
        nxt = runs[r + 1]
        # The block's closing residual add goes to the next piece (fuses with its norm).
        if move_closing_add and owner[run[-1]] is not None and len(run) > 1 and _is_add(last):
            if all(nxt[0] <= index.get(u, -1) <= nxt[-1] for u in last.users):
                nxt.insert(0, run.pop())
    shapes: dict[tuple, int] = {}
    for run in runs:
        if owner[run[-1]] is not None and len(run) >= MIN_BLOCK_NODES:
            key = (owner[run[-1]][2], *_ops([nodes[i] for i in run]))
            shapes[key] = shapes.get(key, 0) + 1
    if max(shapes.values(), default=0) < 2:
        return None, "no two blocks alike"
    return {nodes[i]: r for r, run in enumerate(runs) for i in run}, ""


def _shared_storages(gm: GraphModule) -> set[Any]:
    """Storages of more than one graph input (aliased inputs: a write through one is a
    read of the other)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    seen: dict[Any, int] = {}
    for p in gm.graph.find_nodes(op="placeholder"):
        val = p.meta.get("example_value")
        if isinstance(val, torch.Tensor):
            ref = StorageWeakRef(val.untyped_storage())
            seen[ref] = seen.get(ref, 0) + 1
    return {ref for ref, n in seen.items() if n > 1}


def defer_increments_in(gm: GraphModule) -> int:
    """Move the blocks' step counters' increments (`_deferrable_increment`) to the end of
    the graph, after the head, where they run in the last piece, together (see `plan`);
    the number moved. The meaning is the same: nothing reads a counter after its
    increment. Only where the graph ends outside the blocks and two or more qualify."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    if not nodes or block_of(nodes[-1]) is not None:
        return 0
    index = {n: i for i, n in enumerate(nodes)}
    shared = _shared_storages(gm)
    moving = [n for n in nodes if _deferrable_increment(n, index, shared)]
    if len(moving) < 2:
        return 0
    output = next(iter(reversed(gm.graph.nodes)))
    for node in moving:
        output.prepend(node)
        node.meta["yirage_deferred_increment"] = True
    gm.recompile()
    return len(moving)


def _deferrable_increment(node: Node, index: dict[Node, int], shared: set[Any]) -> bool:
    """An in-place add to a one-element graph input (a block's step counter, e.g. HF's
    `cumulative_length.add_(1)`) whose result is unused, which nothing reads after, and
    which shares its storage with no other input."""
    if node.kwargs or len(node.args) != 2 or node.users:
        return False
    if not (node.op == "call_method" and node.target == "add_") and not (
        node.op == "call_function" and node.target in (torch.Tensor.add_, operator.iadd)
    ):
        return False
    counter, step = node.args
    if not isinstance(counter, Node) or counter.op != "placeholder" or type(step) is not int:
        return False
    val = counter.meta.get("example_value")
    if not isinstance(val, torch.Tensor) or not all(type(d) is int for d in val.shape):
        return False
    if val.numel() != 1 or val.dtype != torch.int64:
        return False
    from torch.multiprocessing.reductions import StorageWeakRef

    if StorageWeakRef(val.untyped_storage()) in shared:
        return False
    return all(index.get(u, -1) < index[node] for u in counter.users if u is not node)


def _runs_of(partition: dict[Node, int]) -> list[list[Node]]:
    runs: dict[int, list[Node]] = {}
    for node, r in partition.items():  # insertion order is graph order
        runs.setdefault(r, []).append(node)
    return [runs[r] for r in sorted(runs)]


def _ops(run: list[Node]) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in run]


def open_first_block_with_zero_residual(
    gm: GraphModule, partition: dict[Node, int]
) -> Callable[[], None] | None:
    """Make the first block's piece the same program as the later blocks' pieces.

    With the closing residual adds moved (`plan`), layers 1..N-1 open with the add of the
    previous layer's two residual halves, and layer 0, which starts at the embedding
    output, is a program of its own: a second compile of a whole layer (~2 s of a cold
    7B CUDA compile). Giving layer 0 the same opening add, of the embedding output and a
    zero tensor made in the piece before it, makes all N layers one program:

        before                                   after
        prefix:  x = embedding(ids)              prefix:  x = embedding(ids)
                                                          z = zeros_like(x)
        layer 0: norm(x) ... r0, m0              layer 0: h = x + z; norm(h) ... r0, m0
        layer 1: h = r0 + m0; norm(h) ...        layer 1: h = r0 + m0; norm(h) ...

    `x + 0` is `x` exactly (a -0.0 becomes +0.0), and the add fuses into layer 0's input
    norm as it does in the other layers; the zeros cost one small fill per step.
    Edits `gm` and `partition` in place and returns a function that undoes the edit (for
    a caller falling back to the whole graph), or None when the graph does not have this
    shape (then nothing changed)."""
    runs = _runs_of(partition)
    blocks = [i for i, run in enumerate(runs) if block_of(run[-1]) is not None]
    if len(blocks) < 2 or blocks[0] == 0 or blocks[1] != blocks[0] + 1:
        return None
    first, second = runs[blocks[0]], runs[blocks[1]]
    opening = second[0]
    if not (
        _is_add(opening)
        and len(opening.args) == 2
        and not opening.kwargs
        and block_of(opening) == block_of(first[-1])
        and _ops(second[1:]) == _ops(first)
    ):
        return None
    # The value entering layer 0 where layer 1 reads its opening add.
    entering: set[Node] = set()
    for mine, theirs in zip(first, second[1:], strict=True):
        mine_args = [*mine.args, *mine.kwargs.values()]
        their_args = [*theirs.args, *theirs.kwargs.values()]
        if len(mine_args) != len(their_args):
            return None
        for a, b in zip(mine_args, their_args, strict=True):
            if b is opening:
                entering.add(a)
            elif any(b is x for x in opening.args):
                return None  # layer 1 reads an add operand directly: not this shape
    if len(entering) != 1:
        return None
    (x,) = entering
    if not isinstance(x, Node) or x.op == "placeholder" or x not in partition:
        return None
    if partition[x] == partition[first[0]] or "example_value" not in x.meta:
        return None
    fake = x.meta["example_value"]
    fake_zero = torch.zeros_like(fake)
    fake_opened = fake + fake_zero
    graph = gm.graph
    with graph.inserting_after(x):
        zero = graph.call_function(torch.zeros_like, (x,))
    with graph.inserting_before(first[0]):
        opened = graph.call_function(opening.target, (x, zero))
    zero.meta["example_value"] = fake_zero
    opened.meta["example_value"] = fake_opened
    for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
        if key in opening.meta:
            opened.meta[key] = opening.meta[key]
    for node in first:
        node.replace_input_with(x, opened)
    # The partition keeps graph order: rebuild it with the two new nodes in place.
    index = {**partition, zero: partition[x], opened: partition[first[0]]}
    partition.clear()
    partition.update({n: index[n] for n in graph.nodes if n in index})
    gm.recompile()

    def undo() -> None:
        for node in first:
            node.replace_input_with(opened, x)
        graph.erase_node(opened)
        graph.erase_node(zero)
        partition.pop(opened, None)
        partition.pop(zero, None)
        gm.recompile()

    return undo


def split(gm: GraphModule, partition: dict[Node, int]) -> GraphModule:
    """The Dynamo graph as pieces `submod_<i>`, each returning a tuple, with Dynamo's
    bookkeeping (sources of placeholders, module meta) carried into each piece."""
    from torch.fx.passes.split_module import split_module

    # Lazy: a piece's Python code is generated once, when canonicalize() has renamed it,
    # not also here and on each edit below (~4 codegens per piece: 0.4 s for 34 pieces).
    with _use_lazy_graph_module(True):
        parts = split_module(gm, None, lambda n: partition[n], keep_original_order=True)
    sources = {n.name: getattr(n, "_dynamo_source", None) for n in gm.graph.nodes}
    for node in parts.graph.nodes:
        if node.op != "call_module":
            continue
        sub = getattr(parts, node.target)
        sub.meta = dict(gm.meta)
        if hasattr(gm, "_param_name_to_source"):
            sub._param_name_to_source = gm._param_name_to_source
        for p in sub.graph.find_nodes(op="placeholder"):
            # AOTAutograd reads it on every placeholder: None for an intermediate.
            p._dynamo_source = sources.get(p.name)
        out = next(iter(reversed(sub.graph.nodes)))
        if not isinstance(out.args[0], tuple):
            out.args = ((out.args[0],),)
            sub.single_output = True
        sub.recompile()
    return parts


def canonicalize(sub: GraphModule) -> None:
    """Rename every node positionally, so identical blocks have identical code."""
    nodes = [n for n in sub.graph.nodes if n.op != "output"]
    for i, n in enumerate(nodes):
        n._rename(f"_regional_tmp_{i}")
    for i, n in enumerate(nodes):
        n._rename(f"v{i}")
        if n.op == "placeholder":
            n.target = n.name
    sub.recompile()


def example_inputs_of(sub: GraphModule, top_inputs: dict[str, Any]) -> list[Any]:
    """A piece's example inputs: the real tensor for a graph input, else Dynamo's fake
    value of the node that produces it (split_module copies node meta into the pieces)."""
    return [
        top_inputs[p.name] if p.name in top_inputs else p.meta["example_value"]
        for p in sub.graph.find_nodes(op="placeholder")
    ]


class Segment:
    """One compiled piece as the stitched graph calls it: positional tensors in, the
    piece's outputs back (restrided where the compiled program's layout differs from the
    eager layout the next piece was compiled for)."""

    def __init__(self, fn: Callable, single: bool, expected_strides: list[Any]) -> None:
        self.fn = fn  # called as Dynamo calls a backend's callable: positionally
        self.single = single
        self.expected = expected_strides
        self.fix: list[int] | None = None  # output positions to restride, set on call 1
        self.__name__ = "segment"

    def __call__(self, *args: Any) -> Any:
        out = self.fn(*args)
        if self.fix is None:
            self.fix = [
                i
                for i, (o, s) in enumerate(zip(out, self.expected, strict=False))
                if s is not None and isinstance(o, torch.Tensor) and tuple(o.stride()) != s
            ]
            for i in self.fix:
                log.info(
                    "yirage: regional piece output %d has strides %s, the next piece expects "
                    "%s: copied on every call",
                    i,
                    tuple(out[i].stride()),
                    self.expected[i],
                )
        if self.fix:
            out = list(out)
            for i in self.fix:
                o = out[i]
                out[i] = o.new_empty_strided(o.shape, self.expected[i]).copy_(o)
        return out[0] if self.single else tuple(out)


def _expected_strides(sub: GraphModule) -> list[Any]:
    """Eager strides of a piece's outputs: what the pieces that read them compile for."""
    out = next(iter(reversed(sub.graph.nodes))).args[0]
    values = [v.meta.get("example_value") if isinstance(v, Node) else None for v in out]
    return [tuple(v.stride()) if isinstance(v, torch.Tensor) else None for v in values]


def compile_regions(
    gm: GraphModule,
    example_inputs: list[Any],
    partition: dict[Node, int],
    compile_piece: Callable[[GraphModule, list[Any], str | None], tuple[Callable, bool]],
    signature: Callable[[GraphModule, list[Any]], str | None],
) -> tuple[Callable, frozenset[int], dict[str, int]]:
    """Split, compile every piece, stitch.

    `compile_piece(sub, inputs, sig)` -> (callable, reused?): `sig` is the piece's
    signature when another piece shares it (None for a one-off piece); the lowering
    decides how a repeat is served (CPU: re-armed program; CUDA: the same callable).
    Returns the stitched callable, the graph inputs some piece may write (from each
    piece callable's `mutated_inputs`; all of a piece's inputs where it has none) and
    counts for the report."""
    parts = split(gm, partition)
    placeholders = gm.graph.find_nodes(op="placeholder")
    top_inputs = {p.name: t for p, t in zip(placeholders, example_inputs, strict=True)}
    top_index = {p.name: i for i, p in enumerate(placeholders)}
    pieces = []
    for node in [n for n in parts.graph.nodes if n.op == "call_module"]:
        sub = getattr(parts, node.target)
        names = [p.name for p in sub.graph.find_nodes(op="placeholder")]
        inputs = example_inputs_of(sub, top_inputs)
        expected = _expected_strides(sub)
        canonicalize(sub)
        pieces.append((node, sub, inputs, expected, signature(sub, inputs), names))
    repeats: dict[str, int] = {}
    for *_, sig, _names in pieces:
        if sig is not None:
            repeats[sig] = repeats.get(sig, 0) + 1
    stats = {"pieces": len(pieces), "compiled": 0, "reused": 0}
    mutated: set[int] = set()
    for node, sub, inputs, expected, sig, names in pieces:
        shared = sig if sig is not None and repeats[sig] > 1 else None
        siblings = [p[2] for p in pieces if p[2] is not inputs]
        token = SIBLING_INPUTS.set(tuple(siblings))
        try:
            fn, reused = compile_piece(sub, inputs, shared)
        finally:
            SIBLING_INPUTS.reset(token)
        stats["reused" if reused else "compiled"] += 1
        written = getattr(fn, "mutated_inputs", None)
        for j, name in enumerate(names):
            if name in top_index and (written is None or j in written):
                mutated.add(top_index[name])
        target = node.target
        node.op = "call_function"
        node.target = Segment(fn, getattr(sub, "single_output", False), expected)
        parts.delete_submodule(target)
    parts.recompile()
    # The stitched forward itself, not the lazy module's trampoline (a check and a
    # Module call on every step).
    _LazyGraphModule.force_recompile(parts)
    return parts.forward, frozenset(mutated), stats
