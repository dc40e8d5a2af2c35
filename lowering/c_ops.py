"""Op vocabulary and language hooks shared by C-like kernel renderers (C++ now, Metal later).

`POINTWISE` maps an op's packet name to a C expression template over its operands (in the
compute type); `_VIEWS`/`_SPECIAL`/`REDUCTIONS` name the ops the generator handles itself.
`CLanguage` holds what differs between C-like languages (type names, pragmas).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from yirage_dynamo.passes.fusion import VIEW_OPS

aten = torch.ops.aten


class Unsupported(Exception):
    """The region cannot be rendered; the caller leaves it to ATen."""


# ---------------------------------------------------------------------------------------
# op table: packet name -> C expression template over operands {0}, {1}, ... (compute type)
# ---------------------------------------------------------------------------------------
POINTWISE: dict[str, str] = {
    "add": "({0} + {1})",
    "sub": "({0} - {1})",
    "mul": "({0} * {1})",
    "neg": "(-{0})",
    "abs": "y_abs({0})",
    "exp": "y_exp({0})",
    "exp2": "exp2({0})",
    "expm1": "expm1({0})",
    "log": "log({0})",
    "log1p": "log1p({0})",
    "log2": "log2({0})",
    "sqrt": "sqrt({0})",
    "rsqrt": "(1.0f / sqrt({0}))",
    "reciprocal": "(1.0f / {0})",
    "sin": "sin({0})",
    "cos": "cos({0})",
    "tan": "tan({0})",
    "tanh": "y_tanh({0})",
    "erf": "y_erf({0})",
    "floor": "floor({0})",
    "ceil": "ceil({0})",
    "trunc": "trunc({0})",
    "round": "nearbyint({0})",
    "sigmoid": "(1.0f / (1.0f + y_exp(-{0})))",
    "silu": "({0} / (1.0f + y_exp(-{0})))",
    "relu": "({0} < 0 ? ({T})0 : {0})",
    "maximum": "y_max({0}, {1})",
    "minimum": "y_min({0}, {1})",
    "clamp_min": "y_max({0}, {1})",
    "clamp_max": "y_min({0}, {1})",
    "where": "({0} ? {1} : {2})",
    "eq": "({0} == {1})",
    "ne": "({0} != {1})",
    "lt": "({0} < {1})",
    "le": "({0} <= {1})",
    "gt": "({0} > {1})",
    "ge": "({0} >= {1})",
    "logical_not": "(!{0})",
    "logical_and": "({0} && {1})",
    "logical_or": "({0} || {1})",
    "bitwise_not": "(~{0})",
    "bitwise_and": "({0} & {1})",
    "bitwise_or": "({0} | {1})",
    "isnan": "({0} != {0})",
}
_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
# Operands of these are converted to the common input type, not the (bool) output type.
_LOGICAL = {"logical_not", "logical_and", "logical_or", "isnan"}
_VIEWS = VIEW_OPS
_SPECIAL = {
    "cat",
    "_to_copy",
    "prims.convert_element_type",
    "pow",
    "clamp",
    "gelu",
    "masked_fill",
    "div",
    "prims.div",
    "prims.mul",
    "prims.add",
    "prims.sub",
}
REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "prims.sum", "prims.var", "prims.amax"}
RENDERABLE: frozenset[str] = frozenset(POINTWISE) | _VIEWS | _SPECIAL | REDUCTIONS


def op_key(target: Any) -> str:
    """'add' for aten ops, 'prims.var' for other namespaces (the fusible_ops vocabulary)."""
    if not isinstance(target, torch._ops.OpOverload):
        return ""
    name = target.overloadpacket.__name__
    return name if target.namespace == "aten" else f"{target.namespace}.{name}"


# ---------------------------------------------------------------------------------------
# language hooks
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLanguage:
    """What differs between C-like kernel languages (C++/OpenMP here; Metal later)."""

    storage: dict[torch.dtype, str]
    float_t: str = "float"
    int_t: str = "int64_t"
    bool_t: str = "bool"
    acc_t: str = "double"
    parallel_for: str = "#pragma omp parallel for"
    parallel_simd: str = "#pragma omp parallel for simd"
    simd: str = "#pragma omp simd"
    simd_reduce: str = "#pragma omp simd reduction(+:{acc})"
    # Work (elements) below which a kernel stays single-threaded: thread wake-up costs more.
    parallel_threshold: int = 32768


# ---------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class KernelParam:
    """One argument group of the generated function, in call order."""

    kind: str  # "tensor" (pointer + strides), "out" (pointer + strides), "int", "float", "sym"
    index: int  # placeholder index (tensor/int/float), output index (out)
    ndim: int = 0
    symbol: str = ""


@dataclasses.dataclass
class RenderedKernel:
    body: str  # the function, named FUNC (replaced by the unique kernel name)
    params: list[KernelParam]
    # Python expressions (of the symbols) for each output: shape, stride, dtype.
    outputs: list[tuple[str, str, torch.dtype]]
    # symbol -> Python expression reading it from the launcher's arguments.
    symbol_sources: dict[str, str]
    n_placeholders: int
    multi_output: bool
    origins: list[str]
    # (placeholder index, dim, Python stride expression) the generated code assumes.
    stride_checks: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)
    # C type of each parameter, in call order (for the packed entry point, cpp_build.py).
    c_types: list[str] = dataclasses.field(default_factory=list)
    # Placeholders whose checked strides are exactly the contiguous ones: the launcher
    # checks them with one `is_contiguous()` (the same condition, half the cost).
    contiguous_inputs: list[int] = dataclasses.field(default_factory=list)
    # The function returns int64_t: nonzero means an index was out of range (the launcher
    # raises IndexError); such kernels have no outputs of their own (they write inputs).
    returns_status: bool = False
    # Python conditions on the size symbols the kernel assumes (else the reference runs).
    guards: list[str] = dataclasses.field(default_factory=list)

    @property
    def digest(self) -> str:
        key = self.body + repr([(p.kind, p.index, p.ndim, p.symbol) for p in self.params])
        key += repr(self.stride_checks) + repr(self.outputs) + repr(self.symbol_sources)
        key += repr(getattr(self, "guards", []))
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def _ctype_of(dtype: torch.dtype, lang: CLanguage) -> str:
    if dtype.is_floating_point:
        if dtype == torch.float64:
            raise Unsupported("float64 is not rendered")
        return lang.float_t
    if dtype == torch.bool:
        return lang.bool_t
    if dtype in lang.storage:
        return lang.int_t
    raise Unsupported(f"dtype {dtype}")


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else node


def _norm_dims(dims: Any, ndim: int) -> tuple[int, ...]:
    if dims is None or dims == []:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted({d % max(ndim, 1) for d in dims}))


class _Scope:
    def __init__(self) -> None:
        self.lines: list[str] = []


def region_graph(inputs: list[Node]) -> tuple[Graph, dict[Node, Node]]:
    """The graph of a one-op region outlined at lowering time (attention, GEMV, cache
    write): one placeholder per input node, its meta copied; and the node map to extend."""
    sub = Graph()
    env: dict[Node, Node] = {}
    for x in inputs:
        env[x] = sub.placeholder(x.name)
        env[x].meta = dict(x.meta)
    return sub, env


def region_module(
    gm: GraphModule, sub: Graph, prefix: str, start: int, tag: str
) -> tuple[str, GraphModule]:
    """(first free name `prefix_N` from `start` in gm, the region module marked `tag`);
    not yet added to gm (the caller renders it first)."""
    i = start
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    region = GraphModule(torch.nn.Module(), sub, class_name=f"{prefix}_{i}")
    region.meta[tag] = True
    return f"{prefix}_{i}", region
