"""CPU lowering: C++/OpenMP kernels for fused regions, ATen (oneDNN/MKL) for GEMMs.

passes/fusion.py groups pointwise ops, reductions and views into `call_module` regions;
here every region is rendered by the C-style renderer (lowering/c_renderer.py), all
kernels of the graph are compiled in one C++ translation unit, or two built side by side
when their source is large (`split_units`; runtime/cpp_build.py), and
the generated wrapper calls them through small Python launchers. `yirage::attention` gets
its own C++ kernel (lowering/c_attention.py: GQA without repeat_kv, masked-off cache slots
never read) where it can compute it exactly; GEMMs, embedding and index ops stay extern
ATen calls. A region the renderer cannot handle runs
its ATen reference (the region submodule) and is noted in the report; no C++ compiler at
all means this lowering reports itself unavailable and the ATen lowering runs instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.fx import GraphModule

from .base import Capabilities, KernelSource, Lowering
from .c_renderer import CPP, CPP_PRELUDE, CRenderer, RenderedKernel, Unsupported

aten = torch.ops.aten

_NATIVE_YIRAGE = ("rms_norm", "rms_norm_residual", "gated_act", "rotary")

# What the fusion pass may put into CPU regions: everything the renderer renders except
# ops that are cheaper as ATen views of region outputs (handled by fusion itself).
_CPU_FUSIBLE = frozenset(
    {
        *(
            "add sub mul div neg abs exp exp2 expm1 log log1p log2 sqrt rsqrt reciprocal sin "
            "cos tan tanh erf floor ceil trunc round sigmoid silu relu gelu maximum minimum "
            "clamp clamp_min clamp_max where eq ne lt le gt ge logical_not logical_and "
            "logical_or bitwise_not bitwise_and bitwise_or isnan pow masked_fill _to_copy "
            "cat sum mean amax amin var view reshape _unsafe_view unsqueeze squeeze permute "
            "transpose t expand slice select alias clone"
        ).split(),
        "prims.convert_element_type",
        "prims.broadcast_in_dim",
        "prims.var",
        "prims.sum",
        "prims.div",
        "prims.mul",
        "prims.add",
        "prims.sub",
        "prims.reshape",
        "prims.squeeze",
        # yirage ops the fusion pass expands into the above (so they fuse with neighbours).
        *(f"yirage.{op}" for op in _NATIVE_YIRAGE),
    }
)


class CKernelSource(KernelSource):
    """A rendered region: the C function plus what its launcher needs."""

    def __init__(self, name: str, rendered: RenderedKernel, region: GraphModule) -> None:
        self.rendered = rendered
        self.region = region  # the ATen reference, for inputs with unexpected strides
        self.symbol = f"yk_{rendered.digest}"
        super().__init__(
            name=name,
            source=rendered.body.replace("FUNC", self.symbol, 1),
            origins=rendered.origins,
            language="c++",
        )


class CppLowering(Lowering):
    name = "cpp"
    capabilities = Capabilities(
        device_type="cpu",
        fusible_ops=_CPU_FUSIBLE,
        dtypes=frozenset(
            {torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool}
        ),
        # attention: its own C++ kernel (c_attention.py), not expanded for fusion.
        native_custom_ops=frozenset({*_NATIVE_YIRAGE, "attention"}),
        generates_kernels=True,
    )
    # Regional compilation: every decoder layer one program (embedding | layers | head).
    # Keeping the closing residual add in its layer costs one ~2 µs kernel per layer here
    # and saves compiling the first layer separately (~1.5 s: its trace, passes, g++).
    regional_fuse_across_blocks = False

    def __init__(self, cxx: str | None = None) -> None:
        # Read when the lowering is chosen (not at import): YIRAGE_CXX names the compiler.
        self.cxx = os.environ.get("YIRAGE_CXX", "") if cxx is None else cxx

    def available(self) -> str | None:
        from yirage_dynamo.runtime.cpp_build import find_compiler

        if find_compiler(self.cxx) is None:
            return (
                f"no C++ compiler found ({self.cxx or 'g++/c++/clang++'} not on PATH; "
                "set YIRAGE_CXX)"
            )
        return None

    def cache_salt(self) -> str:
        from yirage_dynamo.runtime import kernel_program

        from . import c_attention, c_gemv, c_kv_write

        envs = (c_attention.ENABLE_ENV, c_kv_write.ENABLE_ENV, c_gemv.ENABLE_ENV)
        envs += (kernel_program.ENABLE_ENV,)
        return ",".join(f"{e}={os.environ.get(e, '1')}" for e in envs)

    def decompositions(self) -> dict[Any, Callable]:
        # Composite norms/softmax decompose into reductions + pointwise ops that fuse;
        # GEMMs, SDPA and embedding stay whole (extern ATen calls).
        from torch._decomp import get_decompositions

        return get_decompositions(
            [
                aten._softmax,
                aten._log_softmax,
                aten.native_layer_norm,
                aten.var_mean,
                aten.rms_norm,
                aten.addcmul,
                aten.addcdiv,
                aten.hardswish,
                aten.hardsigmoid,
                aten.leaky_relu,
                aten.elu,
                aten.softplus,
                aten.rsub,
                aten.lerp,
            ]
        )

    def render(self, region: GraphModule, name: str) -> CKernelSource:
        from .c_attention import is_attention_region, render_attention
        from .c_gemv import is_gemv_region, render_gemv
        from .c_kv_write import is_kv_write_region, render_kv_write

        if is_attention_region(region):  # yirage::attention outlined by lower()
            return CKernelSource(name, render_attention(region), region)
        if is_gemv_region(region):  # decode-shaped aten.mm outlined by lower()
            return CKernelSource(name, render_gemv(region), region)
        if is_kv_write_region(region):  # static-cache index_copy_s outlined by lower()
            return CKernelSource(name, render_kv_write(region), region)
        return CKernelSource(name, CRenderer(CPP).render(region), region)

    def compile(self, sources: list[KernelSource], ctx: Any) -> dict[str, Callable]:
        from yirage_dynamo.runtime import cpp_build

        from yirage_dynamo.report import KernelRecord

        cxx = cpp_build.find_compiler(ctx.options.cxx or self.cxx)
        if cxx is None:
            raise cpp_build.BuildError("no C++ compiler found")
        unique: dict[str, CKernelSource] = {}
        for s in sources:
            unique.setdefault(s.symbol, s)  # identical regions (one per layer) share code
        units = split_units(list(unique.values()), os.cpu_count() or 1)
        texts = [unit_source(unit) for unit in units]
        unit_of = {s.symbol: i for i, unit in enumerate(units) for s in unit}
        stats: dict[str, int] = {}
        with ctx.report.stage("cpp_build"), ThreadPoolExecutor(1) as pool:
            # The fast-call trampoline (built once per machine) compiles alongside.
            trampoline = pool.submit(cpp_build.fast_caller, cxx, ctx.options.cache_path)
            sos = cpp_build.build_units(
                texts, cxx, ctx.options.cxx_flags, ctx.options.cache_path, stats
            )
            libs = [cpp_build.load_library(so) for so in sos]
            fast_call = trampoline.result()
        for k in ("hits", "misses"):
            ctx.report.cache[k] = ctx.report.cache.get(k, 0) + stats.get(k, 0)
        launchers = {
            sym: cpp_build.make_launcher(
                libs[unit_of[sym]], sym, s.rendered, sym, "cpu", s.region, fast_call
            )
            for sym, s in unique.items()
        }
        # What runtime/graph_cache.py needs to rebuild these launchers in another process.
        ctx.artifacts["cpp"] = {
            "sources": texts,
            "symbols": {s.name: s.symbol for s in sources},
            "kernels": {sym: (s.rendered, s.region, unit_of[sym]) for sym, s in unique.items()},
        }
        dumped: dict[str, str] = {}
        for s in sources:
            path = str(sos[unit_of[s.symbol]].with_name("kernels.cpp"))
            if ctx.options.debug:
                if s.symbol not in dumped:
                    dumped[s.symbol] = str(_dump_kernel(ctx, s))
                path = dumped[s.symbol]
            ctx.report.kernels.append(KernelRecord(s.name, "cpu", path, list(s.origins)))
        return {s.name: launchers[s.symbol] for s in sources}

    def lower(self, gm: GraphModule, ctx: Any) -> Callable:
        from yirage_dynamo.runtime.wrapper import build_wrapper

        self.check_graph(gm)
        from .c_attention import outline_attention

        # Attention nodes become one-node regions with our C++ kernel (c_attention.py).
        outline_attention(gm, ctx)
        # A layer's static-cache writes (+ its position counter) become one kernel.
        from .c_kv_write import outline_kv_writes

        outline_kv_writes(gm, ctx)
        # Decode-shaped GEMMs (M <= 4 rows) become our GEMV kernel: no MKL call per weight.
        from .c_gemv import outline_gemvs

        outline_gemvs(gm, ctx)
        sources: list[KernelSource] = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            try:
                sources.append(self.render(getattr(gm, node.target), node.target))
            except Unsupported as exc:
                ctx.report.notes.append(f"region {node.target} left to ATen: {exc}")
        kernels: dict[str, Callable] = {}
        if sources:
            from yirage_dynamo.runtime.cpp_build import BuildError

            try:
                kernels = self.compile(sources, ctx)
            except (BuildError, OSError) as exc:
                # Correct either way: every region still has its ATen reference.
                ctx.report.notes.append(f"C++ build failed, regions run on ATen: {exc}")
        return build_wrapper(gm, ctx, kernels=kernels)


# Kernel source (past the prelude) from which a graph's kernels are built as two
# translation units side by side rather than one: a decoder layer's unit is ~28 K
# characters and builds in 0.99 s, its attention template alone in 0.76 s; split, both
# finish in 0.73 s on two cores (RESULTS.md). Smaller units are not worth a second
# compiler start and prelude parse (~0.2 s).
SPLIT_UNIT_CHARS = 12_000


def split_units(kernels: list[CKernelSource], cores: int) -> list[list[CKernelSource]]:
    """The kernels as one or two translation units, balanced by source size (largest
    first into the smaller unit), each unit in the kernels' own order (stable sources,
    stable cache keys)."""
    n = min(2, cores, len(kernels))
    if n < 2 or sum(len(k.source) for k in kernels) < SPLIT_UNIT_CHARS:
        return [kernels]
    sizes = [0] * n
    unit_of: dict[int, int] = {}
    for i in sorted(range(len(kernels)), key=lambda i: -len(kernels[i].source)):
        unit = sizes.index(min(sizes))
        unit_of[i] = unit
        sizes[unit] += len(kernels[i].source)
    units = [[k for i, k in enumerate(kernels) if unit_of[i] == u] for u in range(n)]
    return [u for u in units if u]


def unit_source(kernels: list[CKernelSource]) -> str:
    """One translation unit: the prelude, the kernels, and their packed twins (one exact
    signature for all kernels) for the fast-call trampoline."""
    from yirage_dynamo.runtime import cpp_build

    source = CPP_PRELUDE + "\n" + "\n".join(s.source for s in kernels)
    return (
        source
        + "\n"
        + "".join(
            cpp_build.packed_entry(s.symbol, s.rendered.c_types, s.rendered.returns_status)
            for s in kernels
        )
    )


def _dump_kernel(ctx: Any, s: CKernelSource) -> Any:
    from yirage_dynamo.debug import dump_text

    digest = hashlib.sha256(s.source.encode()).hexdigest()[:10]
    header = "// yirage kernel " + s.name + "\n// FX origins:\n"
    header += "".join(f"//   {o}\n" for o in s.origins)
    return dump_text(ctx, f"kernels/{s.name}_{digest}.cpp", header + CPP_PRELUDE + s.source)
