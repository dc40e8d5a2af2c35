"""The variants `bench_cuda_llama.py` (and the profiling scripts) compile, by name:

eager     model.generate(..., disable_compile=True)
inductor  HF's default CompileConfig (backend="inductor", mode="reduce-overhead")
yirage    CompileConfig(backend=yirage) (CUDA graphs on by default for inference; the
          default run_ahead="auto": KV writes staged, run-ahead kept if timed faster)
yirage_in_order  the same with options={"run_ahead": False}: every step in order
yirage_all  the same with options={"cuda_kernels": "all"} (every yirage op on our kernels)
yirage_run_ahead  the same with options={"run_ahead": True}: the next decode step
               starts on a side stream before HF asks for it (runtime/run_ahead.py),
               kept if timed faster than in order; _always: no trial; _staged: with
               the KV writes staged (YIRAGE_CUDA_KV_STAGE=on); _always_staged: both
yirage_auto    the same with options={"run_ahead": "auto"} (the default since the 25th
               session): the KV writes staged, run-ahead (with its trial) only where
               every one of them is
yirage_gemv    yirage with the Triton decode GEMV forced on (YIRAGE_CUDA_GEMV=on) for
               every eligible projection, whatever the cuBLAS comparison says
yirage_nogemv  yirage with the GEMV off (YIRAGE_CUDA_GEMV=off): cuBLAS for every matmul
yirage_fuse    yirage with the RMSNorm prologues / skip-add epilogues in the GEMVs
               (YIRAGE_CUDA_GEMV_FUSE=on; off by default, lowering/cuda_gemv_fusion.py)
yirage_combo   yirage with Inductor's horizontal "combo kernels" on (off by default:
               not faster beyond noise; YIRAGE_INDUCTOR_CONFIG='{"combo_kernels": true}')
yirage_trees   yirage replaying under Inductor's CUDA-graph trees instead of our runner
               (YIRAGE_CUDA_GRAPHS=inductor)
yirage_whole   yirage compiling the graph whole instead of by its repeated decoder layers
               (YIRAGE_REGIONAL=0; yirage_dynamo/regional.py)
yirage_pdl_gemv  yirage with the decode GEMVs launched with programmatic dependent launch
               (YIRAGE_CUDA_PDL=gemv); yirage_pdl_all: Inductor's kernels too (=all)
yirage_samelayers  regional, but the closing residual add stays in its layer (as on the
               CPU): one program for all layers, one more kernel per layer
               (YIRAGE_REGIONAL_FUSE_ACROSS=0)
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

# Variants that are "yirage" under an environment override, set while they compile and run.
ENV_VARIANTS = {
    "yirage_gemv": {"YIRAGE_CUDA_GEMV": "on"},
    "yirage_nogemv": {"YIRAGE_CUDA_GEMV": "off"},
    "yirage_fuse": {"YIRAGE_CUDA_GEMV_FUSE": "on"},
    "yirage_combo": {"YIRAGE_INDUCTOR_CONFIG": '{"combo_kernels": true}'},
    "yirage_trees": {"YIRAGE_CUDA_GRAPHS": "inductor"},
    "yirage_whole": {"YIRAGE_REGIONAL": "0"},
    "yirage_samelayers": {"YIRAGE_REGIONAL_FUSE_ACROSS": "0"},
    # Programmatic dependent launch (Hopper+): Inductor's kernels start while the previous
    # one drains, waiting (griddepcontrol.wait) only before reading its results.
    "yirage_pdl": {"YIRAGE_INDUCTOR_CONFIG": '{"triton.enable_pdl": true}'},
    # Our GEMVs launched with PDL, each streaming its first weight tile before it waits
    # for the previous kernel (lowering/cuda_gemv.py); "_all": Inductor's kernels too.
    "yirage_pdl_gemv": {"YIRAGE_CUDA_PDL": "gemv"},
    "yirage_pdl_all": {"YIRAGE_CUDA_PDL": "all"},
    # Inductor compiles the post-pass graph (the default before the fifteenth session;
    # "auto" now runs CUDA-graphed graphs as is: our kernels and ATen calls, no Inductor).
    "yirage_inductor": {"YIRAGE_CUDA_CODEGEN": "inductor"},
    # Rotary and the static cache's two index_copy_ writes as separate launches (the
    # no-Inductor path fuses them into one kernel per layer: lowering/cuda_kv_write.py).
    "yirage_unfused_kv": {"YIRAGE_CUDA_KV_WRITE": "off"},
    # HF's per-layer position add (arange + cumulative_length) as its own launch (the
    # default folds it into the fused rotary + KV-write kernel).
    "yirage_no_kv_pos": {"YIRAGE_CUDA_KV_POS": "off"},
    # The layers' cache-counter increments one launch each (default: one _foreach_add_).
    "yirage_no_counters": {"YIRAGE_CUDA_KV_COUNTERS": "off"},
    # Run-ahead with staged KV writes (lowering/cuda_kv_stage.py): a step started ahead
    # writes nothing shared until handed out; the runner commits each step's rows.
    "yirage_run_ahead_staged": {"YIRAGE_RUN_AHEAD": "1", "YIRAGE_CUDA_KV_STAGE": "on"},
    # The same without the trial: every step it can run ahead does (the default's path
    # when its trial keeps run-ahead, never turned off).
    "yirage_always_staged": {"YIRAGE_RUN_AHEAD": "always", "YIRAGE_CUDA_KV_STAGE": "on"},
}


@contextlib.contextmanager
def _env(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def variant_configs(options: dict) -> dict[str, Any]:
    """Variant name -> HF CompileConfig (None: eager)."""
    import transformers

    from yirage_dynamo.backend import yirage

    configs = {
        "eager": None,
        "inductor": transformers.CompileConfig(),
        # reduce-overhead spelled as options (torch.compile takes mode or options), + PDL.
        "inductor_pdl": transformers.CompileConfig(
            mode=None, options={"triton.cudagraphs": True, "triton.enable_pdl": True}
        ),
        "yirage": transformers.CompileConfig(
            backend=yirage, mode=None, options=dict(options) or None
        ),
        # Every yirage op on our Triton kernels (no inlining for Inductor to fuse).
        "yirage_all": transformers.CompileConfig(
            backend=yirage, mode=None, options={**options, "cuda_kernels": "all"}
        ),
        "yirage_in_order": transformers.CompileConfig(
            backend=yirage, mode=None, options={**options, "run_ahead": False}
        ),
        "yirage_run_ahead": transformers.CompileConfig(
            backend=yirage, mode=None, options={**options, "run_ahead": True}
        ),
        "yirage_run_ahead_always": transformers.CompileConfig(
            backend=yirage, mode=None, options={**options, "run_ahead": "always"}
        ),
        "yirage_auto": transformers.CompileConfig(
            backend=yirage, mode=None, options={**options, "run_ahead": "auto"}
        ),
    }
    for name in ENV_VARIANTS:
        # A backend object of its own: torch.compile's wrappers compare equal when backend
        # and options do, and Dynamo then runs the first variant's compiled code for every
        # later one (its cache lookup matches backends by ==), whatever the environment.
        configs[name] = transformers.CompileConfig(
            backend=functools.partial(yirage), mode=None, options=dict(options) or None
        )
    return configs
