"""YIRAGE_DEBUG dumps: graphs after each pass, generated wrappers and kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def debug_dir(ctx: Any) -> Path:
    path = Path(ctx.options.debug_dir) / f"graph_{ctx.report.graph_id}_{ctx.report.kind}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def dump_text(ctx: Any, name: str, text: str) -> Path:
    path = debug_dir(ctx) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def dump_graph(ctx: Any, gm: Any, stem: str) -> Path:
    return dump_text(ctx, f"{stem}.txt", gm.print_readable(print_output=False))
