"""The `yirage` TorchDynamo backend.

Flow per Dynamo graph:
  options -> device choice -> AOTAutograd capture (functional ATen, input mutations kept
  in-graph) -> pass pipeline -> device lowering -> generated wrapper.
Any failure falls back per `options["fallback"]` (Inductor, then eager) with a warning
naming the stage and reason, unless fallback="error".
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from yirage_dynamo.device import select_device
from yirage_dynamo.lowering import Lowering, choose_lowering
from yirage_dynamo.options import Options, parse_options
from yirage_dynamo.passes import run_pipeline
from yirage_dynamo.passes.context import PassContext, count_nodes
from yirage_dynamo.passes.freezing import release_free_heap
from yirage_dynamo.profiling import dynamo_trace_info
from yirage_dynamo.report import CompileReport, record

log = logging.getLogger("yirage_dynamo")


class StageError(RuntimeError):
    """A compile failure, tagged with the stage it happened in."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.cause = cause


def yirage(gm: GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """TorchDynamo backend entry point: `torch.compile(m, backend="yirage")`."""
    mode = kwargs.pop("mode", None)
    options = kwargs.pop("options", None)
    if kwargs:
        raise ValueError(
            f"unexpected yirage backend arguments {sorted(kwargs)}; it takes mode= and options="
        )
    from yirage_dynamo.frozen_weights import guard_frozen_weights

    inputs, opts = list(example_inputs), parse_options(options, mode)
    fn = compile_dynamo_graph(gm, inputs, opts)
    # Dynamo may hand this graph's code to another model of the same architecture.
    return guard_frozen_weights(fn, gm, inputs, opts, compile_dynamo_graph)


def compile_dynamo_graph(gm: GraphModule, example_inputs: list[Any], options: Options) -> Callable:
    """Compile one Dynamo graph: by its repeated blocks where that applies
    (yirage_dynamo/regional.py), else as one graph."""
    if options.regional:
        from yirage_dynamo import regional_backend

        fn = regional_backend.compile_by_blocks(gm, example_inputs, options)
        if fn is not None:
            return fn
    return compile_whole_graph(gm, example_inputs, options)


def compile_whole_graph(
    gm: GraphModule,
    example_inputs: list[Any],
    options: Options,
    programs: dict[str, Any] | None = None,
) -> Callable:
    """`programs`: in-memory programs of this Dynamo graph's regional pieces, by graph
    key; a piece whose key is there re-arms that program instead of compiling."""
    start = time.perf_counter()
    report = CompileReport(mode=options.mode)
    # Dynamo traced this frame before calling us: take that time from torch's accounting.
    report.dynamo_compile_id, dynamo_trace = dynamo_trace_info()
    if dynamo_trace is not None:
        report.stages["dynamo_trace"] = dynamo_trace
    try:
        with report.stage("device_selection"):
            device, reason = select_device(example_inputs, options)
            lowering, lowering_reason = choose_lowering(device)
        report.device = device
        report.device_reason = f"{reason}; {lowering_reason}"
        report.lowering = lowering.name
        # A lowering may take over the whole Dynamo graph (CUDA: Inductor's compile_fx).
        try:
            whole = lowering.compile_dynamo_graph(gm, example_inputs, options, report)
        except Exception as exc:  # noqa: BLE001
            raise StageError("lowering", exc) from exc
        if whole is not None:
            # Dynamo's trace time counts too, so the top-level stages sum to at most this.
            report.stages["total"] = report.stages.get("dynamo_trace", 0.0) + (
                time.perf_counter() - start
            )
            _finish(report, options)
            return whole
        from yirage_dynamo.runtime import graph_cache

        # A regional piece may be cached on disk too, but its key must not depend on it.
        key, why = graph_cache.graph_key(
            gm, example_inputs, options, lowering, disk=programs is None
        )
        report.graph_cache = f"not used: {why}" if key is None else "miss"
        if key is not None:
            shared = programs.get(key) if programs is not None else None
            if shared is not None:
                cached = shared.arm(options, example_inputs, lowering, report)
                hit = "re-armed (the program of a repeated block earlier in this graph)"
            elif graph_cache.on_disk(options):
                cached = graph_cache.try_load(
                    key, options, example_inputs, lowering, report, programs
                )
                hit = "hit"
            else:
                cached = None
            if cached is not None:
                report.graph_cache = hit
                report.stages["total"] = report.stages.get("dynamo_trace", 0.0) + (
                    time.perf_counter() - start
                )
                _finish(report, options)
                release_free_heap()
                # A failing first call falls back to the Dynamo graph itself (eager).
                mutated = getattr(cached, "mutated_inputs", frozenset())
                return _FirstCallGuard(cached, gm, report, options, mutated)
        options = lowering.aot_options(options)
        compiler = _AotCompiler(options, lowering, report, example_inputs, start)
        compiler.cache_key = key
        compiler.programs = programs
        compiler.dynamo_outputs = _output_count(gm)
        return compiler.capture(gm, example_inputs)
    except Exception as exc:  # noqa: BLE001 - every failure gets the fallback chain
        stage = exc.stage if isinstance(exc, StageError) else "capture"
        cause = exc.cause if isinstance(exc, StageError) else exc
        if isinstance(cause, torch._dynamo.exc.RestartAnalysis):
            # Not a failure: Dynamo's signal to re-trace (e.g. to tensorify a float scalar).
            raise cause from None
        if options.fallback == "error":
            raise
        return _fall_back(gm, example_inputs, options, report, stage, cause)


def _fall_back(
    gm: GraphModule,
    example_inputs: list[Any],
    options: Options,
    report: CompileReport,
    stage: str,
    cause: BaseException,
) -> Callable:
    reason = f"{type(cause).__name__}: {cause}"
    if options.fallback == "inductor":
        log.warning("yirage: %s failed (%s); falling back to Inductor", stage, reason)
        try:
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            patches = list_mode_options(options.mode) if options.mode else {}
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
            report.fallback(stage, reason, "inductor")
            _finish(report, options)
            return compiled
        except Exception as exc:  # noqa: BLE001
            log.warning("yirage: Inductor fallback failed (%s); running eagerly", exc)
            reason += f"; inductor fallback failed: {type(exc).__name__}: {exc}"
    else:
        log.warning("yirage: %s failed (%s); running eagerly", stage, reason)
    report.fallback(stage, reason, "eager")
    _finish(report, options)
    return gm.forward


def _finish(report: CompileReport, options: Options) -> None:
    if report in _recorded:
        return
    _recorded.add(report)
    record(report)
    if options.report:
        report.write(options.report)


class _RecordedSet:
    """Identity set of reports already recorded (reports are unhashable dataclasses)."""

    def __init__(self) -> None:
        # id -> weak reference: a freed report's id can be reused by a new report, which
        # must not then count as already recorded (it would silently vanish).
        self._refs: dict[int, weakref.ref] = {}

    def __contains__(self, r: object) -> bool:
        ref = self._refs.get(id(r))
        return ref is not None and ref() is r

    def add(self, r: object) -> None:
        self._refs[id(r)] = weakref.ref(r)


_recorded = _RecordedSet()


def _real_parameters(example_inputs: list[Any]) -> list[Any]:
    """Keep references only to parameters: holding activations would leak them."""
    return [t if isinstance(t, torch.nn.Parameter) else None for t in example_inputs]


class _AotCompiler:
    def __init__(
        self,
        options: Options,
        lowering: Lowering,
        report: CompileReport,
        example_inputs: list[Any],
        start: float,
    ) -> None:
        self.options = options
        self.lowering = lowering
        self.first_report = report
        self.real_inputs = _real_parameters(example_inputs)
        self.start = start
        # AOTAutograd's own time starts here, after device selection (its own stage).
        self.aot_start = time.perf_counter()
        self._first_used = False
        self.n_inputs = len(example_inputs)
        # Set by the caller when the graph may be stored in the whole-graph cache.
        self.cache_key: str | None = None
        # Regional pieces: where the compiled program is kept for repeats (by cache_key).
        self.programs: dict[str, Any] | None = None
        self.dynamo_outputs = 0
        # (placeholder count, inputs it mutates) of the inference graph, once compiled.
        self.mutations: tuple[int, frozenset[int]] | None = None
        # The compiled inference program, where AOTAutograd's runtime wrapper would add
        # nothing around it (runtime/graph_cache.aot_passthrough): Dynamo calls it directly.
        self.direct: Callable | None = None

    def capture(self, gm: GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._dynamo.backends.common import aot_autograd

        backend = aot_autograd(
            fw_compiler=self._compiler("forward"),
            bw_compiler=self._compiler("backward"),
            inference_compiler=self._compiler("inference"),
            decompositions=self.lowering.decompositions(),
            keep_inference_input_mutations=True,
        )
        # AOTAutograd runs a graph traced under autocast (its casts in the graph) with
        # autocast off: that is work for its wrapper.
        autocast = torch._C._is_any_autocast_enabled()
        fn = backend(gm, example_inputs)
        if self.direct is not None and not autocast:
            # ~390 inputs of a 7B decode step pass through several Python layers of
            # AOTAutograd's wrapper per call, host time the GPU waits for between steps.
            fn = self.direct
        n_in, mutated = self.mutations or (-1, frozenset())
        if n_in == len(example_inputs):
            # The inputs this graph writes, for a caller that replays it (a regional
            # piece inside a CUDA graph copies back only these); unknown: all of them.
            fn.mutated_inputs = mutated
        return fn

    def _compiler(self, kind: str) -> Callable:
        def compile_aot_graph(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
            return self.compile_aot_graph(gm, list(example_inputs), kind)

        return compile_aot_graph

    def _report_for(self, kind: str) -> CompileReport:
        if kind != "backward" and not self._first_used:
            self._first_used = True
            report = self.first_report
            report.stages["aot_autograd"] = time.perf_counter() - self.aot_start
        else:
            report = CompileReport(
                mode=self.options.mode,
                dynamo_compile_id=self.first_report.dynamo_compile_id,
                device=self.first_report.device,
                device_reason=self.first_report.device_reason,
                lowering=self.lowering.name,
            )
        report.kind = kind
        return report

    def _store(self, gm: GraphModule, ctx: PassContext, report: CompileReport) -> None:
        """Write this inference graph to the whole-graph cache, if AOTAutograd adds nothing."""
        from yirage_dynamo.runtime import graph_cache

        with report.stage("graph_cache"):
            why = graph_cache.aot_passthrough(gm, self.n_inputs, self.dynamo_outputs)
            entry = None
            if not why:
                entry, why = graph_cache.make_entry(ctx, gm, self.n_inputs)
            if entry is not None and self.programs is not None:
                self.programs[self.cache_key] = graph_cache.SharedProgram(entry)
            if entry is not None and graph_cache.on_disk(self.options):
                try:
                    why = graph_cache.write(self.cache_key, self.options, entry)
                except OSError as exc:
                    why = f"cache dir not writable: {exc}"
            elif entry is not None:
                why = "kept in memory for this graph's regional pieces"
        report.graph_cache = f"not stored: {why}" if why else "stored"

    def compile_aot_graph(self, gm: GraphModule, example_inputs: list[Any], kind: str) -> Callable:
        graph_start = time.perf_counter()
        report = self._report_for(kind)
        report.nodes_in = count_nodes(gm)
        pristine = _copy_graph_module(gm)
        ctx = PassContext(
            options=self.options,
            report=report,
            capabilities=self.lowering.capabilities,
            example_inputs=example_inputs,
            real_inputs=self.real_inputs if kind == "inference" else None,
            inference=kind == "inference",
            mutated_inputs=_mutated_inputs(gm),
        )
        stage = "passes"
        try:
            with report.stage("passes"):
                run_pipeline(gm, ctx)
            stage = "lowering"
            with report.stage("lowering"):
                fn = self.lowering.lower(gm, ctx)
        except Exception as exc:  # noqa: BLE001
            if kind == "backward" and self.options.fallback != "error":
                # Backward graphs compile lazily, after the forward already runs: run it eagerly.
                log.warning("yirage: backward %s failed (%s); running it eagerly", stage, exc)
                report.fallback(stage, f"{type(exc).__name__}: {exc}", "eager")
                _finish(report, self.options)
                return _FirstCallGuard(_boxed(pristine), None, report, self.options)
            raise StageError(stage, exc) from exc
        report.nodes_out = count_nodes(gm)
        if kind == "inference":
            n_in = sum(1 for n in pristine.graph.nodes if n.op == "placeholder")
            self.mutations = (n_in, ctx.mutated_inputs)
        if kind == "inference" and self.cache_key is not None:
            self._store(gm, ctx, report)
        guarded = _FirstCallGuard(fn, pristine, report, self.options, ctx.mutated_inputs)
        if kind == "inference" and self._aot_adds_nothing(pristine):
            self.direct = guarded
        # Wall time (plus Dynamo's trace), so the top-level stages sum to at most this.
        began = self.start if report is self.first_report else graph_start
        report.stages["total"] = report.stages.get("dynamo_trace", 0.0) + (
            time.perf_counter() - began
        )
        _finish(report, self.options)
        release_free_heap()
        return guarded

    def _aot_adds_nothing(self, gm: GraphModule) -> bool:
        from yirage_dynamo.runtime import graph_cache

        return not graph_cache.aot_passthrough(gm, self.n_inputs, self.dynamo_outputs)


def _output_count(gm: GraphModule) -> int:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    return len(out) if isinstance(out, list | tuple) else 1


def _mutated_inputs(gm: GraphModule) -> frozenset[int]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    mutated = {index[n.args[0]] for n in gm.graph.nodes if _mutates(n) and n.args[0] in index}
    ctx = torch._guards.TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx else None
    if meta is not None and len(meta.input_info) == len(placeholders):
        mutated |= {i for i, info in enumerate(meta.input_info) if info.mutates_data}
    return frozenset(mutated)


def _copy_graph_module(gm: GraphModule) -> GraphModule:
    """A structural copy (node meta shared shallowly: fake tensors can't be deep-copied).

    Lazy: its Python code is generated only if the fallback ever runs. Generating and
    compiling the code of a 30-layer decoder graph up front cost ~20 MB of transient host
    memory (and ~8 MB kept) for a copy that is almost never called.
    """
    from torch.fx._lazy_graph_module import _LazyGraphModule

    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return _LazyGraphModule(gm, graph)


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.is_mutable and node.args)


# Inputs larger than this in total are not snapshotted before a first call (a fallback
# after a failure half-way may then see some of its writes already applied).
_SNAPSHOT_BYTES = 256 << 20


def _snapshot(args: list[Any], mutated: frozenset[int]) -> dict[int, torch.Tensor]:
    tensors = {i: args[i] for i in mutated if i < len(args) and isinstance(args[i], torch.Tensor)}
    if sum(t.numel() * t.element_size() for t in tensors.values()) > _SNAPSHOT_BYTES:
        return {}
    with torch.no_grad():
        return {i: t.clone() for i, t in tensors.items()}


def _boxed(gm: GraphModule) -> Callable:
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(gm.forward)


class _Holder:
    """A mutable cell shared by reference (see _FirstCallGuard.__init__)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _FirstCallGuard:
    """Runs the compiled program; if its very first call fails, falls back to the
    unoptimised ATen graph (unless fallback="error"). Later calls go straight through."""

    _boxed_call = True

    def __init__(
        self,
        fn: Callable,
        pristine: GraphModule,
        report: CompileReport,
        options: Options,
        mutated: frozenset[int] = frozenset(),
    ):
        self.fn = fn
        # Inputs the graph writes (e.g. a KV cache, a position counter): restored before the
        # fallback re-runs the call, so a failure half-way does not apply a write twice.
        self.mutated = mutated
        # An instance attribute, so functools.wraps (dynamo's disable) carries it along.
        self._boxed_call = True
        # functools.wraps also copies every other instance attribute into the wrapper's
        # __dict__: the fallback graph sits in a shared holder, so that dropping it after
        # the first call frees it everywhere (as a plain attribute, the wrappers' copies
        # kept the whole pre-pass graph alive for the life of the compiled function).
        self._pristine = _Holder(pristine)
        self.report = report
        self.options = options

    @property
    def pristine(self) -> GraphModule | None:
        return self._pristine.value

    def __call__(self, *args: Any) -> Any:
        # AOTAutograd calls boxed (one list) where it sees `_boxed_call`, but some of its
        # wrappers (e.g. the backward's dynamo-disable) hide the attribute and unbox.
        args = args[0] if len(args) == 1 and type(args[0]) is list else list(args)
        if self._pristine.value is None:
            return self.fn(args)
        saved = list(args)
        snapshot = _snapshot(saved, self.mutated)
        try:
            out = self.fn(args)
        except Exception as exc:  # noqa: BLE001
            if self.options.fallback == "error":
                raise
            log.warning("yirage: compiled graph failed at run time (%s); running eagerly", exc)
            with torch.no_grad():
                for i, value in snapshot.items():
                    saved[i].copy_(value)
            self.report.fallback("runtime", f"{type(exc).__name__}: {exc}", "eager")
            if self.options.report:
                self.report.write(self.options.report)  # the JSON written at compile is stale
            self.fn = _boxed(self._pristine.value)
            out = self.fn(saved)
        self._pristine.value = None
        return out

    @property
    def source(self) -> str | None:
        return getattr(self.fn, "source", None)
