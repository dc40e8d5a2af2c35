"""Whole-graph artifact cache: a Dynamo graph compiled before is reused without re-tracing.

Compiling a graph is Dynamo's trace, then AOTAutograd's trace, the pass pipeline, code
generation and the C++ build. The C++ build already has its own cache (cpp_build.py);
this one skips everything after Dynamo's trace, which is most of a warm start.

Key: sha256 of the Dynamo graph's code, every input's metadata (shape, strides, offset,
dtype, device, requires_grad, Parameter or not, which inputs share storage), the grad
mode, the options that shape code, the lowering, torch/Python versions and a digest of
yirage's own source. Weight *values* are not in the key, so one entry serves every model
of the same architecture: constants derived from weights (frozen, folded, concatenated,
viewed) are stored as `passes.freezing.Recipe`s and recomputed from the inputs on load,
and parameters that horizontal GEMM fusion re-points at the concatenated weight are
re-pointed again.

Only graphs whose AOTAutograd wrapper is a pass-through are stored: an inference graph
with static shapes, one placeholder per Dynamo input, input mutations kept in the graph,
outputs that alias nothing (so there is nothing for AOTAutograd's runtime to replay) and
every global of the generated wrapper describable. Anything else is compiled as usual and
the report says why it was not cached. Entries are pickles written atomically with a
sha256 checksum; a corrupted entry is ignored (and rewritten by the next compile).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import operator
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule
from torch.multiprocessing.reductions import StorageWeakRef
from yirage_dynamo.passes.freezing import (
    MAX_LITERAL_BYTES,
    Recipe,
    constant_recipe,
    release_free_heap,
)

log = logging.getLogger("yirage_dynamo")

FORMAT = 1
# Options that do not change the compiled program.
_NOT_IN_KEY = {"debug", "debug_dir", "report", "cache_dir", "fallback", "verify"}


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """Digest of yirage's own Python source: any code change invalidates every entry."""
    import yirage_dynamo
    from yirage_dynamo import lowering, passes, runtime

    h = hashlib.sha256()
    dirs = {Path(m.__file__).parent for m in (yirage_dynamo, passes, lowering, runtime)}
    for d in sorted(dirs):
        for f in sorted(d.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _input_meta(t: Any, storages: dict[int, int], i: int) -> tuple:
    if not isinstance(t, torch.Tensor):
        raise _Uncacheable(f"input {i} is a {type(t).__name__}, not a tensor (dynamic size?)")
    sizes = (*t.shape, *t.stride(), t.storage_offset())
    if not all(type(s) is int for s in sizes):
        raise _Uncacheable("dynamic shapes")
    fake = isinstance(t, torch._subclasses.FakeTensor)  # a regional piece's intermediate
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and not fake:
        raise _Uncacheable(f"input {i} is a tensor subclass {type(t).__name__}")
    storage_id = StorageWeakRef(t.untyped_storage()).cdata
    storage = storages.setdefault(storage_id, i) if t.numel() else i
    return (
        isinstance(t, torch.nn.Parameter),
        tuple(t.shape),
        t.stride(),
        t.storage_offset(),
        str(t.dtype),
        str(t.device),
        t.requires_grad,
        storage,
    )


class _Uncacheable(Exception):
    pass


def on_disk(options: Any) -> bool:
    """Whether compiled graphs are read from and written to `cache_dir` (debug dumps need a
    full compile)."""
    return bool(options.graph_cache and not options.debug)


def graph_key(
    gm: GraphModule, example_inputs: list[Any], options: Any, lowering: Any, disk: bool = True
) -> tuple[str | None, str]:
    """(key, "") for a cacheable graph, else (None, why not). `disk=False`: a key for
    sharing within this process (regional pieces), whatever the on-disk cache options."""
    if disk and not options.graph_cache:
        return None, "graph_cache=False"
    if disk and options.debug:
        return None, "debug dumps need a full compile"
    try:
        if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
        ):
            raise _Uncacheable("graph may need gradients (training)")
        if torch._C._is_any_autocast_enabled():
            # A hit runs our program directly; AOTAutograd's wrapper would run it with
            # autocast off (the graph has its casts already).
            raise _Uncacheable("traced under autocast")
        h = hashlib.sha256()
        opts = {
            f.name: getattr(options, f.name)
            for f in dataclasses.fields(options)
            if f.name not in _NOT_IN_KEY
        }
        lowering_id = (lowering.name, lowering.cache_salt())
        for part in (FORMAT, torch.__version__, sys.version, _code_digest(), lowering_id, opts):
            h.update(repr(part).encode())
        h.update(repr((torch.is_grad_enabled(), torch.is_inference_mode_enabled())).encode())
        for node in gm.graph.nodes:
            if node.op == "call_module":
                raise _Uncacheable("graph calls submodules")
            if node.op == "get_attr":
                value = getattr(gm, node.target)
                if not isinstance(value, torch.Tensor):
                    raise _Uncacheable(f"graph attribute {node.target} is not a tensor")
                if value.numel() * value.element_size() > MAX_LITERAL_BYTES:
                    raise _Uncacheable(f"graph attribute {node.target} is large")
                h.update(repr((node.target, value.dtype, tuple(value.shape))).encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
        h.update(gm.code.encode())
        storages: dict[int, int] = {}
        for i, t in enumerate(example_inputs):
            h.update(repr(_input_meta(t, storages, i)).encode())
    except _Uncacheable as exc:
        return None, str(exc)
    return h.hexdigest()[:32], ""


def _entry_path(options: Any, key: str) -> Path:
    return options.cache_path / "graphs" / f"{key}.pkl"


def aot_passthrough(gm: GraphModule, n_dynamo_inputs: int, n_dynamo_outputs: int) -> str:
    """ "" if AOTAutograd's runtime wrapper adds nothing around this inference graph."""
    ctx = torch._guards.TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx else None
    if meta is None:
        return "no AOTAutograd metadata"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != n_dynamo_inputs or len(meta.input_info) != n_dynamo_inputs:
        return "AOTAutograd changed the inputs (duplicates, synthetic bases or tokens)"
    if any(
        i.mutation_type.name not in ("NOT_MUTATED", "MUTATED_IN_GRAPH") for i in meta.input_info
    ):
        return "an input mutation is applied outside the graph"
    if meta.num_intermediate_bases or getattr(meta, "tokens", None):
        return "outputs alias intermediates, or effect tokens"
    if any(o.output_type.name != "non_alias" for o in meta.output_info):
        return "an output aliases an input"
    if len(meta.output_info) != n_dynamo_outputs or meta.grad_enabled_mutation is not None:
        return "AOTAutograd changes the outputs or the grad mode"
    if getattr(meta, "is_rng_op_functionalized", False):
        return "functionalized RNG"
    return ""


def make_entry(ctx: Any, gm: GraphModule, n_inputs: int) -> tuple[dict | None, str]:
    """(the cache entry of a compiled graph, "") or (None, why it cannot be re-armed)."""
    if ctx.artifacts.get("uncacheable"):
        return None, ctx.artifacts["uncacheable"]
    wrapper = ctx.artifacts.get("wrapper")
    if wrapper is None:
        return None, "no generated wrapper"
    constants: dict[str, Any] = {}
    for name, spec in wrapper["specs"].items():
        if spec is None:
            return None, f"wrapper global {name} cannot be described"
        if spec[0] == "const":
            recipe = constant_recipe(gm, spec[1])
            if recipe is None:
                return None, f"constant {spec[1]} has no recipe"
            constants[spec[1]] = recipe
    r = ctx.report
    entry = {
        "format": FORMAT,
        "n_inputs": n_inputs,
        "wrapper": wrapper,
        "cpp": ctx.artifacts.get("cpp"),
        "constants": constants,
        "shared_params": ctx.artifacts.get("shared_params", []),
        "mutated": sorted(ctx.mutated_inputs),
        "report": {
            "patterns": dict(r.patterns),
            "kernels": [dataclasses.asdict(k) for k in r.kernels],
            "extern_calls": r.extern_calls,
            "memory": r.memory,
            "nodes_in": r.nodes_in,
            "nodes_out": r.nodes_out,
        },
    }
    return entry, ""


def write(key: str, options: Any, entry: dict) -> str:
    """Write an entry to the on-disk cache; "" on success, else why it was not stored."""
    try:
        payload = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - an unpicklable piece: just do not cache
        return f"not picklable: {type(exc).__name__}: {exc}"
    from yirage_dynamo.runtime.cpp_build import _write_atomic

    path = _entry_path(options, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    return ""


def _read(path: Path) -> dict | None:
    # Entries pickle region graphs that call yirage ops: register them before unpickling
    # (a new process may not have imported them yet).
    import yirage_dynamo.ops  # noqa: F401

    try:
        data = path.read_bytes()
    except OSError:
        return None
    digest, _, payload = data.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        log.warning("yirage: graph cache entry %s is corrupted; recompiling", path.name)
        return None
    try:
        entry = pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001
        log.warning("yirage: graph cache entry %s unreadable (%s); recompiling", path.name, exc)
        return None
    return entry if entry.get("format") == FORMAT else None


def _resolve_op(name: str) -> Any:
    return functools.reduce(getattr, name.split("."), torch.ops)


def arm(
    entry: dict,
    options: Any,
    example_inputs: list[Any],
    lowering: Any,
    report: Any,
    arena: Any = None,
) -> Callable | None:
    """An entry's program armed with these inputs' weights (`arena`: share one from an
    earlier arming of the same entry: regional pieces run one at a time)."""
    if entry["n_inputs"] != len(example_inputs):
        return None
    from yirage_dynamo.runtime import cpp_build
    from yirage_dynamo.runtime.wrapper import exec_wrapper

    from yirage_dynamo.report import KernelRecord

    launchers: dict[str, Callable] = {}
    cpp = entry["cpp"]
    if cpp is not None:
        cxx = cpp_build.find_compiler(options.cxx or getattr(lowering, "cxx", ""))
        if cxx is None:
            return None
        stats: dict[str, int] = {}
        sos = cpp_build.build_units(
            cpp["sources"], cxx, options.cxx_flags, options.cache_path, stats
        )
        libs = [cpp_build.load_library(so) for so in sos]
        fast = cpp_build.fast_caller(cxx, options.cache_path)
        by_symbol = {
            sym: cpp_build.make_launcher(libs[unit], sym, rendered, sym, "cpu", region, fast)
            for sym, (rendered, region, unit) in cpp["kernels"].items()
        }
        launchers = {name: by_symbol[sym] for name, sym in cpp["symbols"].items()}
        for k in ("hits", "misses"):
            report.cache[k] = report.cache.get(k, 0) + stats.get(k, 0)
    memo: dict[int, Any] = {}
    with torch.no_grad():
        _rearm_shared_params(entry["shared_params"], example_inputs, memo)
        constants = {
            name: r.evaluate(example_inputs, memo) for name, r in entry["constants"].items()
        }
    from yirage_dynamo.ops import direct_impls

    globals_: dict[str, Any] = {}
    for name, spec in entry["wrapper"]["specs"].items():
        kind = spec[0]
        if kind == "torch":
            globals_[name] = torch
        elif kind == "op":
            globals_[name] = _resolve_op(spec[1])
        elif kind == "impl":
            globals_[name] = direct_impls()[_resolve_op(spec[1])]
        elif kind == "module":
            globals_[name] = spec[1]
        elif kind == "kernel":
            globals_[name] = launchers[spec[1]]
        elif kind == "const":
            globals_[name] = constants[spec[1]]
        elif kind == "device":
            globals_[name] = torch.device(spec[1])
        elif kind == "getitem":
            globals_[name] = operator.getitem
        else:
            return None
    w = entry["wrapper"]
    run = exec_wrapper(w["source"], globals_, w["plan"], w["stable"], arena)
    run.mutated_inputs = frozenset(entry["mutated"])
    stored = entry["report"]
    report.patterns.update(stored["patterns"])
    report.kernels.extend(KernelRecord(**k) for k in stored["kernels"])
    report.extern_calls = stored["extern_calls"]
    report.memory = stored["memory"]
    report.nodes_in, report.nodes_out = stored["nodes_in"], stored["nodes_out"]
    if run.program_note:
        report.notes.append(run.program_note)
    return run


def _rearm_shared_params(shared: list, example_inputs: list[Any], memo: dict[int, Any]) -> None:
    """Re-point parameters at slices of their concatenated weight, one concatenation at a
    time, as horizontal GEMM fusion does on a compile.

    Concatenating every group first and re-pointing after would hold the original weights
    and all their concatenations at once (+200 MB peak RSS for a 135M Llama). After each
    group, the memo entries below its concatenation are dropped: they are views of the
    original storage, which could not be freed while memoised; re-evaluated later, they
    read the re-pointed parameters (same values).
    """
    groups: dict[int, list] = {}
    for index, cat_recipe, start, end in shared:
        groups.setdefault(id(cat_recipe), []).append((index, cat_recipe, start, end))
    for members in groups.values():
        cat_recipe = members[0][1]
        cat = cat_recipe.evaluate(example_inputs, memo)
        for index, _, start, end in members:
            param = example_inputs[index]
            part = cat[start:end]
            if isinstance(param, torch.nn.Parameter) and param.shape == part.shape:
                param.data = part
        for r in _below(cat_recipe):
            memo.pop(id(r), None)
        release_free_heap()


def _below(recipe: Any) -> list[Any]:
    """The recipes `recipe` is computed from (not itself)."""
    out: list[Any] = []
    stack = [*recipe.args, *(v for _, v in recipe.kwargs)]
    while stack:
        a = stack.pop()
        if isinstance(a, list | tuple):
            stack.extend(a)
        elif isinstance(a, Recipe):
            out.append(a)
            stack.extend([*a.args, *(v for _, v in a.kwargs)])
    return out


class SharedProgram:
    """An entry kept in memory and re-armed for each repeat of a regional piece (every
    decoder layer of one graph), all sharing one arena: the pieces run one at a time."""

    def __init__(self, entry: dict) -> None:
        self.entry = entry
        self.arena: Any = None

    def arm(
        self, options: Any, example_inputs: list[Any], lowering: Any, report: Any
    ) -> Callable | None:
        fn = arm(self.entry, options, example_inputs, lowering, report, self.arena)
        if fn is not None and self.arena is None:
            self.arena = getattr(fn, "arena", None)
        return fn


def try_load(
    key: str,
    options: Any,
    example_inputs: list[Any],
    lowering: Any,
    report: Any,
    programs: dict[str, SharedProgram] | None = None,
) -> Callable | None:
    """The cached program for `key` armed with these inputs' weights, or None; any failure
    (stale or foreign entry) means: compile as usual. `programs`: a regional compile's
    in-memory programs; the entry read is kept there, so the block's other repeats re-arm
    it without reading the file again."""
    start = time.perf_counter()
    try:
        entry = _read(_entry_path(options, key))
        fn = None
        if entry is not None and programs is not None:
            programs[key] = SharedProgram(entry)
            fn = programs[key].arm(options, example_inputs, lowering, report)
        elif entry is not None:
            fn = arm(entry, options, example_inputs, lowering, report)
    except Exception as exc:  # noqa: BLE001
        log.warning("yirage: graph cache entry %s not usable (%s); recompiling", key, exc)
        fn = None
    report.stages["graph_cache"] = time.perf_counter() - start
    return fn
