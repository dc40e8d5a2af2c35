"""Compile yirage Triton kernels in Inductor's compile-worker processes.

Why: a cold GEMV config search compiles ~16 Triton kernels of ~0.35 s each, and in one
process they queue up (threads barely overlap them: most of Triton's compile holds the
GIL). Inductor compiles its own kernels in a pool of worker processes; ours go to the same
pool. A launch is first *recorded* instead of run (the kernel, the dtypes of its tensor
arguments, its scalars and constexprs), the records are compiled in the workers with
`JITFunction.warmup`, which writes each binary to Triton's on-disk cache, and the real
launch in this process then loads it from there (same source, arguments and options, so
the same cache key):

    with recording() as launches:
        run_op_once(cfg)            # kernels are recorded, not launched
    precompile(launches)            # ~one compile's time for all of them

Anything that goes wrong here (no pool, a worker error) only costs time: the launch
compiles in this process as it always could. (No Triton import here: the worker
imports the kernel's own module.)
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.library import wrap_triton

log = logging.getLogger("yirage_dynamo")

# A recorded launch: (module, kernel name, args with tensors as their dtype, kwargs).
Launch = tuple[str, str, tuple, tuple]

_RECORDING: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar(
    "yirage_triton_recording", default=None
)
# Seconds to wait for the workers (they start with the first CUDA compile; a cold start
# of the pool takes a few seconds) before compiling here instead.
_TIMEOUT_S = 120.0
_PTXAS_ENV = "TRITON_PTXAS_PATH"


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """`wrap_triton(kernel)[grid](*args, **kwargs)`, or its record inside `recording()`."""
    launches = _RECORDING.get()
    if launches is None:
        wrap_triton(kernel)[grid](*args, **kwargs)
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
    that they are up by the time the config search needs them."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()
    except Exception as exc:  # noqa: BLE001 - only a speed-up
        log.debug("yirage: could not start the compile workers: %s", exc)


def compile_launch(
    module: str, name: str, args: tuple, kwargs: tuple, target: Any = None, ptxas: str = ""
) -> str:
    """Compile one recorded launch into Triton's cache (runs in a worker process); returns
    the compiled kernel's hash (its cache key).

    `target` (a triton GPUTarget) and `ptxas` are what this process compiles with. The
    workers must not touch CUDA (they are forked from a process that initialised it), so
    Triton gets a driver that answers `JITFunction.run`'s device, stream and target
    questions without asking CUDA; and they may see another ptxas (measured: Inductor's
    workers ran CUDA 13's, this process Triton's bundled 12.8), which is part of the
    cache key. Both are set for this call only."""
    kernel = getattr(importlib.import_module(module), name)
    if target is None:
        return kernel.warmup(*args, grid=(1,), **dict(kwargs)).hash
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.driver import driver

    before = driver._active  # what `reset` would rebuild by asking CUDA: kept as it was
    env_before = os.environ.get(_PTXAS_ENV)
    driver.set_active(_compile_only_driver(target))
    if ptxas:
        os.environ[_PTXAS_ENV] = ptxas
    get_ptxas_version.cache_clear()  # the version in the key: of the ptxas set here
    try:
        return kernel.warmup(*args, grid=(1,), **dict(kwargs)).hash
    finally:
        driver._active = before
        if env_before is None:
            os.environ.pop(_PTXAS_ENV, None)
        else:
            os.environ[_PTXAS_ENV] = env_before
        get_ptxas_version.cache_clear()


def _compile_only_driver(target: Any) -> Any:
    from triton.backends.nvidia.driver import CudaDriver

    class CompileOnlyDriver(CudaDriver):
        def __init__(self) -> None:  # no CUDA utilities, no torch.cuda
            pass

        def get_current_target(self) -> Any:
            return target

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

    return CompileOnlyDriver()


def precompile(launches: Sequence[Launch]) -> list[str]:
    """Compile `launches` in Inductor's worker processes, all at once; returns the hashes
    of those that compiled there. Without a pool (one compile thread, a daemonic process)
    nothing happens here and each kernel compiles at its first launch."""
    if not launches:
        return []
    try:
        from torch._inductor.async_compile import AsyncCompile, get_compile_threads
        from triton import knobs
        from triton.runtime.driver import driver

        target = driver.active.get_current_target()
        if get_compile_threads() <= 1 or target.backend != "cuda":
            return []
        ptxas = knobs.nvidia.ptxas.path
        pool = AsyncCompile.process_pool()
        futures = [pool.submit(compile_launch, *spec, target, ptxas) for spec in launches]
    except Exception as exc:  # noqa: BLE001 - only a speed-up
        log.debug("yirage: no compile workers for Triton kernels: %s", exc)
        return []
    hashes = []
    start = time.perf_counter()
    for spec, future in zip(launches, futures):
        try:
            hashes.append(future.result(timeout=_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - it compiles at its first launch instead
            log.debug("yirage: worker compile of %s.%s failed: %s", spec[0], spec[1], exc)
    log.info(
        "yirage: %d of %d Triton kernels compiled in the workers, %.2f s",
        len(hashes),
        len(launches),
        time.perf_counter() - start,
    )
    return hashes
