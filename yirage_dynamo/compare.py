"""`yirage compare`: eager vs Inductor vs yirage on one HF model, in one process.

Per backend, one after the other: the model is compiled and its first call timed ("cold",
compile included), its output compared with eager's (max abs error; generated tokens
must match), then `warmup` calls. Then `iters` timed rounds call every backend in turn,
with device synchronisation, so a shared machine's load changes hit all backends alike.
Results print as a table and are written as CSV, JSON and a PNG chart.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .models import DTYPES, build_model, is_generative, random_input_ids, weight_bytes

BACKENDS = ("eager", "inductor", "yirage")
PLOT_SIZE_IN = (10.0, 3.2)
PLOT_DPI = 100


@dataclasses.dataclass
class CompareConfig:
    model: str = "llama"
    size: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    backends: tuple[str, ...] = BACKENDS
    task: str = "forward"
    batch: int = 1
    seq_len: int = 32
    new_tokens: int = 16
    warmup: int = 2
    iters: int = 10
    layers: int | None = None
    # Empty Inductor and yirage on-disk caches, so "cold" is a first-ever compile.
    fresh_caches: bool = False


@dataclasses.dataclass
class BackendResult:
    backend: str
    cold_s: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    tok_s: float | None = None
    gb_s: float | None = None
    peak_mb: float | None = None
    max_abs_err: float | None = None
    tokens_match: bool | None = None
    graphs: int | None = None
    fallbacks: int | None = None
    fallback_reasons: str | None = None
    error: str | None = None


class _RssSampler:
    """Peak resident memory over a phase on CPU, sampled from /proc (Linux) in a thread."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _RssSampler:
        self.base = self.rss()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


class _Progress:
    """tqdm when installed (and stderr is a terminal), else nothing."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False)

    def step(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(label)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _runner(
    cfg: CompareConfig, net: torch.nn.Module, backend: str, ids: torch.Tensor
) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
    """A call returning (output to compare in fp32, generated tokens or None)."""
    if cfg.task == "forward":
        fn: Callable = net
        if backend != "eager":
            fn = torch.compile(net, backend=backend)
        if is_generative(cfg.model):
            return lambda: (fn(input_ids=ids, use_cache=False).logits, None)
        return lambda: (fn(input_ids=ids).last_hidden_state, None)

    from transformers import CompileConfig

    kwargs: dict[str, Any] = dict(
        max_new_tokens=cfg.new_tokens,
        min_new_tokens=cfg.new_tokens,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )
    if backend == "eager":
        # On CUDA, generate() would compile a static-cache model with Inductor by itself.
        kwargs["disable_compile"] = True
    else:
        cc = CompileConfig(backend=backend)
        # Not an __init__ argument: lets generate() compile on CPU too.
        cc._compile_all_devices = True
        kwargs["compile_config"] = cc

    # generate() keeps one compiled forward per model (`_compiled_call`, rebuilt when the
    # compile config changes); each backend keeps its own so interleaved calls don't rebuild.
    own: dict[str, Any] = {}

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        for name, value in own.items():
            setattr(net, name, value)
        out = net.generate(ids, **kwargs)
        for name in ("_compiled_call", "_last_compile_config"):
            if hasattr(net, name):
                own[name] = getattr(net, name)
        return torch.stack(out.logits, 1), out.sequences

    return call


_Call = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def _prepare(
    cfg: CompareConfig,
    net: torch.nn.Module,
    backend: str,
    ids: torch.Tensor,
    reference: tuple[torch.Tensor, torch.Tensor | None],
    progress: _Progress,
) -> tuple[BackendResult, _Call]:
    """Compile (timed: "cold"), check against eager, warm up; peak memory of this phase."""
    import yirage_dynamo

    res = BackendResult(backend)
    for name in ("_compiled_call", "_last_compile_config"):
        if hasattr(net, name):
            delattr(net, name)  # the previous backend's compiled generate() forward
    n_reports = len(yirage_dynamo.reports())
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), _RssSampler() as rss:
        call = _runner(cfg, net, backend, ids)
        start = time.perf_counter()
        # Cloned: with CUDA graphs the next replay overwrites the outputs in place.
        out = _cloned(call())
        _sync(cfg.device)
        res.cold_s = time.perf_counter() - start
        progress.step(f"{backend}: compiled")
        for _ in range(cfg.warmup):
            call()
            progress.step(f"{backend}: warm-up")
        _sync(cfg.device)
    if cfg.device == "cuda":
        res.peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        res.peak_mb = max(0, rss.peak - rss.base) / 2**20
    res.max_abs_err = (out[0].float() - reference[0].float()).abs().max().item()
    if out[1] is not None and reference[1] is not None:
        res.tokens_match = bool(torch.equal(out[1], reference[1]))
    if backend == "yirage":
        new = yirage_dynamo.reports()[n_reports:]
        res.graphs = len(new)
        res.fallbacks = sum(len(r.fallbacks) for r in new)
        reasons = [
            f"{f.stage} -> {f.to}: {f.reason.splitlines()[0]}" for r in new for f in r.fallbacks
        ]
        res.fallback_reasons = " | ".join(reasons)[:600] or None
    return res, call


def _time_interleaved(
    cfg: CompareConfig,
    prepared: list[tuple[BackendResult, _Call]],
    wbytes: int,
    progress: _Progress,
) -> None:
    """Timed calls, round-robin over backends, so load changes on a shared machine hit
    every backend alike instead of whichever happened to run then."""
    times: list[list[float]] = [[] for _ in prepared]
    with torch.no_grad():
        for _ in range(cfg.iters):
            for (res, call), samples in zip(prepared, times):
                if res.error:
                    continue
                start = time.perf_counter()
                try:
                    call()
                    _sync(cfg.device)
                except Exception as exc:  # noqa: BLE001 - reported in its row
                    res.error = f"while timing: {type(exc).__name__}: {exc}"[:300]
                    continue
                samples.append(time.perf_counter() - start)
                progress.step(f"{res.backend}: timing")
    steps = cfg.new_tokens if cfg.task == "generate" else 1
    tokens = cfg.batch * (cfg.new_tokens if cfg.task == "generate" else cfg.seq_len)
    for (res, _), samples in zip(prepared, times):
        if res.error or not samples:
            continue
        per_step = [t / steps for t in samples]
        res.p50_ms = statistics.median(per_step) * 1e3
        res.p90_ms = _quantile(per_step, 0.9) * 1e3
        res.tok_s = tokens / statistics.median(samples)
        # Every step reads every weight once: a lower bound on the memory traffic.
        res.gb_s = wbytes / (res.p50_ms / 1e3) / 1e9


def _cloned(out: tuple[torch.Tensor, torch.Tensor | None]):
    return tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in out)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def _fresh_caches(enabled: bool) -> Iterator[None]:
    """Point Inductor's and yirage's on-disk caches at an empty directory, then restore."""
    if not enabled:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with tempfile.TemporaryDirectory(prefix="yirage_compare_") as tmp:
        saved = os.environ.get("YIRAGE_CACHE_DIR")
        os.environ["YIRAGE_CACHE_DIR"] = os.path.join(tmp, "yirage")
        try:
            with temporary_cache_dir(os.path.join(tmp, "inductor")):
                yield
        finally:
            if saved is None:
                os.environ.pop("YIRAGE_CACHE_DIR", None)
            else:
                os.environ["YIRAGE_CACHE_DIR"] = saved


def run_compare(cfg: CompareConfig) -> list[BackendResult]:
    """Run every backend of `cfg` in this process; a failing backend gets `error` set."""
    net = build_model(cfg.model, cfg.size, DTYPES[cfg.dtype], cfg.device, cfg.layers)
    ids = random_input_ids(net, cfg.batch, cfg.seq_len)
    wbytes = weight_bytes(net)
    calls_per_backend = 1 + cfg.warmup + cfg.iters
    progress = _Progress(len(cfg.backends) * calls_per_backend + 1, "yirage compare")
    results: list[BackendResult] = []
    try:
        with _fresh_caches(cfg.fresh_caches):
            with torch.no_grad():
                reference = _runner(cfg, net, "eager", ids)()
            progress.step("eager reference")
            torch._dynamo.reset()
            prepared: list[tuple[BackendResult, _Call]] = []
            for backend in cfg.backends:
                try:
                    res, call = _prepare(cfg, net, backend, ids, reference, progress)
                    prepared.append((res, call))
                except Exception as exc:  # noqa: BLE001 - a failing backend must not hide the rest
                    res = BackendResult(backend, error=f"{type(exc).__name__}: {exc}"[:300])
                results.append(res)
            _time_interleaved(cfg, prepared, wbytes, progress)
    finally:
        progress.close()
        torch._dynamo.reset()
    return results


_COLUMNS = [
    ("backend", "backend", "{}"),
    ("cold_s", "cold s", "{:.2f}"),
    ("p50_ms", "p50 ms", "{:.3f}"),
    ("p90_ms", "p90 ms", "{:.3f}"),
    ("tok_s", "tok/s", "{:.1f}"),
    ("gb_s", "GB/s", "{:.2f}"),
    ("peak_mb", "peak MB", "{:.1f}"),
    ("max_abs_err", "max abs err", "{:.2e}"),
]


def format_table(cfg: CompareConfig, results: list[BackendResult]) -> str:
    unit = "per token (generate() time / new tokens)" if cfg.task == "generate" else "per forward"
    head = (
        f"{cfg.model} {cfg.size} {cfg.dtype} on {cfg.device}, task={cfg.task} "
        f"(batch {cfg.batch}, seq {cfg.seq_len}"
        + (f", {cfg.new_tokens} new tokens" if cfg.task == "generate" else "")
        + f"); latency {unit}; cold = first call incl. compile, "
        + ("empty on-disk caches" if cfg.fresh_caches else "on-disk caches as found")
    )
    cells = [[title for _, title, _ in _COLUMNS] + ["notes"]]
    for r in results:
        row = []
        for key, _, fmt in _COLUMNS:
            value = getattr(r, key)
            row.append("-" if value is None else fmt.format(value))
        notes = []
        if r.error:
            notes.append(f"FAILED: {r.error}")
        if r.tokens_match is not None:
            notes.append("tokens match" if r.tokens_match else "TOKENS DIFFER")
        if r.graphs is not None:
            notes.append(f"{r.graphs} graphs, {r.fallbacks} fallbacks")
        row.append("; ".join(notes))
        cells.append(row)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    lines = [head]
    for n, row in enumerate(cells):
        line = "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + f" | {row[-1]} |"
        lines.append(line)
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|---|")
    for r in results:
        if r.fallback_reasons:
            lines.append(f"{r.backend} fell back: {r.fallback_reasons}")
    return "\n".join(lines)


def write_outputs(
    cfg: CompareConfig, results: list[BackendResult], out_dir: str | Path
) -> dict[str, Path | str]:
    """Write results.csv, results.json and compare.png; the PNG entry is a message
    instead of a path when matplotlib is missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [dataclasses.asdict(r) for r in results]
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["backend"])
        writer.writeheader()
        writer.writerows(rows)
    json_path = out / "results.json"
    meta = {
        "config": dataclasses.asdict(cfg),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "peak_memory": "cuda max_memory_allocated"
        if cfg.device == "cuda"
        else "CPU resident-set growth over the run (sampled)",
        "results": rows,
    }
    json_path.write_text(json.dumps(meta, indent=2))
    written: dict[str, Path | str] = {"csv": csv_path, "json": json_path}
    try:
        written["png"] = plot(cfg, results, out / "compare.png")
    except ImportError:
        written["png"] = "matplotlib is not installed: no chart (pip install 'yirage-dynamo[plot]')"
    return written


def plot(cfg: CompareConfig, results: list[BackendResult], path: Path) -> Path:
    """Bar chart of cold time, p50 latency and tok/s; PLOT_SIZE_IN * PLOT_DPI pixels."""
    # Figure without pyplot: no global backend switch, works headless.
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    ok = [r for r in results if r.error is None]
    names = [r.backend for r in ok]
    colors = [
        "#888888" if n == "eager" else "#4c72b0" if n == "inductor" else "#dd8452" for n in names
    ]
    panels = [("cold_s", "cold s (incl. compile)"), ("p50_ms", "p50 ms"), ("tok_s", "tok/s")]
    axes = fig.subplots(1, len(panels))
    for ax, (key, title) in zip(axes, panels):
        values = [getattr(r, key) or 0.0 for r in ok]
        ax.bar(names, values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.15)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"{cfg.model} {cfg.size} {cfg.dtype} {cfg.device} {cfg.task}", fontsize=10)
    fig.subplots_adjust(top=0.8, bottom=0.12, wspace=0.35)
    fig.savefig(path, dpi=PLOT_DPI)
    return path
