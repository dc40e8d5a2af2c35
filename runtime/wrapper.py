"""Generate the Python wrapper that runs a lowered graph.

Like Inductor's output code: straight-line Python that calls compiled kernels and ATen
extern ops in graph order, frees each buffer after its last use, and takes its inputs
boxed (a list it clears, so inputs can be freed early). Two bodies are generated: a
plain one, and one with a `record_function` range per call that is used only while the
torch profiler is running, so profiling costs nothing otherwise.
"""

from __future__ import annotations

import hashlib
import keyword
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node

_LITERALS = (int, bool, str, type(None))

aten = torch.ops.aten
# View ops whose positional ATen signature matches the Tensor method's.
_TENSOR_METHODS = {
    aten.view.default: "view",
    aten._unsafe_view.default: "view",
    aten.reshape.default: "reshape",
    aten.t.default: "t",
    aten.transpose.int: "transpose",
    aten.permute.default: "permute",
    aten.unsqueeze.default: "unsqueeze",
    aten.squeeze.dim: "squeeze",
    aten.select.int: "select",
    aten.expand.default: "expand",
}


# Extern ops called as the `torch.*` function of the same name: the Python argument parser
# is ~1.3 us cheaper per call than OpOverload.__call__ (4 GEMMs per decoder layer), and
# these functions take the op's arguments (and `out=`) under the same names.
_TORCH_FUNCTIONS = {
    aten.mm.default: "mm",
    aten.mm.out: "mm",
    aten.bmm.default: "bmm",
    aten.bmm.out: "bmm",
    aten.addmm.default: "addmm",
    aten.addmm.out: "addmm",
}


class _Namer:
    def __init__(self) -> None:
        self.globals: dict[str, Any] = {}
        # name -> how to rebuild the value in another process (runtime/graph_cache.py);
        # None where it cannot be described (the graph is then not cached).
        self.specs: dict[str, tuple | None] = {}
        self._by_id: dict[int, str] = {}

    def bind(self, value: Any, hint: str, spec: tuple | None = None) -> str:
        key = id(value)
        if key in self._by_id:
            return self._by_id[key]
        base = "".join(c if c.isalnum() else "_" for c in hint).strip("_") or "g"
        if base[0].isdigit() or keyword.iskeyword(base):
            base = "g_" + base
        name, i = base, 0
        while name in self.globals:
            i += 1
            name = f"{base}_{i}"
        self.globals[name] = value
        self.specs[name] = spec if spec is not None else _spec_of(value)
        self._by_id[key] = name
        return name


def _spec_of(value: Any) -> tuple | None:
    if isinstance(value, torch._ops.OpOverload):
        return ("op", str(value))
    if isinstance(value, torch.device):
        return ("device", str(value))
    if value is torch:
        return ("torch",)
    if value is operator.getitem:
        return ("getitem",)
    return None


def _target_hint(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}_{target._opname}_{target._overloadname}"
    return getattr(target, "__name__", "fn")


class WrapperCodegen:
    def __init__(self, gm: GraphModule, kernels: dict[str, Callable], plan: Any = None):
        self.gm = gm
        self.kernels = kernels
        # passes.memory_plan.MemoryPlan: its buffers are written via out= into arena views.
        self.plan = plan
        self.names = _Namer()
        self.names.globals["torch"] = torch
        self.names.specs["torch"] = ("torch",)
        self.var: dict[Node, str] = {}
        self.program_note = ""

    def arg(self, a: Any) -> str:
        if isinstance(a, Node):
            return self.var[a]
        if isinstance(a, list | tuple):
            inner = ", ".join(self.arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {self.arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, float):
            return repr(a) if math.isfinite(a) else f"float('{a}')"
        if isinstance(a, _LITERALS):
            return repr(a)
        if isinstance(a, torch.dtype | torch.layout | torch.memory_format):
            return str(a)
        return self.names.bind(a, type(a).__name__.lower())

    def call_expr(self, node: Node) -> tuple[str, str]:
        """(expression, label for the profiler) of one node."""
        if node.op == "call_module":
            fn = self.kernels.get(node.target) or getattr(self.gm, node.target)
            label = getattr(fn, "kernel_name", node.target)
            # A region without a compiled kernel runs its ATen graph (stateless: shareable).
            spec = ("kernel", node.target) if node.target in self.kernels else ("module", fn)
            callee = self.names.bind(fn, label, spec)
            args = ", ".join([self.arg(a) for a in node.args] + self.out_kwarg(node))
            return f"{callee}({args})", label
        target = node.target
        if target is operator.getitem and isinstance(node.args[0], Node) and not node.kwargs:
            return f"{self.arg(node.args[0])}[{self.arg(node.args[1])}]", "getitem"
        if target is aten.alias.default and not node.kwargs:
            return self.arg(node.args[0]), "alias"  # same tensor object: no call needed
        method = _TENSOR_METHODS.get(target)
        if method and not node.kwargs and node.args and isinstance(node.args[0], Node):
            # A view as a Tensor method skips the OpOverload layer: ~1.5 µs of ~5 per call,
            # and decode graphs are mostly views around GEMMs.
            rest = ", ".join(self.arg(a) for a in node.args[1:])
            return f"{self.arg(node.args[0])}.{method}({rest})", _target_hint(target)
        if self.out_kwarg(node):
            from yirage_dynamo.passes.memory_plan import out_variant

            target = out_variant(target, node.meta["val"].device.type)
        spec = None
        if getattr(target, "namespace", None) == "yirage":
            # Same function the dispatcher would run, minus the custom-op overhead.
            from yirage_dynamo.ops import direct_impls

            impl = direct_impls().get(target)
            if impl is not None:
                target, spec = impl, ("impl", str(node.target))
        callee = self.names.bind(target, _target_hint(node.target), spec)
        if target in _TORCH_FUNCTIONS and all(isinstance(v, torch.Tensor) for v in _vals(node)):
            callee = f"torch.{_TORCH_FUNCTIONS[target]}"
        elif type(target) is torch._ops.OpOverload:
            callee += "._op"  # what OpOverload.__call__ calls, without its Python frame
        parts = [self.arg(a) for a in node.args]
        parts += [f"{k}={self.arg(v)}" for k, v in node.kwargs.items()] + self.out_kwarg(node)
        return f"{callee}({', '.join(parts)})", _target_hint(node.target)

    def collapsed_view(self, node: Node, elided: set[Node]) -> tuple[str, str] | None:
        """(one as_strided, its guard) for the end of a chain of static-shape views.

        A chain like slice -> view -> view -> transpose costs a call per link; its result
        is one as_strided of the chain's base. The guard re-checks the base's strides at
        run time (they are what the precomputed layout assumes); if they differ, the
        chain runs link by link.
        """
        if not (isinstance(node.args[0], Node) and node.args[0] in elided):
            return None
        base = node.args[0]
        while base in elided:
            base = base.args[0]
        layout, base_layout = _static_layout(node), _static_layout(base)
        if layout is None or base_layout is None:
            return None
        size, stride, offset = layout
        b = self.var[base]
        delta = offset - base_layout[2]
        fast = f"{b}.as_strided({list(size)}, {list(stride)}, {b}.storage_offset() + {delta})"
        return fast, f"{b}.stride() == {base_layout[1]!r}"

    def kernel_program(self, plain: list[str]) -> str:
        """Insert the kernel-program fast path (runtime/kernel_program.py) after `plain`'s
        input unpacking, where the graph qualifies; the module-level source it needs."""
        if not any(hasattr(k, "rendered") for k in self.kernels.values()):
            return ""
        from .kernel_program import plan_program

        planned = plan_program(
            self.gm,
            self.kernels,
            self.plan,
            self.var,
            self.names.bind,
            lambda node: self.call_expr(node)[0],
        )
        if isinstance(planned, str):
            self.program_note = f"kernel program not used: {planned}"
            return ""
        spec, checks, allocs, ret = planned
        fast = ["args.clear()"]
        if self.plan is not None:
            sig = self.plan.sig_source(
                [self.var[n] for n in self.gm.graph.find_nodes(op="placeholder")]
            )
            fast += [
                f"_bufs = _arena({sig})",
                "if _bufs is not _prog.bufs:",
                "    _prog.refresh(_bufs)",
            ]
        ptrs = "".join(f", {value}" for value in spec.dynamic)
        fast += [*allocs, f"_prog_run(_prog_code, _prog_table{ptrs})", f"return {ret}"]
        cond = " and ".join(["_prog_run is not None", *checks])
        plain[1:1] = [f"if {cond}:", *(f"    {line}" for line in fast)]
        return f"_PROGRAM = {spec.literal()}\n\n\n"

    def out_kwarg(self, node: Node) -> list[str]:
        """`out=<arena view>` for a planned buffer, else nothing."""
        k = self.plan.index.get(node.name) if self.plan is not None else None
        return [] if k is None else [f"{self.plan.buffers[k].out_arg}=_bufs[{k}]"]

    def render(self) -> str:
        nodes = list(self.gm.graph.nodes)
        elided = _elidable_views(nodes)
        position = {n: i for i, n in enumerate(nodes)}

        def chain_end(n: Node) -> Node:
            # An elided view is evaluated where its chain ends, which reads the chain's
            # base there: the base must live until then, not just until the first link.
            while n in elided:
                n = next(iter(n.users))
            return n

        last_use: dict[Node, Node] = {}
        for node in nodes:
            user = chain_end(node)
            for inp in node.all_input_nodes:
                if inp not in last_use or position[user] > position[last_use[inp]]:
                    last_use[inp] = user
        frees: dict[Node, list[Node]] = {}
        for value, user in last_use.items():
            if value.op != "get_attr":
                frees.setdefault(user, []).append(value)

        placeholders = [n for n in nodes if n.op == "placeholder"]
        for i, n in enumerate(placeholders):
            self.var[n] = f"in{i}_{n.name}"[:48]
        plain: list[str] = []
        profiled: list[str] = []
        if placeholders:
            unpack = ", ".join(self.var[n] for n in placeholders)
            plain.append(f"{unpack}, = args")
        else:
            plain.append("pass")
        plain.append("args.clear()")
        if self.plan is not None:
            sig = self.plan.sig_source([self.var[n] for n in placeholders])
            plain.append(f"_bufs = _arena({sig})")
        profiled.extend(plain)
        for node in nodes:
            if node.op == "placeholder":
                continue
            if node in elided:
                # Inlined into its only user, the next view of the chain; what it frees
                # is freed there.
                self.var[node] = f"({self.call_expr(node)[0]})"
                continue
            if node.op == "output":
                ret = f"return {self.arg(node.args[0])}"
                plain.append(ret)
                profiled.append(ret)
                break
            if node.op == "get_attr":
                value = getattr(self.gm, node.target)
                self.var[node] = self.names.bind(value, node.target, ("const", node.target))
                continue
            self.var[node] = f"v_{node.name}"
            expr, label = self.call_expr(node)
            fast = self.collapsed_view(node, elided)
            if fast is not None:
                expr = f"{fast[0]} if {fast[1]} else {expr}"
            line = f"{self.var[node]} = {expr}"
            plain.append(line)
            profiled.append(f"with _record_function({label!r}):")
            profiled.append(f"    {line}")
            dead = [self.var[v] for v in frees.get(node, []) if v in self.var and v not in elided]
            dead += [] if node.users else [self.var[node]]
            if dead:
                stmt = f"del {', '.join(dict.fromkeys(dead))}"
                plain.append(stmt)
                profiled.append(stmt)
        prelude = self.kernel_program(plain)
        body = "\n    ".join(plain)
        pbody = "\n    ".join(profiled)
        return (
            prelude + f"def call(args):\n    {body}\n\n\n"
            f"def call_profiled(args):\n    {pbody}\n\n\n"
            "def run(args):\n"
            "    if _profiler._is_profiler_enabled:\n"
            "        with _record_function(_wrapper_range):\n"
            "            return call_profiled(args)\n"
            "    return call(args)\n"
        )


# Ops that always return a view of their input (reshape may copy, so it is not one).
_CHAIN_VIEWS = (set(_TENSOR_METHODS) - {aten.reshape.default}) | {
    aten.slice.Tensor,
    aten.alias.default,
}


def _vals(node: Node) -> list[Any]:
    return [a.meta.get("val") for a in node.all_input_nodes]


def _static_layout(node: Node) -> tuple[tuple, tuple, int] | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    layout = (tuple(val.shape), tuple(val.stride()), val.storage_offset())
    flat = [*layout[0], *layout[1], layout[2]]
    return layout if all(type(x) is int for x in flat) else None


def _is_chain_view(node: Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in _CHAIN_VIEWS
        and not node.kwargs
        and isinstance(node.args[0], Node)
        and not any(isinstance(a, Node) for a in node.args[1:])
        and _static_layout(node) is not None
    )


def _elidable_views(nodes: list[Node]) -> set[Node]:
    """Static-shape views whose only user is the next static-shape view of a chain."""
    return {
        n
        for n in nodes
        if _is_chain_view(n)
        and len(n.users) == 1
        and _is_chain_view(next(iter(n.users)))
        and next(iter(n.users)).args[0] is n
    }


def build_wrapper(gm: GraphModule, ctx: Any, kernels: dict[str, Callable]) -> Callable:
    """Render, exec and return the boxed `run(args)` for a lowered graph."""
    from yirage_dynamo.passes.memory_plan import finalize_plan

    plan = finalize_plan(gm, ctx, kernels)
    gen = WrapperCodegen(gm, kernels, plan)
    source = gen.render()
    stable = False
    if plan is not None:
        opts = ctx.options
        stable = opts.cudagraphs is True or opts.mode == "reduce-overhead"
    run = exec_wrapper(source, dict(gen.names.globals), plan, stable)
    if ctx is not None:
        ctx.artifacts["wrapper"] = {
            "source": source,
            "specs": dict(gen.names.specs),
            "plan": plan,
            "stable": stable,
        }
        note = gen.program_note or getattr(run, "program_note", "")
        if note:
            ctx.report.notes.append(note)
        ctx.report.extern_calls = sum(
            1 for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
        )
        if ctx.options.debug:
            from yirage_dynamo.debug import dump_text

            dump_text(ctx, f"{run.wrapper_name}.py", _header(gm) + source)
    return run


def exec_wrapper(
    source: str, globals_: dict[str, Any], plan: Any, stable: bool, arena: Any = None
) -> Callable:
    """Execute generated wrapper source with its globals; the boxed `run(args)`.
    `arena`: the PlannedViews of another instance of the same program to share."""
    from yirage_dynamo.runtime.arena import PlannedViews

    digest = hashlib.sha256(source.encode()).hexdigest()[:10]
    namespace = dict(globals_)
    namespace["_profiler"] = torch.autograd.profiler
    namespace["_record_function"] = torch.profiler.record_function
    if plan is not None:
        namespace["_arena"] = arena if arena is not None else PlannedViews(plan, stable=stable)
    # The whole call is one range too; its children are the per-node ranges, which is
    # how profiling.kernel_time_table tells our calls apart from other annotations.
    namespace["_wrapper_range"] = f"[yirage] wrapper_{digest}"
    exec(compile(source, f"<yirage_wrapper_{digest}>", "exec"), namespace)
    if "_PROGRAM" in namespace:
        from .kernel_program import install

        install(namespace)
    run = namespace["run"]
    run._boxed_call = True
    run.source = source
    run.arena = namespace.get("_arena")
    run.wrapper_name = f"wrapper_{digest}"
    run.program_note = namespace.get("_prog_note", "")
    return run


def _header(gm: GraphModule) -> str:
    return "# yirage generated wrapper\n# graph:\n" + "".join(
        f"#   {line}\n" for line in str(gm.graph).splitlines()[:400]
    )
