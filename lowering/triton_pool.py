"""Compile yirage Triton kernels in forked worker processes, all at once.

Why: a cold GEMV config search compiles ~16-22 Triton kernels of ~0.25 s each, and in one
process they queue up (threads barely overlap them: most of Triton's compile holds the
GIL). A launch is first *recorded* instead of run (the kernel, the dtypes of its tensor
arguments, its scalars and constexprs); the records are compiled by children forked from
this process with `JITFunction.warmup`, which writes each binary to Triton's on-disk
cache (and its launcher, a C extension Triton builds per argument signature); the real
launch here then loads both from there:

    with recording() as launches:
        run_op_once(cfg)            # kernels are recorded, not launched
    precompile(launches)            # about one compile's time for all of them

Why forked children and not Inductor's compile workers: those start a fresh interpreter
that imports torch and Triton (measured on an H100 host: the first result came back ~9 s
after submission, longer than compiling everything here), and they compile with another
ptxas than this process (CUDA 13's against Triton's bundled 12.8): another cache key, so
every launch here compiled again. A fork starts in milliseconds with this process's
modules, Triton state and ptxas: the same cache key by construction. The children never
touch CUDA (a forked child must not): Triton gets a driver that answers the device,
stream and target questions of `JITFunction.run` from what this process told it.

Anything that goes wrong here only costs time: the launch compiles in this process as it
always could. No Triton import at module level: the CPU suite imports this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
import select
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch.library import wrap_triton

log = logging.getLogger("yirage_dynamo.triton_pool")

# A recorded launch: (module, kernel name, args with tensors as their dtype, kwargs).
Launch = tuple[str, str, tuple, tuple]

_RECORDING: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar(
    "yirage_triton_recording", default=None
)
# Seconds to wait for the children (each compiles ~3 kernels in ~1 s) before killing them
# and compiling here instead.
_TIMEOUT_S = 30.0
# Workers at most: a config search has ~4-7 candidates per kernel shape, ~20-30 in all.
_MAX_WORKERS = 16
# Benchmark/debug override of the worker count (at most the compile threads still).
WORKERS_ENV = "YIRAGE_PRECOMPILE_WORKERS"


def launch(kernel: Any, grid: tuple, *args: Any, traced: bool = True, **kwargs: Any) -> None:
    """`wrap_triton(kernel)[grid](*args, **kwargs)`, or its record inside `recording()`.

    traced=False launches through Triton's own launcher (`kernel[grid](...)`), for an
    opaque custom op: Inductor calls the op and never sees the kernel, so launch options
    that its user-kernel code generation drops (launch_pdl) take effect."""
    launches = _RECORDING.get()
    if launches is None:
        (wrap_triton(kernel) if traced else kernel)[grid](*args, **kwargs)
        return
    spec = _spec(kernel, args, kwargs)
    if spec is not None and spec not in launches:
        launches.append(spec)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within this block (this thread/context only) launches are recorded, not run."""
    launches: list[Launch] = []
    token = _RECORDING.set(launches)
    try:
        yield launches
    finally:
        _RECORDING.reset(token)


def precompile_calls(calls: Iterable[Callable[[], Any]]) -> list[str]:
    """Run each call with its launches recorded, then `precompile` them all."""
    with recording() as launches:
        for call in calls:
            call()
    return precompile(launches)


def precompile_graph_ops(
    gm: Any, namespace: str, skip: tuple[str, ...] = (), extra: Sequence[Callable] = ()
) -> int:
    """Compile at once, in forked children, the Triton kernels that `gm`'s ops of
    `namespace` launch (but not ops named with a `skip` prefix: their config search
    compiled them), and those `extra` calls launch. Why: left to the graph's first call,
    they compiled one after another in this process (a cold 7B H100 compile: 14 kernels
    and 5 launchers there, ~2.5 s of its ~15 s). Each op runs once per distinct input
    metadata, on empty stand-ins of its inputs, with its launches recorded; it returns
    how many launches compiled in the children."""
    calls: dict[tuple, Callable] = {}
    for node in gm.graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
            continue
        if op.namespace != namespace or (skip and op._opname.startswith(skip)):
            continue
        try:
            key = (op, repr(_metadata(node.args)), repr(_metadata(node.kwargs)))
        except _NoStandIn:
            continue
        calls.setdefault(key, functools.partial(_run_on_stand_ins, op, node.args, node.kwargs))
    with recording() as launches, torch.no_grad():
        for call in [*calls.values(), *extra]:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - that op compiles at its first call
                log.debug("yirage: %s not recorded for precompiling: %s", call, exc)
    return len(precompile(launches)) if launches else 0


class _NoStandIn(Exception):
    """An input with no static tensor metadata to make a stand-in from."""


def _metadata(args: Any) -> Any:
    """Nested args with each graph node as its value's (shape, strides, offset, dtype,
    device); _NoStandIn where a node has none."""

    def meta(a: Any) -> Any:
        if not isinstance(a, torch.fx.Node):
            return a
        val = a.meta.get("val")
        if not isinstance(val, torch.Tensor) or not all(
            type(d) is int for d in (*val.shape, *val.stride(), val.storage_offset())
        ):
            raise _NoStandIn(a.name)
        return (tuple(val.shape), val.stride(), val.storage_offset(), val.dtype, val.device)

    return torch.fx.node.map_aggregate(args, meta)


def stand_in(a: Any) -> Any:
    """An uninitialised tensor of a node value's layout (its offset kept: Triton
    specialises pointers on their alignment); anything else as it is."""
    if not isinstance(a, torch.fx.Node):
        return a
    val = a.meta["val"]
    span = 1 + sum((n - 1) * st for n, st in zip(val.shape, val.stride()) if n > 0)
    if val.numel() == 0:
        span = 0
    flat = torch.empty(val.storage_offset() + span, dtype=val.dtype, device=val.device)
    return flat.as_strided(val.shape, val.stride(), val.storage_offset())


def _run_on_stand_ins(op: Any, args: Any, kwargs: Any) -> None:
    op(
        *torch.fx.node.map_aggregate(args, stand_in),
        **torch.fx.node.map_aggregate(kwargs, stand_in),
    )


def _spec(kernel: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Launch | None:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            # A worker's stand-in tensor sits at address 0: Triton specialises pointers on
            # 16-byte alignment, so an unaligned one would compile another variant.
            if a.data_ptr() % 16:
                return None
            out.append(a.dtype)
        elif a is None or isinstance(a, bool | int | float):
            out.append(a)
        else:
            return None
    fn = kernel.fn
    return fn.__module__, fn.__name__, tuple(out), tuple(sorted(kwargs.items()))


def warm_pool() -> None:
    """Start Inductor's compile workers now (as Inductor's own backend does on entry), so
    that they are up by the time Inductor compiles its kernels."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()
    except Exception as exc:  # noqa: BLE001 - only a speed-up
        log.debug("yirage: could not start the compile workers: %s", exc)


def compile_launch(
    module: str, name: str, args: tuple, kwargs: tuple, target: Any = None, device: int = 0
) -> str:
    """Compile one recorded launch into Triton's cache (in a forked child); returns the
    compiled kernel's hash (its cache key). With `target` (a triton GPUTarget), Triton
    asks a driver that knows the target and `device` instead of CUDA."""
    kernel = getattr(importlib.import_module(module), name)
    if target is None:
        return kernel.warmup(*args, grid=(1,), **dict(kwargs)).hash
    from triton.runtime.driver import driver

    driver.set_active(_compile_only_driver(target, device))  # a child's own copy
    compiled = kernel.warmup(*args, grid=(1,), **dict(kwargs))
    _build_launcher(compiled)
    return compiled.hash


def _build_launcher(compiled: Any) -> None:
    """Build the kernel's launcher into Triton's cache as well.

    Triton launches through a small C extension generated per argument signature and
    built with the system C compiler on a kernel's first launch (~0.3 s each, measured on
    an H100 host: five of them, 1.6 s of a cold 7B compile, all in the parent). Building
    it here leaves the parent only loading the cached extension. Nothing here calls CUDA:
    the launcher's C code runs only when it launches."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher

        CudaLauncher(compiled.src, compiled.metadata)
    except Exception as exc:  # noqa: BLE001 - the parent builds it as before
        log.debug("yirage: launcher not prebuilt: %s", exc)


def _load_compiler() -> None:
    """Import Triton's compiler and launcher modules in the parent, once, before forking:
    Triton imports them at a process's first compile, and children would each import
    them again (when nothing compiled a Triton kernel in this process yet, e.g. a graph
    Inductor never saw)."""
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
        import triton.backends.nvidia.driver  # noqa: F401
        import triton.compiler.code_generator  # noqa: F401
        import triton.compiler.compiler  # noqa: F401
        import triton.runtime.build  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - only a speed-up
        log.debug("yirage: Triton's compiler not preloaded: %s", exc)


def _compile_only_driver(target: Any, device: int) -> Any:
    from triton.backends.nvidia.driver import CudaDriver

    class CompileOnlyDriver(CudaDriver):
        def __init__(self) -> None:  # no CUDA utilities, no torch.cuda
            pass

        def get_current_target(self) -> Any:
            return target

        def get_current_device(self) -> int:
            return device

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

    return CompileOnlyDriver()


def precompile(launches: Sequence[Launch]) -> list[str]:
    """Compile `launches` in forked children, all at once; returns the hashes of those
    that compiled there. With one CPU, or no fork, nothing happens here and each kernel
    compiles at its first launch."""
    workers = min(len(launches), _max_workers(), _compile_threads())
    if workers < 2 or not hasattr(os, "fork"):
        return []
    start = time.perf_counter()
    try:
        from triton.runtime.driver import driver

        target = driver.active.get_current_target()
        device = driver.active.get_current_device()
    except Exception as exc:  # noqa: BLE001 - only a speed-up
        log.debug("yirage: no Triton target to compile for: %s", exc)
        return []
    if target.backend != "cuda":
        return []
    _load_compiler()
    hashes = compile_in_children(launches, target, device, workers, _TIMEOUT_S)
    log.info(
        "yirage: %d of %d Triton kernels compiled in %d forked children, %.2f s",
        len(hashes),
        len(launches),
        workers,
        time.perf_counter() - start,
    )
    return hashes


def _max_workers() -> int:
    try:
        return max(1, int(os.environ.get(WORKERS_ENV, _MAX_WORKERS)))
    except ValueError:
        return _MAX_WORKERS


def shares(launches: Sequence[Launch], workers: int) -> list[list[Launch]]:
    """`launches` cut into `workers` shares of near-equal length, each as few kernels as
    can be: launches of one kernel are adjacent. Why: Triton builds a launcher (a C
    extension, ~0.3 s of the C compiler) per kernel signature on its first compile in a
    process; a child given every kernel in turn would build every kernel's launcher."""
    ordered = sorted(launches, key=lambda spec: (spec[0], spec[1]))  # stable: configs keep order
    n = len(ordered)
    cuts = [n * i // workers for i in range(workers + 1)]
    return [ordered[cuts[i] : cuts[i + 1]] for i in range(workers) if cuts[i] < cuts[i + 1]]


def _compile_threads() -> int:
    """Inductor's compile parallelism (TORCHINDUCTOR_COMPILE_THREADS; 1 turns our children
    off too, for a user who wants no compile subprocesses). Inductor's own answer when it
    is loaded; else its rule for this case, because importing Inductor for it costs ~1 s
    of a cold compile that may not use Inductor at all."""
    if "torch._inductor.config" in sys.modules:
        try:
            from torch._inductor.async_compile import get_compile_threads

            return get_compile_threads()
        except Exception:  # noqa: BLE001 - an older or newer torch: the rule below
            pass
    env = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(32, cpus or 1)


def compile_in_children(
    launches: Sequence[Launch], target: Any, device: int, workers: int, timeout_s: float
) -> list[str]:
    """`compile_launch` each launch in one of `workers` forked children (`shares`);
    returns the hashes they report. A child still busy after `timeout_s` is killed: its
    kernels compile at their first launch instead.

    Plain fork + pipe rather than a ProcessPoolExecutor: no manager thread and no exit
    handler that joins the children, so a child stuck in a lock inherited from another
    thread costs at most the timeout, never a hang at interpreter exit."""
    children: list[tuple[int, int]] = []
    with warnings.catch_warnings():
        # Python warns that forking a threaded process may deadlock the child in a lock
        # another thread held; the timeout bounds that, and the children only compile.
        warnings.simplefilter("ignore", DeprecationWarning)
        for part in shares(launches, workers):
            read, write = os.pipe()
            try:
                pid = os.fork()
            except OSError as exc:  # out of processes or memory: the rest compile here
                os.close(read)
                os.close(write)
                log.debug("yirage: could not fork a compile child: %s", exc)
                break
            if pid == 0:  # the child: compile, report, leave without any exit handler
                os.close(read)
                _child(part, target, device, write)
            os.close(write)
            children.append((pid, read))
    deadline = time.monotonic() + timeout_s
    hashes: list[str] = []
    for pid, read in children:
        out = b""
        while True:
            ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(read, 65536) if ready else b""
            if not chunk:
                break
            out += chunk
        if not ready:
            os.kill(pid, signal.SIGKILL)
            log.debug("yirage: a compile child ran past %.0f s; killed", timeout_s)
        os.close(read)
        os.waitpid(pid, 0)
        hashes.extend(h for h in out.decode().split() if h)
    return hashes


def _child(part: Sequence[Launch], target: Any, device: int, write: int) -> None:
    code = 0
    try:
        done = []
        for spec in part:
            try:
                done.append(compile_launch(*spec, target, device))
            except Exception:  # noqa: BLE001 - that one compiles in the parent later
                pass
        os.write(write, " ".join(done).encode())
    except BaseException:  # noqa: BLE001 - whatever happens, this process must end here
        code = 1
    finally:
        os._exit(code)
