"""Programmatic dependent launch (PDL) on Hopper: the switch (an experiment, off by default).

A decode step is ~355 small dependent kernels; each one ramps up and drains on its own.
With PDL a kernel may launch while its predecessor is still running: it does the work
that does not depend on the predecessor first, then waits (`griddepcontrol.wait`) for the
predecessor's results. Who takes part, by YIRAGE_CUDA_PDL:

  off   nobody (default)
  gemv  our decode GEMVs launch with PDL and stream their first weight tile before they
        wait (lowering/triton_gemv.py); decode attention lets them launch early
  all   also Inductor's own kernels (`triton.enable_pdl`: each waits for its predecessor's
        results, then lets its successor launch), e.g. the RMSNorms before q/k/v and gate/up;
        so with cuda_codegen="auto" the graph goes through Inductor's codegen (lowering/cuda.py)

Below compute capability 9 (no griddepcontrol) the switch is off.
"""

from __future__ import annotations

import os

import torch

PDL_ENV = "YIRAGE_CUDA_PDL"
_PDL_MODES = ("off", "gemv", "all")


def pdl_mode() -> str:
    """YIRAGE_CUDA_PDL as one of "off", "gemv", "all" ("on" is "all"); an unknown value
    raises ValueError naming the variable and its values."""
    env = os.environ.get(PDL_ENV, "").strip().lower() or "off"
    if env in ("on", "1"):
        env = "all"
    if env in ("0", "none"):
        env = "off"
    if env not in _PDL_MODES:
        raise ValueError(f"{PDL_ENV}={env!r}: expected one of {', '.join(_PDL_MODES)}")
    if env == "off" or not torch.cuda.is_available():
        return "off"
    return env if torch.cuda.get_device_capability()[0] >= 9 else "off"
