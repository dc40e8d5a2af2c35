"""The pass pipeline: ONE ordered list, read top to bottom.

Every pass is `fn(gm, ctx) -> int` (the number of rewrites/matches), mutates the FX graph
in place and leaves it valid: `gm.graph.lint()` passes and every node carries meta["val"].
`run_pipeline` times each pass and records node counts in the compile report.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch.fx import GraphModule

from . import (
    cleanup,
    freezing,
    fusion,
    memory_plan,
    pattern_attention,
    pattern_horizontal_gemm,
    pattern_lora,
    pattern_rms_norm,
    pattern_rotary,
    pattern_swiglu,
    reinplace,
)
from .context import PassContext, count_nodes


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[GraphModule, PassContext], int]
    inference_only: bool = False
    enabled_by_default: bool = True


PIPELINE: list[Pass] = [
    # Views/clones/casts that change nothing: removed first so patterns see a canonical graph.
    Pass("remove_noops", cleanup.remove_noops),
    # Parameters of inference graphs become constants (by reference), enabling folding.
    Pass("freeze_parameters", freezing.freeze_parameters, inference_only=True),
    # Functional copy-back of input mutations (KV cache) -> in-place op: no full-cache copy.
    Pass("reinplace_input_mutations", reinplace.reinplace_input_mutations, inference_only=True),
    # Work that depends only on frozen weights runs once, at compile time.
    Pass("constant_fold", freezing.constant_fold, inference_only=True),
    # Duplicate pure subexpressions (e.g. repeated casts of the same tensor) computed once.
    Pass("cse", cleanup.cse),
    # RMSNorm (+ the residual add feeding it) -> one yirage op: one read of the stream.
    Pass("pattern_rms_norm", pattern_rms_norm.fuse_rms_norm),
    # act(gate) * up -> yirage::gated_act: the gated-MLP activation as one op.
    Pass("pattern_swiglu", pattern_swiglu.fuse_gated_act),
    # q/k rotate-half RoPE -> yirage::rotary (one op per layer for q and k).
    Pass("pattern_rotary", pattern_rotary.fuse_rotary),
    # SDPA / eager attention -> yirage::attention reading un-repeated K/V (no repeat_kv copy).
    Pass("pattern_attention", pattern_attention.fuse_attention),
    # x@W + s*(x@A)@B -> yirage::lora_linear; before horizontal fusion claims the GEMMs.
    Pass("pattern_lora", pattern_lora.fuse_lora, inference_only=True),
    # Projections sharing an input (q/k/v, gate/up) -> one GEMM over weights concatenated
    # once at compile time; needs frozen weights, so inference graphs only.
    Pass(
        "pattern_horizontal_gemm", pattern_horizontal_gemm.fuse_horizontal_gemm, inference_only=True
    ),
    # Views of weights (t(w) before each GEMM) become view constants: no per-call op.
    Pass("fold_weight_views", freezing.fold_weight_views, inference_only=True),
    # Whatever the rewrites above left unused.
    Pass("dce", cleanup.dce),
    # Pointwise/reduction/view chains -> one region (call_module) each, rendered as one
    # kernel by lowerings that generate code; after the rewrites so it sees final ops.
    Pass("fuse_regions", fusion.fuse_regions),
    # Last, on the final program: arena offsets for intermediates (wrapper writes via out=).
    Pass("memory_plan", memory_plan.memory_plan),
]

PASS_NAMES: list[str] = [p.name for p in PIPELINE]


def verify_graph(gm: GraphModule, where: str) -> None:
    """Raise if the graph is malformed or a node lacks its example value."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "get_attr", "placeholder"):
            if "val" not in node.meta:
                raise AssertionError(f"after {where}: node {node.name} ({node.target}) has no val")


def run_pass(p: Pass, gm: GraphModule, ctx: PassContext) -> int:
    """Run one pass: time it, count nodes, verify (in debug/verify mode), dump (debug)."""
    from yirage_dynamo.report import PassRecord

    before = count_nodes(gm)
    start = time.perf_counter()
    matches = p.fn(gm, ctx) or 0
    gm.recompile()
    seconds = time.perf_counter() - start
    ctx.report.passes.append(PassRecord(p.name, seconds, before, count_nodes(gm), int(matches)))
    if ctx.options.verify or ctx.options.debug:
        verify_graph(gm, p.name)
    if ctx.options.debug:
        from yirage_dynamo.debug import dump_graph

        dump_graph(ctx, gm, f"{len(ctx.report.passes):02d}_{p.name}")
    return int(matches)


def run_pipeline(gm: GraphModule, ctx: PassContext) -> GraphModule:
    if ctx.options.debug:
        from yirage_dynamo.debug import dump_graph

        dump_graph(ctx, gm, "00_input")
    # Passes handle real tensors (weights) and enter the fake mode explicitly when they
    # need example values, so the ambient fake mode AOTAutograd compiles under is unset.
    with torch.no_grad(), torch._subclasses.fake_tensor.unset_fake_temporarily():
        for p in PIPELINE:
            if p.inference_only and not ctx.inference:
                continue
            if not ctx.options.pass_enabled(p.name, p.enabled_by_default):
                continue
            run_pass(p, gm, ctx)
    return gm


__all__ = ["PIPELINE", "PASS_NAMES", "Pass", "PassContext", "run_pass", "run_pipeline"]
