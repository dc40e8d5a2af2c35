"""YIRAGE_DEBUG for the CUDA lowering: the graph after our Triton swaps, and our kernels.

The pass pipeline dumps each pass's graph (passes/__init__.py). On CUDA what runs next is
decided here, in the lowering: which nodes became which `yirage_cuda` Triton op, with which
launch constants (measured per GPU), and whether the rest goes to Inductor or runs as is.
So, with `debug` on, the lowering also writes
  <graph dir>/<stem>.txt                the graph as lowered (before Inductor, if any)
  <graph dir>/kernels/<op>_<hash>.py    per yirage_cuda op: a header naming every FX node
                                        it runs for (`yirage_origin`) with its launch
                                        constants, then the Python launcher and the
                                        @triton.jit kernels it launches, transitively
and the report's KernelRecords point at those files. Inductor's own generated code is
Inductor's to dump (TORCH_COMPILE_DEBUG=1).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

log = logging.getLogger("yirage_dynamo")
_NAME = re.compile(r"[A-Za-z_]\w*")
_OUR_MODULES = ("yirage_dynamo.",)


def _is_jit(obj: Any) -> bool:
    # triton.runtime.JITFunction, without importing Triton here.
    return hasattr(obj, "fn") and hasattr(obj, "src") and callable(getattr(obj, "run", None))


def op_launcher(fn: Callable, modules: tuple[str, ...] = _OUR_MODULES) -> Callable:
    """The function an op was defined with. `torch.library.triton_op` registers a wrapper
    (it turns off wrap_triton's HOP dispatch) that closes over it; dumping the wrapper would
    show torch's code, not ours."""
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if inspect.isfunction(inner) and inner.__module__.startswith(modules):
            return inner
    return fn


def referenced_sources(
    fn: Callable,
    is_kernel: Callable[[Any], bool] = _is_jit,
    modules: tuple[str, ...] = _OUR_MODULES,
) -> list[tuple[str, str]]:
    """(name, source) of `fn` and of what its source names, transitively: functions of
    `modules` and kernels (`is_kernel`, whose Python function is `.fn`), each once, in
    the order first met."""
    out: list[tuple[str, str]] = []
    seen: set[int] = set()
    todo: list[Any] = [fn]
    while todo:
        obj = todo.pop(0)
        py = obj.fn if is_kernel(obj) else obj
        if id(py) in seen:  # a kernel and its own Python function are one source
            continue
        seen.add(id(py))
        try:
            src = inspect.getsource(py)
        except (OSError, TypeError):
            continue
        out.append((py.__name__, src))
        names = py.__globals__
        for word in dict.fromkeys(_NAME.findall(src)):
            ref = names.get(word)
            if ref is None or ref is obj:
                continue
            ours = inspect.isfunction(ref) and ref.__module__.startswith(modules)
            if ours or is_kernel(ref):
                todo.append(ref)
    return out


def _launch_constants(node: Node) -> str:
    consts = [repr(a) for a in node.args if not isinstance(a, Node | list | tuple)]
    consts += [f"{k}={v!r}" for k, v in node.kwargs.items() if not isinstance(v, Node)]
    return ", ".join(consts) or "(none)"


def dump_lowered(gm: GraphModule, ctx: Any, stem: str, namespace: str = "yirage_cuda") -> None:
    """Write the lowered graph and one source file per Triton op it calls (see module).
    A failure here is logged, never raised: debugging must not change what compiles."""
    try:
        _dump_lowered(gm, ctx, stem, namespace)
    except Exception as exc:  # noqa: BLE001
        log.warning("yirage: YIRAGE_DEBUG dump of the CUDA lowering failed: %s", exc)


def _dump_lowered(gm: GraphModule, ctx: Any, stem: str, namespace: str) -> None:
    from torch._library.custom_ops import _maybe_get_opdef

    from yirage_dynamo.debug import dump_graph, dump_text

    dump_graph(ctx, gm, stem)
    by_op: dict[str, list[Node]] = {}
    for n in gm.graph.nodes:
        t = n.target
        if n.op == "call_function" and isinstance(t, torch._ops.OpOverload):
            if t.namespace == namespace:
                by_op.setdefault(t._opname, []).append(n)
    paths: dict[str, Path] = {}
    for name, nodes in by_op.items():
        fn = getattr(_maybe_get_opdef(nodes[0].target), "_init_fn", None)
        sources = referenced_sources(op_launcher(fn)) if fn is not None else []
        body = "\n\n".join(src for _, src in sources) or "# (no Python source found)\n"
        digest = hashlib.sha256(body.encode()).hexdigest()[:10]
        header = f"# yirage kernel {name} ({namespace}::{name})\n"
        header += "# FX origins -> this node: launch constants\n"
        header += "".join(
            f"#   {n.meta.get('yirage_origin', n.name)} -> {n.name}: {_launch_constants(n)}\n"
            for n in nodes
        )
        paths[name] = dump_text(ctx, f"kernels/{name}_{digest}.py", header + "\n" + body)
    for record in ctx.report.kernels:
        if record.device == "cuda" and record.source_path is None and record.name in paths:
            record.source_path = str(paths[record.name])
