"""CUDA lowering: the post-pass graph goes to Inductor's Triton code generation.

Not wired up yet: reports itself unavailable, so CUDA graphs run through the ATen
lowering (extern calls on the GPU).
"""

from __future__ import annotations

from .base import Capabilities, Lowering


class TritonLowering(Lowering):
    name = "triton"
    capabilities = Capabilities(device_type="cuda", generates_kernels=True, cuda_graphs=True)

    def available(self) -> str | None:
        return "Inductor-Triton lowering is not implemented yet"
