"""yirage_dynamo: a torch.compile backend for LLM inference across hardware.

Installed, it registers `backend="yirage"` through the `torch_dynamo_backends` entry
point, so `torch.compile(model, backend="yirage")` works without importing this package.
Importing it changes no global state.
"""

from __future__ import annotations

from pathlib import Path as _Path

# A source checkout keeps passes/, lowering/ and runtime/ beside this folder; the package-dir
# mapping installs them as yirage_dynamo.*. Editable installs whose finder sits behind the
# plain path finder (e.g. running from the checkout root) still resolve them through this.
if (_Path(__file__).resolve().parent.parent / "passes" / "__init__.py").exists():
    __path__.append(str(_Path(__file__).resolve().parent.parent))  # noqa: F821

from .options import Options, parse_options  # noqa: E402
from .report import CompileReport, clear_reports, last_report, reports

__version__ = "0.1.0"


def __getattr__(name: str):
    # The backend pulls in torch._dynamo; load it only when asked for.
    if name == "yirage":
        from .backend import yirage

        return yirage
    if name == "explain":
        from .profiling import explain

        return explain
    raise AttributeError(name)


__all__ = [
    "CompileReport",
    "Options",
    "clear_reports",
    "explain",
    "last_report",
    "parse_options",
    "reports",
    "yirage",
]
