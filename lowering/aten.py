"""ATen lowering: every node runs as an extern ATen call from the generated wrapper.

Works on any device PyTorch supports; it is the lowering for nodes (and devices) no
generated kernel covers, and the last step of every device's chain before Inductor/eager.
"""

from __future__ import annotations

from .base import Capabilities, Lowering


class AtenLowering(Lowering):
    def __init__(self, device_type: str = "cpu") -> None:
        self.name = "aten"
        self.capabilities = Capabilities(device_type=device_type)
