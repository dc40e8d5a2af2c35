"""CPU lowering: C++/OpenMP kernels for fused regions, ATen (oneDNN/MKL) for GEMMs.

Kernel generation lands with the CPU code-generation work; until then this lowering
reports itself unavailable and the ATen lowering runs CPU graphs.
"""

from __future__ import annotations

from .base import Capabilities, Lowering


class CppLowering(Lowering):
    name = "cpp"
    capabilities = Capabilities(device_type="cpu", generates_kernels=True)

    def available(self) -> str | None:
        return "C++ kernel generation is not implemented yet"
