"""Kernel programs: a graph made only of our C++ kernels runs as ONE call into C.

A decoder layer's decode graph on the CPU is ~12 kernels (norms, GEMVs, rotary, cache
write, attention). Through the generated wrapper each costs a Python launcher: stride
checks, `data_ptr()`s, the trampoline call, ~2-3 µs while both cores wait. That is ~1 ms
of a ~26 ms SmolLM token, and every gap restarts the next GEMV's memory stream. Here the
wrapper instead passes its inputs' pointers to the trampoline's `run_program`, which
walks a list of kernel calls in C:

before (wrapper `call`):                      after:
    v_fused_0 = yk_a(in0, frozen_0, out=b[0])     if _prog is not None and in0.is_contiguous() ...:
    v_mm = yk_gemv(v_fused_0, view_0, out=b[1])       o = torch.empty_strided(...)
    ...                                                _prog_run(_prog_code, _prog_table,
                                                                 in0.data_ptr(), ..., o.data_ptr())
                                                       return (o,)
                                                  (the old body follows, unchanged)

The program is data. Each kernel argument is (table entry, byte offset); the table holds
base pointers:
  * graph inputs and the tensors the wrapper allocates (outputs, multi-output results):
    written by each call;
  * constants (frozen weights): fixed when the wrapper is built;
  * memory-plan buffers: re-read when the arena hands out new views.
Views between kernels are byte offsets, so only static layouts qualify. Graph inputs are
checked on entry against the strides the kernels were rendered for; any other layout runs
the ordinary body, whose launchers fall back kernel by kernel. While the profiler runs,
the ordinary body runs too (its per-kernel ranges are what a profile is for).
"""

from __future__ import annotations

import ctypes
import dataclasses
import operator
import os
import re
from typing import Any

import torch
from torch.fx import GraphModule, Node

ENABLE_ENV = "YIRAGE_KERNEL_PROGRAM"
# Tensors the fast path allocates and drops at return (not outputs): above this, the
# ordinary body's frees after last use matter more than the saved launches.
MAX_TEMP_BYTES = 64 << 20


@dataclasses.dataclass
class ProgramSpec:
    """What the wrapper source embeds (a literal: the whole-graph cache rebuilds it)."""

    dynamic: list[str]  # Python expressions (pointers, sizes) filling entries 0..n-1
    constants: list[tuple[str, tuple[int, ...]]]  # (global, strides the kernels assume)
    arena: list[int]  # memory-plan buffer k of each arena entry
    steps: list[tuple[str, bool, list[tuple[int, int]]]]  # (launcher, status, args)

    def literal(self) -> str:
        return repr(dataclasses.astuple(self))


class _Unfit(Exception):
    pass


def _static_val(node: Any) -> torch.Tensor:
    v = node.meta.get("val") if isinstance(node, Node) else None
    if not isinstance(v, torch.Tensor):
        raise _Unfit(f"{getattr(node, 'name', node)} is not a tensor")
    if any(type(x) is not int for x in (*v.shape, *v.stride(), v.storage_offset())):
        raise _Unfit(f"{node.name} has a symbolic layout")
    return v


# Not views by schema, but views of a contiguous input (the wrapper calls Tensor.view).
_VIEW_OF_CONTIGUOUS = (torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default)


def _is_view(node: Node) -> bool:
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or not isinstance(node.args[0], Node):
        return False
    if op in _VIEW_OF_CONTIGUOUS:
        base = node.args[0].meta.get("val")
        return isinstance(base, torch.Tensor) and base.is_contiguous()
    ret = op._schema.returns[0].alias_info if op._schema.returns else None
    return ret is not None and not ret.is_write


def _entry_check(var: str, v: torch.Tensor) -> str:
    """The wrapper's condition that input `var` has the layout the kernels assume."""
    if v.is_contiguous():
        return f"{var}.is_contiguous()"
    dims = [(d, s) for d, (n, s) in enumerate(zip(v.shape, v.stride())) if n != 1]
    return " and ".join(f"{var}.stride({d}) == {s}" for d, s in dims) or "True"


def plan_program(
    gm: GraphModule, kernels: dict[str, Any], plan: Any, var: dict[Node, str], bind: Any, expr: Any
) -> tuple[ProgramSpec, list[str], list[str], str] | str:
    """(spec, entry checks, lines before the call, return expression) of the fast path,
    or why the graph does not qualify. `var`: each node's wrapper variable; `bind(value,
    hint)`: the wrapper global naming a constant; `expr(node)`: a node's Python expression
    (for ATen calls that run before the program, e.g. the embedding of a whole model)."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return f"{ENABLE_ENV}=0"
    try:
        return _plan(gm, kernels, plan, var, bind, expr)
    except _Unfit as exc:
        return str(exc)


def _symbol_sources(gm: GraphModule, var: dict[Node, str]) -> dict[Any, str]:
    """Size symbol (sympy) -> the wrapper expression that reads it from a graph input."""
    found: dict[Any, str] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        v = node.meta.get("val")
        if isinstance(v, torch.SymInt) and v.node.expr.is_Symbol:
            found.setdefault(v.node.expr, var[node])
        if isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    found.setdefault(size.node.expr, f"{var[node]}.size({d})")
    return found


_SOURCE = re.compile(r"^a(\d+)(?:\.size\((\d+)\))?$")


def _size_value(node: Node, source: str, symbols: dict[Any, str]) -> str:
    """The wrapper expression of a kernel's size symbol, read as `source` (the launcher's
    "a{i}" or "a{i}.size(d)") from the kernel call's arguments."""
    m = _SOURCE.match(source)
    if m is None:
        raise _Unfit(f"size read as {source!r}")
    a = node.args[int(m.group(1))]
    v = a.meta.get("val") if isinstance(a, Node) else a
    if m.group(2) is not None:
        v = v.shape[int(m.group(2))] if isinstance(v, torch.Tensor) else None
    if isinstance(v, int | torch.SymInt):
        return _graph_size(v, symbols)
    raise _Unfit(f"size {source} of {node.target} is not a size")


def _graph_size(x: Any, symbols: dict[Any, str]) -> str:
    """A size as Python: a literal, or a sum/product of sizes read from graph inputs."""
    if not isinstance(x, torch.SymInt):
        return str(int(x))
    e = x.node.expr
    if e in symbols:
        return symbols[e]
    names = {str(sym): symbols.get(sym) for sym in e.free_symbols}
    text = str(e)
    if None in names.values() or not re.fullmatch(r"[\w +*()-]+", text):
        raise _Unfit(f"size {e} is not read from graph inputs")
    return "(" + re.sub(r"\b\w+\b", lambda m: f"({names.get(m[0], m[0])})", text) + ")"


def _graph_sizes(sizes: Any, symbols: dict[Any, str]) -> str:
    """A Python tuple of sizes, each a literal or read from a graph input."""
    return "(" + "".join(f"{_graph_size(x, symbols)}, " for x in sizes) + ")"


def _plan(gm, kernels, plan, var, bind, expr):
    from yirage_dynamo.lowering.c_renderer import CRenderer

    symbols = _symbol_sources(gm, var)
    # Nodes whose value the fast path has as a Python variable (or inline expression).
    in_python: set[Node] = set(gm.graph.find_nodes(op="placeholder"))
    in_python |= set(gm.graph.find_nodes(op="get_attr"))
    prelude: list[str] = []  # ATen calls before the first kernel, run by the wrapper
    dynamic: list[str] = []
    constants: list[tuple[str, tuple[int, ...]]] = []
    arena: list[int] = []
    checks: list[str] = []
    allocs: list[str] = []
    where: dict[Node, tuple[str, int]] = {}  # node -> (entry key, byte offset)
    keys: dict[str, int] = {}  # entry key -> table index, assigned after the walk
    steps: list[tuple[str, bool, list[tuple[str, int]]]] = []
    multi: dict[Node, list[str]] = {}
    allocated: dict[Node, str] = {}  # node -> the wrapper variable it is allocated as
    temp_bytes = 0
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    single = not isinstance(out_node.args[0], list | tuple)
    results = [out_node.args[0]] if single else list(out_node.args[0])
    outputs = {a for a in results if isinstance(a, Node)}

    def alloc(name: str, shape: str, stride: str, dtype: torch.dtype, node: Node, j: int) -> str:
        nonlocal temp_bytes
        v = node.meta.get("val")
        v = v[j] if isinstance(v, list | tuple) else v
        if any(c.isalpha() for c in shape + stride):  # kernel symbols: graph terms instead
            shape, stride = _graph_sizes(v.shape, symbols), _graph_sizes(v.stride(), symbols)
        allocs.append(
            f"{name} = torch.empty_strided({shape}, {stride}, dtype={dtype}, device='cpu')"
        )
        if node not in outputs and isinstance(v, torch.Tensor):
            temp_bytes += v.numel() * v.itemsize
        dynamic.append(f"{name}.data_ptr()")
        return f"d:{name}.data_ptr()"

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if not node.users:
                continue
            v = node.meta.get("val")
            if isinstance(v, torch.Tensor):
                if v.device.type != "cpu":
                    raise _Unfit(f"{node.name} is not a CPU tensor")
                if all(type(x) is int for x in (*v.shape, *v.stride())):
                    checks.append(_entry_check(var[node], v))
                elif CRenderer().is_contiguous(v):  # symbolic sizes: contiguity only
                    checks.append(f"{var[node]}.is_contiguous()")
                else:
                    raise _Unfit(f"{node.name} has a symbolic non-contiguous layout")
                dynamic.append(f"{var[node]}.data_ptr()")
                where[node] = (f"d:{var[node]}.data_ptr()", 0)
            continue
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                raise _Unfit(f"constant {node.target} is not a CPU tensor")
            name = bind(value, node.target)
            constants.append((name, tuple(value.stride())))
            where[node] = (f"c:{name}", 0)
            continue
        if node.op == "output":
            break
        if node.op == "call_module":
            fn = kernels.get(node.target)
            kernel = getattr(fn, "rendered", None)
            if kernel is None or getattr(fn, "run_program", None) is None:
                raise _Unfit(f"{node.target} has no compiled kernel with a packed entry")
            for guard in kernel.guards:  # the launcher's conditions, over graph inputs
                for sym, src in kernel.symbol_sources.items():
                    value = _size_value(node, src, symbols)
                    guard = re.sub(rf"\b{re.escape(sym)}\b", f"({value})", guard)
                checks.append(f"({guard})")
            outs: list[tuple[str, int]] = []
            for j, (shape, stride, dtype) in enumerate(kernel.outputs):
                k = plan.index.get(node.name) if plan is not None else None
                if not kernel.multi_output and k is not None and fn.accepts_out:
                    arena.append(k)
                    outs.append((f"a:{k}", 0))
                else:
                    outs.append((alloc(f"{var[node]}_{j}", shape, stride, dtype, node, j), 0))
            if kernel.multi_output:
                multi[node] = [key for key, _ in outs]
            elif outs:
                where[node] = outs[0]
                if outs[0][0].startswith("d:"):
                    allocated[node] = _var_of(outs[0][0])
            slots = []
            for p in kernel.params:
                if p.kind == "out":
                    slots.append(outs[p.index])
                elif p.kind == "tensor":
                    a = node.args[p.index]
                    if a not in where:
                        raise _Unfit(f"{node.target} reads {getattr(a, 'name', a)}, not mapped")
                    slots.append(where[a])
                elif p.kind == "sym":
                    value = _size_value(node, kernel.symbol_sources[p.symbol], symbols)
                    if value not in dynamic:
                        dynamic.append(value)
                    slots.append((f"d:{value}", 0))
                else:
                    raise _Unfit(f"{node.target} takes a {p.kind} argument")
            name = bind(fn, getattr(fn, "kernel_name", "kernel"))  # already bound: its name
            steps.append((name, bool(kernel.returns_status), slots))
            continue
        if node.target is operator.getitem and node.args[0] in multi:
            where[node] = (multi[node.args[0]][node.args[1]], 0)
            allocated[node] = _var_of(where[node][0])
            continue
        if node.op == "call_function" and _is_view(node) and node.args[0] in where:
            if not steps and node.args[0] in in_python:
                # A view the wrapper can evaluate too (an ATen call before the program
                # may read it): inline when the wrapper elides it, else its own line.
                if not var[node].startswith("("):
                    prelude.append(f"{var[node]} = {expr(node)}")
                in_python.add(node)
            v, base = _static_val(node), _static_val(node.args[0])
            if v.dtype != base.dtype:
                raise _Unfit(f"{node.name} changes dtype")
            key, off = where[node.args[0]]
            where[node] = (key, off + (v.storage_offset() - base.storage_offset()) * v.itemsize)
            continue
        if (
            not steps
            and node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
        ):
            # Before the first kernel (e.g. the embedding of a whole-model graph): the
            # wrapper runs it, and its result is an input of the program.
            v = node.meta.get("val")
            if not isinstance(v, torch.Tensor) or any(
                a not in in_python for a in node.all_input_nodes
            ):
                raise _Unfit(f"{node.name} ({node.target}) is not one of our kernels")
            prelude.append(f"{var[node]} = {expr(node)}")
            in_python.add(node)
            dynamic.append(f"{var[node]}.data_ptr()")
            where[node] = (f"d:{var[node]}.data_ptr()", 0)
            allocated[node] = var[node]
            continue
        raise _Unfit(f"{node.name} ({node.target}) is not one of our kernels")
    if temp_bytes > MAX_TEMP_BYTES:
        raise _Unfit(f"{temp_bytes} bytes of temporaries")
    rets = []
    for a in results:
        if a is None:
            rets.append("None")
        elif isinstance(a, Node) and a.op == "placeholder":
            rets.append(var[a])
        elif isinstance(a, Node) and a in allocated:
            rets.append(allocated[a])
        elif isinstance(a, Node) and _var_of(where.get(a, ("", 0))[0]) in allocated.values():
            # A view of a tensor allocated here (e.g. the logits' [1, V] -> [1, 1, V]).
            v, (key, off) = _static_val(a), where[a]
            at = f"{tuple(v.shape)}, {tuple(v.stride())}, {off // v.itemsize}"
            rets.append(f"{_var_of(key)}.as_strided({at})")
        else:
            raise _Unfit(f"output {getattr(a, 'name', a)} is not a tensor the wrapper allocates")
    ret = rets[0] if single else "(" + "".join(f"{r}, " for r in rets) + ")"
    for value in dynamic:
        keys[f"d:{value}"] = len(keys)
    for name, _ in constants:
        keys.setdefault(f"c:{name}", len(keys))
    for k in arena:
        keys.setdefault(f"a:{k}", len(keys))
    spec = ProgramSpec(
        dynamic=dynamic,
        constants=list(dict.fromkeys(constants)),
        arena=list(dict.fromkeys(arena)),
        steps=[(n, s, [(keys[k], off) for k, off in args]) for n, s, args in steps],
    )
    return spec, checks, prelude + allocs, ret


def _var_of(key: str) -> str:
    """The wrapper variable behind a dynamic pointer entry ("d:<var>.data_ptr()")."""
    return key[2:].removesuffix(".data_ptr()") if key.endswith(".data_ptr()") else ""


class Program:
    """The encoded program and its pointer table (one per wrapper instance)."""

    def __init__(self, spec: tuple, namespace: dict[str, Any]) -> None:
        dynamic, constants, arena, steps = spec
        launchers = [namespace[name] for name, _, _ in steps]
        self.run = launchers[0].run_program if launchers else None
        if self.run is None or any(f.packed_address is None for f in launchers):
            raise ValueError("a kernel without a packed entry")
        n_dyn = len(dynamic)
        table = [0] * (n_dyn + len(constants) + len(arena))
        for i, (name, strides) in enumerate(constants):
            value = namespace[name]
            if tuple(value.stride()) != tuple(strides):
                raise ValueError(f"constant {name} has strides {tuple(value.stride())}")
            table[n_dyn + i] = value.data_ptr()
        self.keep = [namespace[name] for name, _ in constants]
        self.arena_at = [(n_dyn + len(constants) + i, k) for i, k in enumerate(arena)]
        code = [n_dyn, len(steps)]
        for name, status, args in steps:
            code += [namespace[name].packed_address, int(status), len(args)]
            for entry, off in args:
                code += [entry, off]
        self._code = (ctypes.c_int64 * len(code))(*code)
        self._table = (ctypes.c_int64 * max(1, len(table)))(*table)
        self.code = ctypes.addressof(self._code)
        self.table = ctypes.addressof(self._table)
        self.bufs: Any = None

    def refresh(self, bufs: list[torch.Tensor]) -> None:
        """Point the arena entries at these views (the arena may have moved)."""
        for entry, k in self.arena_at:
            self._table[entry] = bufs[k].data_ptr()
        self.bufs = bufs


def install(namespace: dict[str, Any]) -> None:
    """Build the wrapper's program (exec_wrapper, after the source ran), or leave `_prog`
    None so the ordinary body runs."""
    spec = namespace.get("_PROGRAM")
    prog = None
    if spec is not None:
        try:
            prog = Program(spec, namespace)
        except (ValueError, KeyError, AttributeError, TypeError):
            prog = None
    namespace["_prog"] = prog
    if spec is not None:
        namespace["_prog_note"] = (
            f"kernel program: {len(spec[3])} kernels in one call"
            if prog is not None
            else "kernel program not used: a kernel without a packed entry"
        )
    namespace["_prog_run"] = prog.run if prog is not None else None
    namespace["_prog_code"] = prog.code if prog is not None else 0
    namespace["_prog_table"] = prog.table if prog is not None else 0
