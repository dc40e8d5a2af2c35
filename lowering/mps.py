"""Metal (MPS) lowering — not implemented yet.

Planned to share the C-style renderer with the CPU C++ lowering and compile Metal
shaders with `torch.mps.compile_shader`. Until then `available()` says so, and graphs on
MPS devices run through the ATen lowering (extern calls on the MPS device).
"""

from __future__ import annotations

from .base import Capabilities, Lowering


class MetalLowering(Lowering):
    name = "metal"
    capabilities = Capabilities(device_type="mps", generates_kernels=True)

    def available(self) -> str | None:
        return "Metal kernel generation is not implemented yet"
