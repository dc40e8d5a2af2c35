"""Build, cache and load the C++ kernels of one graph.

The kernels of a graph go into one translation unit and one compiler call (cold compile
time is dominated by compiler start-up and the headers, not by kernel count), or, when
their source is large, into two built side by side (`build_units`; lowering/cpu.py's
`split_units` decides). Each shared
object is cached under `<cache_path>/cpp/<key>/` where key = sha256(source, flags, compiler
identity, torch version). Entries are written atomically (temporary file + os.replace) and
carry a checksum of the .so in `meta.json`; a missing, truncated or corrupted entry is
rebuilt. The compiler identity (its `--version` text) is itself cached by the compiler
binary's path, size and mtime, so a warm start invokes no compiler at all.

Kernels are called from small generated Python launchers (`make_launcher`), through a
tiny CPython extension built once per machine and cached the same way (`fast_caller`),
or through ctypes where Python's headers are missing.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

DEFAULT_CXX = ("g++", "c++", "clang++")
# -fno-trapping-math: our kernels never enable FP exceptions, and without it GCC will not
# if-convert a float compare inside an `omp simd` loop (the clamps of y_exp & co.): the
# loop stays scalar. Results are unchanged; Inductor's C++ kernels build with it too.
_BASE_FLAGS = ("-shared", "-fPIC", "-std=c++17", "-fno-math-errno", "-fno-trapping-math")
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


def build_units(
    sources: Sequence[str],
    cxx: str,
    flags: Sequence[str],
    cache_root: Path,
    stats: dict[str, int],
) -> list[Path]:
    """`build_shared_object` for several translation units at once: each compiler is its
    own process, so the units build side by side on as many cores."""
    if len(sources) == 1:
        return [build_shared_object(sources[0], cxx, flags, cache_root, stats)]
    per_unit: list[dict[str, int]] = [{} for _ in sources]
    with ThreadPoolExecutor(len(sources)) as pool:
        paths = list(
            pool.map(
                lambda i: build_shared_object(sources[i], cxx, flags, cache_root, per_unit[i]),
                range(len(sources)),
            )
        )
    for unit in per_unit:
        for k, v in unit.items():
            stats[k] = stats.get(k, 0) + v
    return paths


def load_library(path: Path) -> ctypes.CDLL:
    key = str(Path(path).resolve())
    if key not in _loaded:
        _loaded[key] = ctypes.CDLL(key)
    return _loaded[key]


# ---------------------------------------------------------------------------------------
# Fast calls: one packed entry point per kernel and one small CPython extension.
#
# ctypes converts every argument through `argtypes` (~0.1-0.2 us each, ~0.4-0.9 us for a
# 5-argument kernel). Instead, each kernel `k` gets a twin `k_p(const int64_t* a)` that
# unpacks pointers/sizes (and doubles, as their bits) and calls `k`; the extension's
# METH_FASTCALL `call(k_p_address, *slots)` fills that array from Python ints/floats and
# calls it with the GIL released, like ctypes. No argument-type guessing, one exact C
# signature for every kernel. Without Python headers (or if the build fails) launchers
# use ctypes as before.
# ---------------------------------------------------------------------------------------
PACKED_SUFFIX = "_p"
_TRAMPOLINE_SOURCE = r"""// yirage fast-call trampoline (%(python)s)
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cstdint>
#include <cstring>

typedef void (*y_packed_fn)(const int64_t*);
// Kernels that return a status (nonzero: an index was out of range, nothing written).
typedef int64_t (*y_status_fn)(const int64_t*);

// args = (fn address, *slots): floats are passed as their bits, everything else as int64.
static void* y_pack(PyObject* const* args, Py_ssize_t n, int64_t* slots) {
  if (n < 1 || n > 257) {
    PyErr_SetString(PyExc_TypeError, "call(fn, *slots): 0 to 256 slots");
    return NULL;
  }
  void* fn = PyLong_AsVoidPtr(args[0]);
  if (fn == NULL) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null kernel address");
    return NULL;
  }
  for (Py_ssize_t i = 1; i < n; ++i) {
    PyObject* a = args[i];
    if (PyFloat_CheckExact(a)) {
      double d = PyFloat_AS_DOUBLE(a);
      std::memcpy(&slots[i - 1], &d, sizeof d);
      continue;
    }
    long long v = PyLong_AsLongLong(a);
    if (v == -1 && PyErr_Occurred()) return NULL;
    slots[i - 1] = (int64_t)v;
  }
  return fn;
}

static PyObject* y_call(PyObject*, PyObject* const* args, Py_ssize_t n) {
  int64_t slots[256];
  void* fn = y_pack(args, n, slots);
  if (fn == NULL) return NULL;
  Py_BEGIN_ALLOW_THREADS
  ((y_packed_fn)fn)(slots);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* y_call_checked(PyObject*, PyObject* const* args, Py_ssize_t n) {
  int64_t slots[256];
  void* fn = y_pack(args, n, slots);
  if (fn == NULL) return NULL;
  int64_t status;
  Py_BEGIN_ALLOW_THREADS
  status = ((y_status_fn)fn)(slots);
  Py_END_ALLOW_THREADS
  if (status != 0) {
    PyErr_SetString(PyExc_IndexError, "index out of range in a yirage kernel");
    return NULL;
  }
  Py_RETURN_NONE;
}

// A kernel program (runtime/kernel_program.py): args = (program, table, *pointers).
// program: [n_pointers, n_steps, then per step: packed fn, has_status, n_args,
// n_args x (table entry, byte offset)]. The call's pointers fill the table's first
// entries; every argument is a table entry plus an offset.
static PyObject* y_run_program(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n < 2) {
    PyErr_SetString(PyExc_TypeError, "run_program(program, table, *pointers)");
    return NULL;
  }
  const int64_t* prog = (const int64_t*)PyLong_AsVoidPtr(args[0]);
  int64_t* table = (int64_t*)PyLong_AsVoidPtr(args[1]);
  if (prog == NULL || table == NULL) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null program or table");
    return NULL;
  }
  if (n - 2 != prog[0]) {
    PyErr_SetString(PyExc_TypeError, "run_program: wrong number of pointers");
    return NULL;
  }
  for (Py_ssize_t i = 2; i < n; ++i) {
    long long v = PyLong_AsLongLong(args[i]);
    if (v == -1 && PyErr_Occurred()) return NULL;
    table[i - 2] = (int64_t)v;
  }
  int64_t failed = 0;
  Py_BEGIN_ALLOW_THREADS
  const int64_t steps = prog[1];
  const int64_t* p = prog + 2;
  int64_t slots[256];
  for (int64_t s = 0; s < steps; ++s) {
    void* fn = (void*)(intptr_t)p[0];
    const int64_t status = p[1], na = p[2];
    if (na < 0 || na > 256) { failed = 2; break; }
    p += 3;
    for (int64_t i = 0; i < na; ++i) slots[i] = table[p[2 * i]] + p[2 * i + 1];
    p += 2 * na;
    if (status) {
      if (((y_status_fn)fn)(slots) != 0) { failed = 1; break; }
    } else {
      ((y_packed_fn)fn)(slots);
    }
  }
  Py_END_ALLOW_THREADS
  if (failed) {
    if (failed == 2) PyErr_SetString(PyExc_ValueError, "run_program: over 256 arguments");
    else PyErr_SetString(PyExc_IndexError, "index out of range in a yirage kernel");
    return NULL;
  }
  Py_RETURN_NONE;
}

static PyMethodDef y_methods[] = {
    {"call", (PyCFunction)(void (*)(void))y_call, METH_FASTCALL, "call(fn, *slots)"},
    {"call_checked", (PyCFunction)(void (*)(void))y_call_checked, METH_FASTCALL,
     "call_checked(fn, *slots): IndexError if fn returns nonzero"},
    {"run_program", (PyCFunction)(void (*)(void))y_run_program, METH_FASTCALL,
     "run_program(program, table, *pointers): a kernel program's calls in order"},
    {NULL, NULL, 0, NULL}};
static struct PyModuleDef y_module = {PyModuleDef_HEAD_INIT, "yirage_fastcall", NULL, -1,
                                      y_methods};
extern "C" PyMODINIT_FUNC PyInit_yirage_fastcall(void) { return PyModule_Create(&y_module); }
"""
_MAX_SLOTS = 256
_trampolines: dict[str, Callable[..., Any] | None] = {}  # by compiler path


def packed_entry(symbol: str, c_types: Sequence[str], returns_status: bool = False) -> str:
    """C++ of `symbol_p(const int64_t* a)`, which unpacks the slots and calls `symbol`
    (returning its int64_t status for kernels that have one)."""
    pre: list[str] = []
    args: list[str] = []
    for i, ct in enumerate(c_types):
        if ct == "double":
            pre.append(f"double d{i}; std::memcpy(&d{i}, &a[{i}], 8);")
            args.append(f"d{i}")
        elif ct.endswith("*"):
            args.append(f"({ct})(intptr_t)a[{i}]")
        else:
            args.append(f"({ct})a[{i}]")
    ret, rtype = ("return ", "int64_t") if returns_status else ("", "void")
    body = " ".join([*pre, f"{ret}{symbol}({', '.join(args)});"])
    return f'extern "C" {rtype} {symbol}{PACKED_SUFFIX}(const int64_t* a) {{ {body} }}\n'


def fast_caller(cxx: str, cache_root: Path) -> Callable[..., Any] | None:
    """The trampoline's `call`, built once per machine (cached like kernels), or None."""
    if cxx in _trampolines:
        return _trampolines[cxx]
    call = None
    try:
        import importlib.machinery
        import importlib.util
        import sys
        import sysconfig

        include = sysconfig.get_paths().get("include", "")
        if include and (Path(include) / "Python.h").exists():
            abi = f"{sys.version} {sysconfig.get_config_var('SOABI')}"
            source = _TRAMPOLINE_SOURCE % {"python": abi.replace("\n", " ")}
            so = build_shared_object(source, cxx, ("-O2", f"-I{include}"), cache_root, {})
            loader = importlib.machinery.ExtensionFileLoader("yirage_fastcall", str(so))
            spec = importlib.util.spec_from_file_location("yirage_fastcall", so, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            call = module.call
    except (BuildError, OSError, ImportError, AttributeError):
        call = None  # ctypes launchers still work
    _trampolines[cxx] = call
    return call


def _default_fast_caller(lib: ctypes.CDLL) -> Callable[..., Any] | None:
    """Any trampoline this process has, else one built next to `lib`'s cache entry."""
    loaded = next((c for c in _trampolines.values() if c is not None), None)
    if loaded is not None or _trampolines:
        return loaded
    cxx = find_compiler(os.environ.get("YIRAGE_CXX", ""))
    so = Path(getattr(lib, "_name", "") or ".").resolve()
    if cxx is None or so.parent.parent.name != "cpp":  # not <root>/cpp/<key>/kernels_*.so
        return None
    return fast_caller(cxx, so.parent.parent.parent)


def make_launcher(
    lib: ctypes.CDLL,
    symbol: str,
    kernel: Any,
    name: str,
    device: str,
    reference: Callable[..., Any],
    fast_call: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """Generated Python that checks strides, allocates outputs and calls `symbol`.

    `kernel` is a lowering.c_ops.RenderedKernel. The kernel was generated for the strides
    fake-tensor propagation predicted; a tensor arriving with other strides (in a dim of
    size > 1) runs `reference` (the region's ATen graph) instead. With `fast_call` (see
    `fast_caller`) and a packed twin `symbol_p` in `lib`, the kernel is called through
    it (~0.25 us); otherwise by ctypes from `argtypes` (~0.1-0.2 us per argument more).
    """
    fn = getattr(lib, symbol)
    if fast_call is None:  # e.g. launchers rebuilt from a cache
        fast_call = _default_fast_caller(lib)
    status = getattr(kernel, "returns_status", False)
    if status and fast_call is not None:  # its twin raises IndexError on a nonzero status
        fast_call = getattr(getattr(fast_call, "__self__", None), "call_checked", None)
    packed = None
    if fast_call is not None and len(kernel.params) <= _MAX_SLOTS:
        try:
            packed = ctypes.cast(getattr(lib, symbol + PACKED_SUFFIX), ctypes.c_void_p).value
        except AttributeError:
            packed = None  # a library built without packed entries
    argtypes: list[Any] = []
    call: list[str] = []
    pre: list[str] = [f"{sym} = {src}" for sym, src in kernel.symbol_sources.items()]
    by_input: dict[int, list[str]] = {}
    contiguous = set(getattr(kernel, "contiguous_inputs", ()))
    for i, dim, expr in kernel.stride_checks:
        if i in contiguous:  # the same condition as the per-dim checks, in one call
            by_input[i] = [f"not a{i}.is_contiguous()"]
        else:
            by_input.setdefault(i, []).append(f"_st{i}[{dim}] != {expr}")
    # Single-output kernels take `out=` (an arena view from the memory plan, laid out as
    # the fake value says); multi-output ones allocate their results; kernels without
    # outputs (they write their inputs, e.g. KV-cache writes) return None.
    single = not kernel.multi_output and bool(kernel.outputs)
    guards = [f"not ({g})" for g in getattr(kernel, "guards", ())]
    if by_input or guards:
        pre += [f"_st{i} = a{i}.stride()" for i in by_input if i not in contiguous]
        cond = " or ".join([*guards, *(c for cs in by_input.values() for c in cs)])
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
            call.append(f"float(a{p.index})" if packed else f"a{p.index}")
        elif p.kind == "int":
            argtypes.append(ctypes.c_int64)
            call.append(f"a{p.index}")
        else:
            argtypes.append(ctypes.c_int64)
            call.append(p.symbol)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int64 if status else None
    args = ", ".join([f"a{i}" for i in range(kernel.n_placeholders)] + ["out=None"] * single)
    ret = f"({', '.join(outs)},)" if kernel.multi_output else (outs[0] if outs else "None")
    invoke = f"_call(_fp, {', '.join(call)})" if packed else f"_fn({', '.join(call)})"
    if status and not packed:
        invoke = f"if {invoke}:\n        raise IndexError('index out of range in a yirage kernel')"
    body = [*pre, invoke, f"return {ret}"]
    src = f"def {name}({args}):\n" + "".join(f"    {line}\n" for line in body)
    ns: dict[str, Any] = {
        "_fn": fn,
        "_call": fast_call,
        "_fp": packed,
        "_ref": reference,
        "_empty_strided": torch.empty_strided,
        "_dev": torch.device(device),
    }
    for j, (_, _, dtype) in enumerate(kernel.outputs):
        ns[f"_dt{j}"] = dtype
    exec(compile(src, f"<yirage_launcher_{name}>", "exec"), ns)
    launcher = ns[name]
    launcher.kernel_name = name
    # For kernel programs (runtime/kernel_program.py): what the kernel takes, its packed
    # entry and the trampoline that can run a list of such calls.
    launcher.rendered = kernel
    launcher.packed_address = packed
    launcher.run_program = getattr(getattr(fast_call, "__self__", None), "run_program", None)
    launcher.accepts_out = single
    launcher.source = src
    return launcher
