"""Build, cache and load the C++ kernels of one graph.

All kernels of a graph go into ONE translation unit and one compiler call (cold compile
time is dominated by compiler start-up and the headers, not by kernel count). The shared
object is cached under `<cache_path>/cpp/<key>/` where key = sha256(source, flags, compiler
identity, torch version). Entries are written atomically (temporary file + os.replace) and
carry a checksum of the .so in `meta.json`; a missing, truncated or corrupted entry is
rebuilt. The compiler identity (its `--version` text) is itself cached by the compiler
binary's path, size and mtime, so a warm start invokes no compiler at all.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_CXX = ("g++", "c++", "clang++")
_BASE_FLAGS = ("-shared", "-fPIC", "-std=c++17", "-fno-math-errno")
_loaded: dict[str, ctypes.CDLL] = {}  # by .so path: never dlopen the same file twice


class BuildError(RuntimeError):
    pass


def find_compiler(cxx: str = "") -> str | None:
    """Absolute path of the C++ compiler to use, or None."""
    for name in (cxx,) if cxx else DEFAULT_CXX:
        path = shutil.which(name)
        if path:
            return path
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_compiler(argv: list[str]) -> subprocess.CompletedProcess:
    """The one place a compiler process is started (tests patch it to assert cache hits)."""
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def compiler_identity(cxx: str, cache_root: Path) -> str:
    """`cxx --version` text, cached by the binary's path, size and mtime."""
    st = os.stat(cxx)
    stamp = f"{cxx}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_root / "compilers.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp in known:
        return known[stamp]
    proc = run_compiler([cxx, "--version"])
    if proc.returncode != 0:
        raise BuildError(f"{cxx} --version failed: {proc.stderr.strip()[:300]}")
    ident = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else cxx
    known[stamp] = ident
    cache_root.mkdir(parents=True, exist_ok=True)
    _write_atomic(index, json.dumps(known, indent=1).encode())
    return ident


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_shared_object(
    source: str, cxx: str, flags: Sequence[str], cache_root: Path, stats: dict[str, int]
) -> Path:
    """The cached (or freshly built) .so for `source`; counts a hit or a miss in `stats`."""
    ident = compiler_identity(cxx, cache_root)
    argv_flags = [*flags, *_BASE_FLAGS]
    key = _sha("\0".join([source, " ".join(argv_flags), ident, torch.__version__]).encode())[:32]
    entry = cache_root / "cpp" / key
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        so_path = entry / meta["so"]
        if _sha(so_path.read_bytes()) == meta["so_sha256"]:
            stats["hits"] = stats.get("hits", 0) + 1
            return so_path
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or damaged entry: (re)build it below
    stats["misses"] = stats.get("misses", 0) + 1
    entry.mkdir(parents=True, exist_ok=True)
    _write_atomic(entry / "kernels.cpp", source.encode())
    fd, tmp_so = tempfile.mkstemp(dir=entry, prefix=".kernels.", suffix=".so")
    os.close(fd)
    try:
        proc = run_compiler([cxx, *argv_flags, str(entry / "kernels.cpp"), "-o", tmp_so])
        if proc.returncode != 0:
            raise BuildError(f"C++ compile failed ({cxx}):\n{proc.stderr[-4000:]}")
        data = Path(tmp_so).read_bytes()
        # Content-named: a process that already dlopen'ed an older build keeps its file,
        # and dlopen's by-path cache can never hand back a stale library.
        so_path = entry / f"kernels_{_sha(data)[:16]}.so"
        os.replace(tmp_so, so_path)
    finally:
        Path(tmp_so).unlink(missing_ok=True)
    meta = {
        "so": so_path.name,
        "so_sha256": _sha(data),
        "cxx": ident,
        "flags": argv_flags,
        "torch": torch.__version__,
    }
    _write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    return so_path


def load_library(path: Path) -> ctypes.CDLL:
    key = str(Path(path).resolve())
    if key not in _loaded:
        _loaded[key] = ctypes.CDLL(key)
    return _loaded[key]


def make_launcher(
    lib: ctypes.CDLL,
    symbol: str,
    kernel: Any,
    name: str,
    device: str,
    reference: Callable[..., Any],
) -> Callable[..., Any]:
    """Generated Python that checks strides, allocates outputs and calls `symbol`.

    `kernel` is a lowering.c_ops.RenderedKernel. The kernel was generated for the strides
    fake-tensor propagation predicted; a tensor arriving with other strides (in a dim of
    size > 1) runs `reference` (the region's ATen graph) instead. Arguments are converted
    by ctypes from `argtypes` (pointers and size symbols only: ~0.5 us each).
    """
    fn = getattr(lib, symbol)
    argtypes: list[Any] = []
    call: list[str] = []
    pre: list[str] = [f"{sym} = {src}" for sym, src in kernel.symbol_sources.items()]
    by_input: dict[int, list[str]] = {}
    for i, dim, expr in kernel.stride_checks:
        by_input.setdefault(i, []).append(f"_st{i}[{dim}] != {expr}")
    # Single-output kernels take `out=` (an arena view from the memory plan, laid out as
    # the fake value says); multi-output ones allocate their results.
    single = not kernel.multi_output
    if by_input:
        pre += [f"_st{i} = a{i}.stride()" for i in by_input]
        cond = " or ".join(c for cs in by_input.values() for c in cs)
        args = ", ".join(f"a{i}" for i in range(kernel.n_placeholders))
        ret = f"_ref({args})"
        if single:
            ret = f"{ret} if out is None else out.copy_(_ref({args}))"
        pre += [f"if {cond}:", f"    return {ret}"]
    outs = []
    for j, (shape, stride, _) in enumerate(kernel.outputs):
        alloc = f"_empty_strided({shape}, {stride}, dtype=_dt{j}, device=_dev)"
        if single:
            alloc = f"{alloc} if out is None else out"
        pre.append(f"o{j} = {alloc}")
        outs.append(f"o{j}")
    for p in kernel.params:
        if p.kind in ("tensor", "out"):
            argtypes.append(ctypes.c_void_p)
            call.append(f"{'a' if p.kind == 'tensor' else 'o'}{p.index}.data_ptr()")
        elif p.kind == "float":
            argtypes.append(ctypes.c_double)
            call.append(f"a{p.index}")
        elif p.kind == "int":
            argtypes.append(ctypes.c_int64)
            call.append(f"a{p.index}")
        else:
            argtypes.append(ctypes.c_int64)
            call.append(p.symbol)
    fn.argtypes = argtypes
    fn.restype = None
    args = ", ".join([f"a{i}" for i in range(kernel.n_placeholders)] + ["out=None"] * single)
    ret = f"({', '.join(outs)},)" if kernel.multi_output else outs[0]
    body = [*pre, f"_fn({', '.join(call)})", f"return {ret}"]
    src = f"def {name}({args}):\n" + "".join(f"    {line}\n" for line in body)
    ns: dict[str, Any] = {
        "_fn": fn,
        "_empty_strided": torch.empty_strided,
        "_dev": torch.device(device),
        "_ref": reference,
    }
    for j, (_, _, dtype) in enumerate(kernel.outputs):
        ns[f"_dt{j}"] = dtype
    exec(compile(src, f"<yirage_launcher_{name}>", "exec"), ns)
    launcher = ns[name]
    launcher.kernel_name = name
    launcher.accepts_out = single
    launcher.source = src
    return launcher
