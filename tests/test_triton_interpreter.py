"""Our Triton kernels against the ATen references in Triton's interpreter, on the CPU
(tests/triton_interpreter_checks.py, in a process of its own: the interpreter is chosen
when Triton is imported). Runs wherever Triton is installed, a GPU or not; skipped where it
is not (the CPU CI installs no Triton)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_triton_package = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)


@needs_triton_package
def test_triton_kernels_match_the_references_in_tritons_interpreter():
    script = Path(__file__).with_name("triton_interpreter_checks.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "interpreter checks passed" in run.stderr
