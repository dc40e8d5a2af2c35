"""Regional compilation, compile side: each piece of a split Dynamo graph goes through the
ordinary backend path (yirage_dynamo/backend.py); repeats of a block are served the way
the device lowering says (`Lowering.reuses_block_programs`):

  * re-armed programs (CPU, the default): the piece compiles once with frozen weights;
    its program (generated wrapper, C++ kernels, weight recipes) is kept in memory as a
    `graph_cache.SharedProgram` and re-armed with each later repeat's own weights, sharing
    one arena;
  * one callable (CUDA): the piece compiles once with its weights as inputs, and every
    repeat calls that callable with its own tensors.

The graph logic (where to cut, stitching) is in yirage_dynamo/regional.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

from yirage_dynamo import regional
from yirage_dynamo.device import select_device
from yirage_dynamo.lowering import choose_lowering
from yirage_dynamo.options import Options
from yirage_dynamo.report import reports

log = logging.getLogger("yirage_dynamo")

FUSE_ENV = "YIRAGE_REGIONAL_FUSE_ACROSS"
DEFER_ENV = "YIRAGE_REGIONAL_DEFER_INCREMENTS"


def _env_choice(env: str, default: bool) -> bool:
    """`env` "0"/"1" overrides `default`; unset (or anything else) keeps it."""
    return {"0": False, "1": True}.get(os.environ.get(env, ""), default)


def compile_by_blocks(
    gm: GraphModule, example_inputs: list[Any], options: Options
) -> Callable | None:
    """The Dynamo graph compiled piece by piece, or None: compile it whole."""
    from yirage_dynamo.backend import compile_whole_graph
    from yirage_dynamo.runtime import graph_cache

    start = time.perf_counter()
    undo: Callable[[], None] | None = None
    try:
        device, _ = select_device(example_inputs, options)
        lowering, _ = choose_lowering(device)
        # Benchmark/debug overrides of the lowering's choices (yirage_dynamo/regional.plan).
        fuse = _env_choice(FUSE_ENV, lowering.regional_fuse_across_blocks)
        defer = _env_choice(DEFER_ENV, lowering.regional_defer_increments)
        refusal = lowering.regional_refusal(example_inputs, options)
        if refusal is not None:
            partition, why = None, refusal
        else:
            partition, why = regional.plan(gm, example_inputs, fuse, defer_increments=defer)
        if partition is not None and fuse:
            undo = regional.open_first_block_with_zero_residual(gm, partition)
    except Exception as exc:  # noqa: BLE001 - the whole-graph path reports and falls back
        partition, why = None, f"{type(exc).__name__}: {exc}"
    if partition is None:
        log.debug("yirage: compiling the graph whole (%s)", why)
        return None
    first_report = len(reports())
    programs: dict[str, Any] = {}
    callables: dict[str, Callable] = {}

    def signature(sub: GraphModule, inputs: list[Any]) -> str | None:
        key, _ = graph_cache.graph_key(sub, inputs, options, lowering, disk=False)
        return key

    def compile_piece(sub: GraphModule, inputs: list[Any], shared: str | None):
        piece_options = lowering.regional_options(options, shared is not None)
        if lowering.reuses_block_programs:
            if shared is not None and shared in callables:
                return callables[shared], True
            fn = compile_whole_graph(sub, inputs, piece_options)
            if shared is not None:
                callables[shared] = fn
            return fn, False
        rearm = shared is not None and shared in programs
        return compile_whole_graph(sub, inputs, piece_options, programs), rearm

    try:
        with lowering.regional_scope(example_inputs, options):
            fn, mutated, stats = regional.compile_regions(
                gm, example_inputs, partition, compile_piece, signature
            )
            stitched = fn
            fn = lowering.finish_regional(fn, example_inputs, options, mutated)
    except torch._dynamo.exc.RestartAnalysis:
        raise
    except Exception as exc:  # noqa: BLE001 - the whole graph is the fallback
        if undo is not None:
            undo()
        if options.fallback == "error":
            raise
        log.warning(
            "yirage: regional compile failed (%s: %s); compiling the graph whole",
            type(exc).__name__,
            exc,
        )
        return None
    pieces = reports()[first_report:]
    for r in pieces[1:]:
        # Dynamo traced the graph once: its time belongs to the first piece only.
        if "total" in r.stages:
            r.stages["total"] -= r.stages.pop("dynamo_trace", 0.0)
    deferred = sum(1 for n in partition if n.meta.get("yirage_deferred_increment"))
    if pieces and deferred:
        pieces[-1].notes.append(
            f"regional: {deferred} step-counter increments run in the last piece"
        )
    if pieces and fn is not stitched:
        pieces[-1].notes.append(f"regional: the stitched step runs in a {type(fn).__name__}")
    if pieces:
        pieces[-1].notes.append(
            f"regional: {stats['pieces']} pieces, {stats['compiled']} compiled, "
            f"{stats['reused']} reusing a repeated block's program; "
            f"{time.perf_counter() - start:.2f} s after Dynamo's trace"
        )
    return fn
