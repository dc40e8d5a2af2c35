"""CUDA lowering: our Triton kernels, with Inductor's Triton code generation around them.

Who runs the post-pass graph (`Options.cuda_codegen`, decided by `codegen`): a graph that
our CUDA-graph runner replays (static-shape inference, the decode step) runs as is by
default. The backend's own AOT capture and passes produce it, then `TritonLowering.lower`
swaps in our kernels and calls ATen for the rest; with no Inductor to fuse the static
cache's writes into rotary, each layer's rotary and both `index_copy_`s become one kernel
(lowering/cuda_kv_write.py). A replay costs the same whoever wrote the launches, so a cold
compile skips Inductor's import, passes and code generation for the same decode speed
(RESULTS.md, fifteenth session). Every other graph goes to Inductor, as below:

Why `compile_fx(dynamo_gm, inner_compile=ours)` and not Inductor's custom-pass hooks or
`compile_fx_inner` on our own AOT graph:
  * compile_fx owns the AOTAutograd call the way Inductor expects it (its decomposition
    table, joint-graph passes, output-stride bookkeeping, static input indices, the
    boxed forward-device index CUDA-graph trees need). Re-creating that around our own
    AOT capture is fragile across torch versions; taking over at the Dynamo-graph level
    (the `Lowering.compile_dynamo_graph` hook) and letting Inductor call us back is not.
  * Our `inner_compile` receives exactly the ATen graph compile_fx_inner would, runs the
    yirage pass pipeline on it (freezing, LLM patterns, cleanup), then lowers the yirage
    fused ops (lowering/cuda_ops.py): decode attention to our Triton kernel
    (`yirage_cuda::decode_attention`, a torch.library.triton_op); rms_norm / rotary /
    gated activation, by default (`Options.cuda_kernels="auto"`), back to their ATen
    reference so that Inductor fuses them with their neighbours (measured faster than our
    separate kernels, see benchmarks/RESULTS.md; "all" uses our kernels for those too).
    Decode-shaped matmuls (M <= 4 rows against a frozen weight) go to our Triton GEMV
    (`yirage_cuda::gemv`; q/k/v as one `gemv3` launch, gate/up + activation as one
    `gemv_gated`) where it measured faster than cuBLAS on this GPU (cached per shape).
    On a cache miss every candidate config of every shape compiles at once, in children
    forked from this process (lowering/triton_pool.py), before any is measured.
    Ops the passes inserted that Inductor expects decomposed are re-decomposed, then
    compile_fx_inner runs: Inductor's post-grad passes, scheduling, fusion, Triton codegen
    and CUDA graphs follow unchanged. Our kernels enter Inductor's graph after AOTAutograd,
    so Inductor schedules them as extern kernels (inside its CUDA graph) and fuses the code
    around them; it does not trace into them.
  * The custom-pass hooks (`config.post_grad_custom_pre_pass`) would also work, but are a
    global config slot (one user at a time) and run after Inductor's own decompositions.
  * compile_fx takes ownership of (mutates) the graph it is given, so it gets a structural
    copy and the fallback chain can still use the pristine Dynamo graph.

Freezing: weights are frozen by our `freeze_parameters` pass (by reference, from the real
nn.Parameters Dynamo hands us), not Inductor's `freezing=True`, which would concatenate
q/k/v and gate/up weights into new tensors while the model keeps the originals (+60% weight
memory on a 7B model for little gain at batch 1). A decoder layer compiled once for every
layer (regional compilation, yirage_dynamo/regional.py) keeps its weights as inputs.

CUDA graphs: inference graphs with static shapes run as CUDA graphs by default (mode
"reduce-overhead" semantics; `Options.cudagraphs=False` opts out), through our runner
(runtime/cuda_graphs.py: capture on the second call, replay with input copies and
static-input address checks) rather than Inductor's CUDA-graph trees. Both are equally fast
on decode (RESULTS.md); the runner hands out outputs as fresh tensors, so callers may keep
them across calls. Under the trees a kept output is overwritten by the next replay and
reading it raises: HF's default (dynamic) cache keeps the K/V tensors a static-shape graph
returns, and broke. YIRAGE_CUDA_GRAPHS=inductor switches back to the trees. The static KV
cache is mutated in place; HF marks it a static address, so the graph reads and writes it
in place, and replays allocate nothing new.

Inductor config is only changed through compile_fx's `config_patches` (a scoped
`config.patch`), never globally. Compile caches are off for these graphs: AOTAutograd's
cache key does not cover our passes, and the FX graph cache would hash frozen weights by
value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch.fx import GraphModule

from . import cuda_kv_stage
from .base import Capabilities, Lowering
from .cuda_pdl import pdl_mode

log = logging.getLogger("yirage_dynamo")

# yirage ops our Triton kernels implement (for the shapes `cuda_ops.substitute` accepts).
TRITON_OPS = frozenset({"rms_norm", "rms_norm_residual", "gated_act", "rotary", "attention"})

INDUCTOR_CONFIG_ENV = "YIRAGE_INDUCTOR_CONFIG"

# Mode -> whether CUDA graphs are on when Options.cudagraphs is None (auto).
_CUDAGRAPH_MODES = {
    None: True,
    "reduce-overhead": True,
    "max-autotune": True,
    "default": False,
    "max-autotune-no-cudagraphs": False,
}


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


class TritonLowering(Lowering):
    name = "triton"
    capabilities = Capabilities(
        device_type="cuda",
        generates_kernels=True,
        cuda_graphs=True,
        native_custom_ops=TRITON_OPS,
    )

    def available(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device visible to torch"
        if not _has_triton():
            return "triton is not installed"
        return None

    def compile_dynamo_graph(
        self, gm: GraphModule, example_inputs: list[Any], options: Any, report: Any
    ) -> Callable | None:
        """Compile a whole Dynamo graph through Inductor with our passes inside."""
        if codegen(options, example_inputs) == "direct":
            # The backend's own AOT capture and passes, then `lower` below: no Inductor.
            return None
        from torch._inductor.compile_fx import compile_fx

        from .triton_pool import warm_pool

        patches = inductor_config_patches(options, example_inputs)
        # Our CUDA-graph runner instead of Inductor's CUDA-graph trees (see module doc).
        runner = patches["triton.cudagraphs"] and _own_cuda_graphs(example_inputs)
        # Inductor's compile workers (for Inductor's kernels; ours compile in forked
        # children, lowering/triton_pool.py) start now, while AOTAutograd and our passes
        # run, as Inductor's own backend starts them.
        warm_pool()
        if runner:
            patches["triton.cudagraphs"] = False
        report.notes.append(
            "inductor config: " + ", ".join(f"{k}={v}" for k, v in sorted(patches.items()))
        )
        inner = _InnerCompile(self, options, report, example_inputs)
        # AOTAutograd's cache would return an artifact compiled without (or with other)
        # yirage passes: its key does not cover our inner_compile. Off, for this call only.
        with report.stage("inductor"), torch._functorch.config.patch(enable_autograd_cache=False):
            fn = compile_fx(_structural_copy(gm), example_inputs, inner, patches)
        n_in, mutated = inner.mutations or (-1, frozenset())
        if n_in != len(example_inputs):
            # AOTAutograd's inputs are not Dynamo's one to one: assume every input mutated.
            mutated = frozenset(range(len(example_inputs)))
        if not runner:
            # What a regional piece tells the runner around the stitched graph.
            fn.mutated_inputs = mutated
            return fn
        runner = _runner(fn, mutated, options)
        report.notes.append(f"{_runner_note(runner)} (mutated inputs {sorted(mutated)})")
        return runner

    def cache_salt(self) -> str:
        # Benchmarks flip these switches between variants in one process; without them in
        # the key, a later variant's regional pieces loaded the first variant's programs.
        from . import cuda_gemv, cuda_gemv_fusion, cuda_kv_write, cuda_ops, cuda_pdl

        envs = (CODEGEN_ENV, CUDA_GRAPHS_ENV, INDUCTOR_CONFIG_ENV, cuda_pdl.PDL_ENV)
        envs += (cuda_gemv.GEMV_ENV, cuda_gemv_fusion.FUSE_ENV, cuda_kv_write.KV_WRITE_ENV)
        envs += (cuda_kv_write.KV_POS_ENV, cuda_kv_write.KV_COUNTERS_ENV)
        envs += (cuda_kv_stage.STAGE_ENV,)
        envs += (cuda_ops.ATTN_MERGE_ENV,)
        return ",".join(f"{e}={os.environ.get(e, '')}" for e in envs)

    def aot_options(self, options: Any) -> Any:
        # Horizontal GEMM fusion copies weights (see _InnerCompile): opt-in on CUDA.
        passes = {"pattern_horizontal_gemm": False, **dict(options.passes)}
        return dataclasses.replace(options, passes=passes)

    def lower(self, gm: GraphModule, ctx: Any) -> Callable:
        """The post-pass graph with our Triton kernels substituted, run as is (ATen for
        the rest), in our CUDA-graph runner where graphs apply: no Inductor."""
        from torch._functorch.aot_autograd import make_boxed_func

        _swap_in_kernels(gm, ctx, for_inductor=False)
        ctx.report.notes.append("cuda codegen: the post-pass graph runs as is (no Inductor)")
        on, _ = wants_cudagraphs(ctx.options, ctx.example_inputs)
        runner = on and ctx.inference and _own_cuda_graphs(ctx.example_inputs)
        # A regional piece stages into its step's table; a whole graph into its own.
        table = cuda_kv_stage.CURRENT.get()
        if table is None and runner and cuda_kv_stage.enabled(ctx.options):
            table = _stage_table()
        fn = _staged(gm, ctx, table) if table is not None and ctx.inference else None
        commit = None if fn is None else table
        with ctx.report.stage("precompile_rest"):
            ctx.report.notes.append(_precompile_rest(gm, fn))
        if fn is None:
            fn = make_boxed_func(gm.forward)
        if runner:
            runner = _runner(fn, ctx.mutated_inputs, ctx.options, commit=commit)
            ctx.report.notes.append(_runner_note(runner))
            return runner
        return fn

    # Regional compilation: one Inductor compile of a repeated block serves every layer,
    # so its weights stay graph inputs (frozen, they would be layer 0's constants), and
    # CUDA graphs capture the stitched step as a whole rather than each piece.
    reuses_block_programs = True
    # The layers' cache-counter increments in the last piece, batched into one launch
    # (cuda_kv_write.batch_counter_increments: 43 µs off a 7B H100 step).
    regional_defer_increments = True

    def regional_refusal(self, example_inputs: list[Any], options: Any) -> str | None:
        on, _ = wants_cudagraphs(options, example_inputs)
        if on and not _own_cuda_graphs(example_inputs):
            # Inductor's CUDA-graph trees capture what compile_fx compiles, so the stitched
            # step would run with no CUDA graph (4.5x slower on 7B decode, RESULTS.md).
            return f"{CUDA_GRAPHS_ENV}=inductor: the trees capture whole graphs only"
        return None

    def regional_options(self, options: Any, shared: bool) -> Any:
        # Pieces capture no graphs of their own (the stitched step is one), so "auto" is
        # decided here, for the step: regional pieces are static-shape inference graphs.
        return dataclasses.replace(
            options,
            cudagraphs=False,
            freeze=options.freeze and not shared,
            cuda_codegen=codegen(options, []),
        )

    @contextlib.contextmanager
    def regional_scope(self, example_inputs: list[Any], options: Any) -> Iterator[None]:
        on, _ = wants_cudagraphs(options, example_inputs)
        staged = on and _own_cuda_graphs(example_inputs) and cuda_kv_stage.enabled(options)
        token = cuda_kv_stage.CURRENT.set(_stage_table() if staged else None)
        try:
            yield
        finally:
            cuda_kv_stage.CURRENT.reset(token)

    def finish_regional(
        self, fn: Callable, example_inputs: list[Any], options: Any, mutated: frozenset[int]
    ) -> Callable:
        on, _ = wants_cudagraphs(options, example_inputs)
        if not (on and _own_cuda_graphs(example_inputs)):
            return fn
        table = cuda_kv_stage.CURRENT.get()
        commit = table if table is not None and table.programs else None
        # The shared pieces read weights through their parameter inputs: check them.
        return _runner(fn, mutated, options, check_parameters=True, commit=commit)


def _swap_in_kernels(gm: GraphModule, ctx: Any, for_inductor: bool) -> None:
    """Our Triton kernels into the post-pass graph, for either codegen. For Inductor, ops
    named by `cuda_kernels` go back to their ATen reference for it to fuse, and ops it
    expects decomposed are re-decomposed; run as is, every op takes our kernel (unless
    "none") and rotary absorbs the KV-cache writes Inductor would have fused."""
    from . import cuda_gemv, cuda_gemv_fusion, cuda_kv_write, cuda_ops, cuda_timing

    ctx.artifacts["cuda_codegen"] = "inductor" if for_inductor else "direct"
    everything = frozenset(cuda_ops.TRIES)
    auto = cuda_ops.INLINE_BY_DEFAULT if for_inductor else frozenset()
    inline = {"auto": auto, "all": frozenset(), "none": everything}[ctx.options.cuda_kernels]
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        # The decode attention's config candidates compile with the GEMVs' (one wait).
        early = [] if "attention" in inline else cuda_ops.attention_precompiles(gm, ctx)
        # Decode GEMVs first: the gated-MLP fusion consumes yirage.gated_act nodes.
        cuda_gemv.substitute_gemv(gm, ctx, also_precompile=early)
        # RMSNorm prologues and skip-add epilogues into those GEMVs ("all" only: not
        # faster end to end, see the module) before the norms reach Inductor.
        cuda_gemv_fusion.fuse_gemv_neighbours(gm, ctx)
        cuda_ops.substitute(gm, ctx, inline)
        if for_inductor:
            cuda_ops.decompose_for_inductor(gm, ctx)
        else:
            if ctx.report.patterns.get("triton_rotary") and cuda_kv_write.enabled():
                cuda_kv_write.fuse_rotary_kv_write(gm, ctx)
            if cuda_kv_write.batches_counters():
                cuda_kv_write.batch_counter_increments(gm, ctx)
        cuda_timing.release_rotation_pads()
        gm.graph.lint()
        gm.recompile()
    if ctx.options.debug:
        from .cuda_debug import dump_lowered

        dump_lowered(gm, ctx, "lowered_cuda_for_inductor" if for_inductor else "lowered_cuda")


def _stage_table() -> Any:
    """A staged step's table: all its rows in one launch, else one launch per row."""
    from .cuda_ops import _kernels

    kernels = _kernels()
    return cuda_kv_stage.StageTable(kernels.kv_commit, kernels.KvCommitTable())


def _staged(gm: GraphModule, ctx: Any, table: Any) -> Callable | None:
    """`gm` as a StagedProgram where every KV write of it could be staged (see
    lowering/cuda_kv_stage.py), else None; the report says which and why."""
    ops = torch.ops.yirage_cuda
    program = cuda_kv_stage.staged_program(
        gm,
        table,
        ops.rotary_kv_write.default,
        ops.rotary_kv_stage.default,
        ops.decode_attention.default,
    )
    if isinstance(program, str):
        ctx.report.notes.append(f"kv stage: none ({program})")
        return None
    n = len(program.caches)
    ctx.report.notes.append(f"kv stage: {n} KV writes staged, committed by the runner")
    ctx.report.count_pattern("staged_kv_writes", n)
    if ctx.options.debug:
        from .cuda_debug import dump_lowered

        dump_lowered(gm, ctx, "lowered_cuda_staged")
    return program


def _precompile_rest(gm: GraphModule, staged: Any) -> str:
    """The graph's other kernels (norms, rotary and KV writes, activations, and a staged
    step's commit) compiled at once in forked children before the first call, which
    compiled them one by one (lowering/triton_pool.py); GEMVs and decode attention were
    compiled for their config search. Returns the report's note on it."""
    from . import triton_pool
    from .cuda_ops import _kernels

    try:
        extra = (
            [] if staged is None else [staged.commit_record(gm, _kernels(), triton_pool.stand_in)]
        )
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            n = triton_pool.precompile_graph_ops(
                gm, "yirage_cuda", ("gemv", "decode_attention"), extra
            )
    except Exception as exc:  # noqa: BLE001 - only a speed-up: each compiles at first call
        log.debug("yirage: graph kernels not precompiled: %s", exc)
        return f"graph kernels not precompiled (each compiles at its first call): {exc}"
    return f"graph kernels precompiled in forked children: {n} launches"


def _runner_note(runner: Any) -> str:
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    ahead = isinstance(runner, RunAheadRunner)
    staged = runner.commit is not None
    return (
        "cuda graphs: yirage runner"
        + (", run-ahead" if ahead else "")
        + (", staged KV writes" if staged else "")
    )


def _runner(
    fn: Callable,
    mutated: frozenset[int],
    options: Any,
    check_parameters: bool | None = None,
    commit: Callable[[list[Any]], None] | None = None,
) -> Callable:
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner
    from yirage_dynamo.runtime.run_ahead import RunAheadRunner

    # Frozen weights are constants: their parameter inputs need no address check.
    check = not options.freeze if check_parameters is None else check_parameters
    # "auto" runs ahead only a step that writes nothing the caller shares before it is
    # handed out: one whose KV writes are staged (it has a commit).
    if not options.run_ahead or (options.run_ahead == "auto" and commit is None):
        return CudaGraphRunner(fn, mutated, check_parameters=check, commit=commit)
    # True: timed against running in order, the faster kept; "always": no trial.
    trial = options.run_ahead != "always"
    return RunAheadRunner(fn, mutated, trial=trial, check_parameters=check, commit=commit)


CUDA_GRAPHS_ENV = "YIRAGE_CUDA_GRAPHS"
CODEGEN_ENV = "YIRAGE_CUDA_CODEGEN"


def codegen(options: Any, example_inputs: list[Any]) -> str:
    """Who runs a graph's post-pass ATen code: "direct" (our kernels and ATen calls, in
    order, inside our CUDA graph; no Inductor) or "inductor" (compile_fx_inner).

    "auto" is "direct" where our CUDA-graph runner will replay the graph: a replay costs
    the same whoever generated the launches, the GPU work is our kernels either way, and
    a cold compile skips Inductor's import, its passes and its code generation. Where no
    graph is captured (training, dynamic shapes, cudagraphs=False, Inductor's CUDA-graph
    trees) each ATen call would cost a Python launch per step: Inductor's fused code wins.
    YIRAGE_CUDA_PDL=all asks for Inductor's kernels, so it means "inductor" too.
    YIRAGE_CUDA_CODEGEN=inductor|direct overrides "auto" (benchmarks)."""
    choice = options.cuda_codegen
    if choice == "auto":
        env = os.environ.get(CODEGEN_ENV, "").strip().lower()
        if env:
            if env not in ("inductor", "direct"):
                raise ValueError(f"{CODEGEN_ENV}={env!r}: expected 'inductor' or 'direct'")
            return env
        if pdl_mode() == "all":  # asks for Inductor's kernels with PDL: they must exist
            return "inductor"
        on, _ = wants_cudagraphs(options, example_inputs)
        return "direct" if on and _own_cuda_graphs(example_inputs) else "inductor"
    return choice


def _own_cuda_graphs(example_inputs: list[Any]) -> bool:
    """Our runner (runtime/cuda_graphs.py) where it applies: every input a tensor, and not
    switched to Inductor's CUDA-graph trees with YIRAGE_CUDA_GRAPHS=inductor."""
    if os.environ.get(CUDA_GRAPHS_ENV, "").strip().lower() == "inductor":
        return False
    return all(isinstance(t, torch.Tensor) for t in example_inputs)


def wants_cudagraphs(options: Any, example_inputs: list[Any]) -> tuple[bool, str]:
    """(CUDA graphs on?, why) for a Dynamo graph."""
    if options.cudagraphs is not None:
        return bool(options.cudagraphs), "set by options.cudagraphs"
    if not _CUDAGRAPH_MODES.get(options.mode, True):
        return False, f"mode {options.mode!r} has no CUDA graphs"
    if _training(example_inputs):
        return False, "training graph (grad enabled)"
    if _has_symbolic_sizes(example_inputs):
        return False, "dynamic shapes (one CUDA graph per shape would be recorded)"
    return True, "static-shape inference graph"


def _training(example_inputs: list[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    )


def inductor_config_patches(options: Any, example_inputs: list[Any]) -> dict[str, Any]:
    """Inductor config for this graph, applied by compile_fx as a scoped patch."""
    from torch._inductor import list_mode_options

    patches: dict[str, Any] = {}
    if options.mode:
        patches.update(list_mode_options(options.mode))
    on, _ = wants_cudagraphs(options, example_inputs)
    patches["triton.cudagraphs"] = on
    # Inductor's freezing would copy weights (see module docstring); our pass freezes.
    patches["freezing"] = False
    # The FX graph cache would hash our frozen weights by value (tolist() of every weight).
    patches["fx_graph_cache"] = False
    # YIRAGE_CUDA_PDL=all: Inductor's kernels take part in programmatic dependent launch
    # too (each waits for its predecessor's results, then lets its successor launch), so
    # a GEMV after one of them can stream weights while it runs (lowering/cuda_gemv.py).
    if pdl_mode() == "all":
        patches["triton.enable_pdl"] = True
    # Benchmark/debug override: extra Inductor config as JSON, e.g. '{"combo_kernels": true}'
    # (horizontal fusion: merged each layer's rotary and V-cache write on 7B decode, 31
    # fewer kernels per token, but not faster beyond noise; RESULTS.md).
    extra = os.environ.get(INDUCTOR_CONFIG_ENV)
    if extra:
        patches.update(json.loads(extra))
    return patches


def _has_symbolic_sizes(example_inputs: list[Any]) -> bool:
    for t in example_inputs:
        if isinstance(t, torch.SymInt):
            return True
        if isinstance(t, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in t.shape):
            return True
    return False


def _structural_copy(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copied graph, for compile_fx to own and mutate.

    Attributes are shared (no weight copies). Dynamo's bookkeeping travels along: the
    module's meta (dynamo_compile_id), `_param_name_to_source` and each placeholder's
    `_dynamo_source` are how AOTAutograd finds the static inputs (parameters, HF's
    static KV cache) that CUDA graphs may mutate in place without re-recording.
    """
    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    new = GraphModule(gm, graph)
    new.meta.update(gm.meta)
    for key, value in vars(gm).items():
        if key not in vars(new) and not key.startswith("__"):
            setattr(new, key, value)
    for old, copied in val_map.items():
        for key, value in vars(old).items():
            if key.startswith("_dynamo") and key not in vars(copied):
                setattr(copied, key, value)
    return new


def _real_parameters(example_inputs: list[Any]) -> list[Any]:
    # Only parameters are kept: holding activations would leak them.
    return [t if isinstance(t, torch.nn.Parameter) else None for t in example_inputs]


def _mutated_placeholders(gm: GraphModule) -> frozenset[int]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    out = set()
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if schema is not None and schema.is_mutable and n.args and n.args[0] in index:
            out.add(index[n.args[0]])
    return frozenset(out)


class _InnerCompile:
    """Inductor's `inner_compile` callback: yirage passes, Triton ops, then Inductor."""

    def __init__(
        self,
        lowering: TritonLowering,
        options: Any,
        report: Any,
        example_inputs: list[Any],
    ):
        self.lowering = lowering
        # Inductor re-inplaces copy-backs of input mutations itself and expects a functional
        # graph from AOTAutograd, so our reinplace pass is off unless asked for explicitly.
        # Horizontal GEMM fusion concatenates weights into new tensors while the model keeps
        # the originals: measured on Llama-2-7B (H200), peak memory 21.3 GiB vs 12.8 eager
        # for a decode-speed change within noise, so it is opt-in on CUDA.
        passes = {
            "reinplace_input_mutations": False,
            "pattern_horizontal_gemm": False,
            **dict(options.passes),
        }
        self.options = dataclasses.replace(options, passes=passes)
        self.report = report
        self.real_inputs = _real_parameters(list(example_inputs))
        self.graphs = 0
        # (placeholder count, indices the graph mutates) of the first (inference) graph,
        # for the CUDA-graph runner's copy-back of mutated non-static inputs.
        self.mutations: tuple[int, frozenset[int]] | None = None

    def __call__(self, gm: GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
        from torch._inductor.compile_fx import compile_fx_inner
        from yirage_dynamo.passes import run_pipeline
        from yirage_dynamo.passes.context import PassContext, count_nodes

        inference = bool(kwargs.get("is_inference")) and not kwargs.get("is_backward")
        kind = "backward" if kwargs.get("is_backward") else "inference" if inference else "forward"
        report = self.report
        if self.graphs:
            # A second graph from one Dynamo graph (the backward): its own report.
            from yirage_dynamo.report import CompileReport, record

            report = CompileReport(
                mode=self.options.mode,
                device=self.report.device,
                device_reason=self.report.device_reason,
                lowering=self.lowering.name,
            )
            record(report)
        self.graphs += 1
        report.kind = kind
        report.nodes_in = count_nodes(gm)
        if self.mutations is None:
            n_in = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
            self.mutations = (n_in, _mutated_placeholders(gm))
        ctx = PassContext(
            options=self.options,
            report=report,
            capabilities=self.lowering.capabilities,
            example_inputs=list(example_inputs),
            real_inputs=self.real_inputs if inference else None,
            inference=inference,
            mutated_inputs=_mutated_placeholders(gm),
        )
        with report.stage("inductor/yirage_passes"):
            run_pipeline(gm, ctx)
        with report.stage("inductor/triton_ops"):
            _swap_in_kernels(gm, ctx, for_inductor=True)
        report.nodes_out = count_nodes(gm)
        # Frozen weights are real tensors behind get_attr nodes: Inductor's fake-tensor
        # propagation must accept them (what Inductor's own freezing does, same scope).
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        allow = (
            mock.patch.object(fake_mode, "allow_non_fake_inputs", True)
            if fake_mode is not None
            else contextlib.nullcontext()
        )
        with report.stage("inductor/compile_fx_inner"), allow:
            return compile_fx_inner(gm, example_inputs, **kwargs)
