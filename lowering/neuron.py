"""AWS Neuron (NKI) lowering — not implemented yet.

Planned to share the Python-DSL renderer with the Triton lowering. Until then
`available()` says so and the ATen lowering runs the graph.
"""

from __future__ import annotations

from .base import Capabilities, Lowering


class NkiLowering(Lowering):
    name = "nki"
    capabilities = Capabilities(device_type="neuron", generates_kernels=True)

    def available(self) -> str | None:
        return "NKI kernel generation is not implemented yet"
