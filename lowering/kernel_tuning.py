"""Kernel-config search for the yirage Triton kernels, cached on disk.

A kernel's launch parameters (block sizes, warps, flash-decoding split) are measured once per
(kernel, shape bucket, GPU name) and stored as JSON in the cache dir (Options.cache_path):

    {"version": 1, "configs": {"NVIDIA H100 80GB HBM3|decode_attention|b1.hq32...": {...}}}

The search measures a handful of candidates (a few ms each with CUDA events), so a cold
search takes well under a second per kernel shape; a warm cache costs a dict lookup.
The search itself is device-agnostic: it takes a `bench(config) -> ms` callable, which is
what the CPU tests exercise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("yirage_dynamo")

_VERSION = 1
_FILE = "triton_configs.json"
_lock = threading.Lock()


def bucket(n: int) -> int:
    """Round a size up to a power of two: nearby sizes share one measured config."""
    return 1 if n <= 1 else 1 << math.ceil(math.log2(n))


def shape_key(kernel: str, gpu: str, **dims: Any) -> str:
    parts = ".".join(f"{k}{v}" for k, v in sorted(dims.items()))
    return f"{gpu}|{kernel}|{parts}"


class ConfigCache:
    """JSON-backed map from shape key to the best measured config."""

    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory) / _FILE
        self._data: dict[str, dict[str, Any]] | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._data is None:
            try:
                raw = json.loads(self.path.read_text())
                ok = isinstance(raw, dict) and raw.get("version") == _VERSION
                self._data = dict(raw.get("configs", {})) if ok else {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def get(self, key: str) -> dict[str, Any] | None:
        return self._load().get(key)

    def put(self, key: str, config: Mapping[str, Any]) -> None:
        with _lock:
            data = self._load()
            data[key] = dict(config)
            # Merge with what other processes wrote since we read, then replace atomically.
            try:
                raw = json.loads(self.path.read_text())
                if isinstance(raw, dict) and raw.get("version") == _VERSION:
                    data = {**raw.get("configs", {}), **data}
            except (OSError, ValueError):
                pass
            self._data = data
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": _VERSION, "configs": data}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as exc:  # a read-only cache dir only costs a re-search next time
                log.warning("yirage: could not write kernel config cache %s: %s", self.path, exc)


def search(
    cache: ConfigCache,
    key: str,
    candidates: Iterable[Mapping[str, Any]],
    bench: Callable[[Mapping[str, Any]], float],
    stats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The fastest candidate for `key` (cached), measuring each with `bench` on a miss.

    A candidate whose bench raises (e.g. too many resources for the GPU) is skipped; if
    all fail, the first candidate is returned uncached so that the caller still runs.
    """
    hit = cache.get(key)
    if hit is not None:
        if stats is not None:
            stats["hits"] = stats.get("hits", 0) + 1
        return strip(hit)
    if stats is not None:
        stats["misses"] = stats.get("misses", 0) + 1
    cands = [dict(c) for c in candidates]
    if not cands:
        raise ValueError(f"no candidate configs for {key}")
    best, best_ms = None, math.inf
    for cand in cands:
        try:
            ms = bench(cand)
        except Exception as exc:  # noqa: BLE001 - an invalid config is just not chosen
            log.debug("yirage: config %s for %s failed: %s", cand, key, exc)
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is None:
        return cands[0]
    cache.put(key, {**best, "ms": round(best_ms, 5)})
    return best


def strip(config: Mapping[str, Any]) -> dict[str, Any]:
    """A cached config without its bookkeeping fields."""
    return {k: v for k, v in config.items() if k != "ms"}
