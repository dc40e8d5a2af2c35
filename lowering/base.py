"""The small interface every device lowering implements.

A lowering turns the post-pass ATen graph into a callable:
  * `capabilities` — data: which ops it can fuse into generated kernels, which op
    namespaces it runs as extern calls, dtypes, decompositions it wants from AOTAutograd;
  * `available()`  — whether its toolchain exists here (None, or the reason it doesn't);
  * `unsupported(node)` — why a node cannot be lowered (None when it can);
  * `render(region)` / `compile(sources)` — source for one fused region, and building it;
  * `lower(gm, ctx)` — the whole graph to a callable (default: generated Python wrapper
    calling compiled kernels and ATen extern ops in order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import GraphModule, Node

if TYPE_CHECKING:
    from yirage_dynamo.passes.context import PassContext


@dataclasses.dataclass(frozen=True)
class Capabilities:
    device_type: str
    # Op namespaces whose OpOverloads run as extern (library) calls on this device.
    extern_namespaces: frozenset[str] = frozenset({"aten", "prims", "yirage"})
    # aten op packet names the lowering renders inside generated kernels (fusion pass reads this).
    fusible_ops: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] = frozenset(
        {torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool}
    )
    # yirage custom ops this device has its own kernels for (others run their reference).
    native_custom_ops: frozenset[str] = frozenset()
    generates_kernels: bool = False
    cuda_graphs: bool = False
    # Byte alignment of memory-plan arena offsets; 0 = the device default (256 B for CUDA,
    # matching its caching allocator and vector loads; 64 B, a cache line, elsewhere).
    alignment: int = 0

    def __post_init__(self) -> None:
        if not self.alignment:
            object.__setattr__(self, "alignment", 256 if self.device_type == "cuda" else 64)


# Python-level callables that show up in ATen graphs for symbolic-size arithmetic.
_SYM_FUNCTIONS = {
    operator.getitem,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
    operator.neg,
    operator.pow,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    torch.sym_int,
    torch.sym_float,
    torch.sym_max,
    torch.sym_min,
    torch.sym_not,
    torch.sym_sum,
}


@dataclasses.dataclass
class KernelSource:
    name: str
    source: str
    origins: list[str]
    language: str


class Lowering:
    name: str = "base"
    capabilities: Capabilities = Capabilities(device_type="cpu")

    def available(self) -> str | None:
        """None if this lowering can run here, else why not."""
        return None

    def decompositions(self) -> dict[Any, Callable]:
        """Decomposition table handed to AOTAutograd for graphs this lowering compiles."""
        return {}

    def aot_options(self, options: Any) -> Any:
        """Options for a graph this lowering compiles through the backend's AOT capture
        (e.g. pass defaults of its own); an explicit `Options.passes` entry still wins."""
        return options

    def cache_salt(self) -> str:
        """Run-time switches (not options) that change the generated program; part of the
        whole-graph cache key (runtime/graph_cache.py)."""
        return ""

    def unsupported(self, node: Node) -> str | None:
        """Why `node` cannot be lowered, or None."""
        if node.op in ("placeholder", "output", "get_attr", "call_module"):
            return None
        target = node.target
        if isinstance(target, torch._ops.OpOverload | torch._ops.HigherOrderOperator):
            ns = getattr(target, "namespace", None) or "higher_order"
            if ns in self.capabilities.extern_namespaces:
                return None
            return f"op {target} (namespace {ns!r}) is not supported by the {self.name} lowering"
        if target in _SYM_FUNCTIONS or getattr(target, "__module__", "") == "_operator":
            return None
        return f"python callable {getattr(target, '__name__', target)} is not lowerable"

    def check_graph(self, gm: GraphModule) -> None:
        problems = [why for n in gm.graph.nodes if (why := self.unsupported(n))]
        if problems:
            raise NotImplementedError("; ".join(sorted(set(problems))))

    def compile_dynamo_graph(
        self, gm: GraphModule, example_inputs: list[Any], options: Any, report: Any
    ) -> Callable | None:
        """Optionally compile a whole Dynamo graph (before AOTAutograd) and return the
        callable; None (the default) means: use the backend's AOT capture and `lower`."""
        return None

    # Regional compilation (yirage_dynamo/regional.py): False, a repeated block's program
    # is re-armed with each repeat's frozen weights; True, one callable serves every repeat
    # (its weights are inputs).
    reuses_block_programs: bool = False
    # Move a block's closing residual add into the next piece (fused there with the next
    # block's input norm) at the price of a separate first-block program (regional.plan).
    regional_fuse_across_blocks: bool = True
    # Run the blocks' step-counter increments together in the last piece (regional.plan),
    # for a lowering that makes them one launch there (CUDA: one `_foreach_add_`).
    regional_defer_increments: bool = False

    def regional_refusal(self, example_inputs: list[Any], options: Any) -> str | None:
        """Why this lowering compiles a graph whole rather than by blocks, or None."""
        return None

    def regional_options(self, options: Any, shared: bool) -> Any:
        """Options for one piece of a regionally compiled graph (`shared`: a repeated block)."""
        return options

    def regional_scope(
        self, example_inputs: list[Any], options: Any
    ) -> contextlib.AbstractContextManager:
        """Entered around compiling a graph's pieces and `finish_regional`: state the
        pieces share with the stitched step (CUDA: the staged KV writes' table)."""
        return contextlib.nullcontext()

    def finish_regional(
        self, fn: Callable, example_inputs: list[Any], options: Any, mutated: frozenset[int]
    ) -> Callable:
        """Wrap the stitched pieces of a regionally compiled graph (e.g. in a CUDA graph);
        `mutated`: the graph inputs some piece may write."""
        return fn

    def render(self, region: GraphModule, name: str) -> KernelSource:
        raise NotImplementedError(f"the {self.name} lowering generates no kernels")

    def compile(self, sources: list[KernelSource], ctx: PassContext) -> dict[str, Callable]:
        raise NotImplementedError(f"the {self.name} lowering generates no kernels")

    def lower(self, gm: GraphModule, ctx: PassContext) -> Callable:
        """Default: a generated Python wrapper with extern ATen calls (runtime/wrapper.py)."""
        from yirage_dynamo.runtime.wrapper import build_wrapper

        self.check_graph(gm)
        return build_wrapper(gm, ctx, kernels={})
