"""Typed, validated backend options.

`torch.compile(m, backend="yirage", options={...})` hands us a plain dict; it becomes
a frozen `Options` here, validated up front so that a typo fails loudly with the key
and its accepted values instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda", "mps", "neuron")
FALLBACKS = ("inductor", "eager", "error")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_KERNELS = ("auto", "all", "none")
# run_ahead values besides True and False (see Options.run_ahead).
RUN_AHEAD_WORDS = ("always", "auto")
CUDA_CODEGENS = ("auto", "inductor", "direct")


@dataclasses.dataclass(frozen=True)
class Options:
    """Every knob the backend understands. Unknown keys are rejected."""

    device: str = "auto"
    # "inductor" means the chain inductor -> eager; "eager" skips Inductor; "error" raises.
    fallback: str = "inductor"
    # Per-pass switches by name, e.g. {"cse": False}. Names not in the pipeline are rejected.
    passes: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    debug: bool = False
    debug_dir: str = "yirage_debug"
    report: str | None = None
    # Inline non-mutated parameters of inference graphs as constants (enables folding and
    # horizontal GEMM fusion). Assumes weights are not reassigned after compiling.
    freeze: bool = True
    memory_planning: bool = True
    # None: decided by mode and device (CUDA inference graphs with static shapes).
    cudagraphs: bool | None = None
    # CUDA graphs: start the next decode step on a side stream before it is asked for
    # (runtime/run_ahead.py), hiding HF's per-token host time behind the GPU. Outputs are
    # handed out only for inputs equal to the prediction. "auto" (the default): timed
    # against running in order over the first calls, the faster kept, only for a step
    # whose every KV-cache write is staged (lowering/cuda_kv_stage.py), so that a step
    # started ahead writes nothing the caller shares before it is handed out; other steps
    # run in order. False: every step in order. True: as "auto" for unstaged steps too;
    # "always": True without the trial. True and "always" leave one case unordered (eager
    # cache writes right after the end: see the module).
    run_ahead: bool | str = "auto"
    # CUDA lowering: which yirage ops run as our Triton kernels. "auto": decode attention,
    # and decode GEMVs where measured faster than cuBLAS on this GPU; the pointwise/norm ops
    # go back to ATen for Inductor to fuse. "all": every op with a kernel. "none": no Triton
    # kernels (ops are inlined for Inductor).
    cuda_kernels: str = "auto"
    # CUDA lowering: who runs the post-pass graph. "direct": our kernels and ATen calls in
    # graph order (no Inductor: a cold compile skips its import, passes and code
    # generation); "inductor": Inductor compiles it, fusing the code between our kernels.
    # "auto": "direct" where the graph replays from our CUDA graph, else "inductor".
    cuda_codegen: str = "auto"
    cache_dir: str = ""
    # Reuse a whole compiled graph (wrapper + kernels + weight recipes) from cache_dir when
    # the same Dynamo graph is compiled again, e.g. in a new process (CPU lowering).
    graph_cache: bool = True
    # Compile a model's repeated blocks (decoder layers) once and reuse the program for
    # every copy (yirage_dynamo/regional.py): inference graphs with static shapes.
    regional: bool = True
    cxx: str = ""
    cxx_flags: tuple[str, ...] = ("-O3", "-fopenmp", "-march=native")
    # Run every pass with graph verification (lint + meta["val"] on every node).
    verify: bool = False
    mode: str | None = None

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir or Path.home() / ".cache" / "yirage")

    def pass_enabled(self, name: str, default: bool = True) -> bool:
        return self.passes.get(name, default)


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ValueError(f"yirage option {key!r}={value!r} is invalid; expected one of: {shown}")


def _kind(key: str, value: Any, kinds: tuple[type, ...], what: str) -> None:
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        raise ValueError(f"yirage option {key!r}={value!r} is invalid; expected {what}")


def _env_flag(name: str) -> bool | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    return raw.strip().lower() not in ("0", "false", "no", "off")


def parse_options(options: Mapping[str, Any] | None = None, mode: str | None = None) -> Options:
    """Build `Options` from torch.compile's `options` dict and `mode`.

    Environment overrides apply where an option was not given explicitly:
    YIRAGE_DEBUG, YIRAGE_DEBUG_DIR, YIRAGE_REPORT, YIRAGE_CACHE_DIR, YIRAGE_DEVICE,
    YIRAGE_FALLBACK, YIRAGE_CXX, YIRAGE_GRAPH_CACHE, YIRAGE_REGIONAL, YIRAGE_RUN_AHEAD.
    """
    from yirage_dynamo.passes import PASS_NAMES  # late: passes import torch internals

    raw: dict[str, Any] = dict(options or {})
    if not isinstance(options, Mapping | None):
        raise ValueError(f"yirage options must be a dict, got {type(options).__name__}")
    fields = {f.name for f in dataclasses.fields(Options)}
    for key in raw:
        if key not in fields:
            raise ValueError(
                f"unknown yirage option {key!r}; valid options are: {', '.join(sorted(fields))}"
            )
    if "mode" in raw and mode is not None:
        raise ValueError("yirage option 'mode' given twice (torch.compile mode and options)")
    raw.setdefault("mode", mode)

    env_text = {
        "debug_dir": "YIRAGE_DEBUG_DIR",
        "report": "YIRAGE_REPORT",
        "cache_dir": "YIRAGE_CACHE_DIR",
        "device": "YIRAGE_DEVICE",
        "fallback": "YIRAGE_FALLBACK",
        "cxx": "YIRAGE_CXX",
    }
    for key, var in env_text.items():
        if key not in raw and os.environ.get(var):
            raw[key] = os.environ[var]
    if "debug" not in raw and _env_flag("YIRAGE_DEBUG") is not None:
        raw["debug"] = _env_flag("YIRAGE_DEBUG")

    _choice("mode", raw["mode"], MODES)
    if "device" in raw:
        _choice("device", raw["device"], DEVICES)
    if "fallback" in raw:
        _choice("fallback", raw["fallback"], FALLBACKS)
    if "graph_cache" not in raw and _env_flag("YIRAGE_GRAPH_CACHE") is not None:
        raw["graph_cache"] = _env_flag("YIRAGE_GRAPH_CACHE")
    if "regional" not in raw and _env_flag("YIRAGE_REGIONAL") is not None:
        raw["regional"] = _env_flag("YIRAGE_REGIONAL")
    if "run_ahead" not in raw and _env_flag("YIRAGE_RUN_AHEAD") is not None:
        env = os.environ["YIRAGE_RUN_AHEAD"].strip().lower()
        named = env in RUN_AHEAD_WORDS
        raw["run_ahead"] = env if named else _env_flag("YIRAGE_RUN_AHEAD")
    if "run_ahead" in raw and not (
        isinstance(raw["run_ahead"], bool) or raw["run_ahead"] in RUN_AHEAD_WORDS
    ):
        raise ValueError(
            f"yirage option 'run_ahead'={raw['run_ahead']!r} is invalid; "
            "expected True, False, 'always' or 'auto'"
        )
    for key in ("debug", "freeze", "memory_planning", "verify", "graph_cache", "regional"):
        if key in raw:
            _kind(key, raw[key], (bool,), "True or False")
    if "cuda_kernels" in raw:
        _choice("cuda_kernels", raw["cuda_kernels"], CUDA_KERNELS)
    if "cuda_codegen" in raw:
        _choice("cuda_codegen", raw["cuda_codegen"], CUDA_CODEGENS)
    if "cudagraphs" in raw and raw["cudagraphs"] is not None:
        _kind("cudagraphs", raw["cudagraphs"], (bool,), "True, False or None")
    for key in ("report", "cache_dir", "debug_dir", "cxx"):
        if key in raw and raw[key] is not None:
            _kind(key, raw[key], (str, os.PathLike), "a path string")
            raw[key] = os.fspath(raw[key])
    if "cxx_flags" in raw:
        flags = raw["cxx_flags"]
        if isinstance(flags, str) or not all(isinstance(f, str) for f in flags):
            raise ValueError(
                f"yirage option 'cxx_flags'={flags!r} is invalid; expected a list of str"
            )
        raw["cxx_flags"] = tuple(flags)
    if "passes" in raw:
        passes = raw["passes"]
        if not isinstance(passes, Mapping):
            raise ValueError(
                f"yirage option 'passes'={passes!r} is invalid; expected a dict of pass name -> bool"
            )
        for name, on in passes.items():
            _choice("passes", name, tuple(PASS_NAMES))
            _kind(f"passes[{name!r}]", on, (bool,), "True or False")
        raw["passes"] = dict(passes)
    return Options(**raw)
