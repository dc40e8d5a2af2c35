"""Device lowerings and the choice between them.

Each device names its preferred lowering; when that lowering is not available here
(missing toolchain, not implemented) the ATen lowering runs the graph on the same device.
"""

from __future__ import annotations

from .aten import AtenLowering
from .base import Capabilities, KernelSource, Lowering


def _preferred(device_type: str) -> Lowering:
    if device_type == "cpu":
        from .cpu import CppLowering

        return CppLowering()
    if device_type == "cuda":
        from .cuda import TritonLowering

        return TritonLowering()
    if device_type == "mps":
        from .mps import MetalLowering

        return MetalLowering()
    if device_type == "neuron":
        from .neuron import NkiLowering

        return NkiLowering()
    return AtenLowering(device_type)


def choose_lowering(device_type: str) -> tuple[Lowering, str]:
    """The lowering to use for a device, and why."""
    preferred = _preferred(device_type)
    why_not = preferred.available()
    if why_not is None:
        return preferred, f"{preferred.name} lowering for {device_type}"
    return AtenLowering(device_type), f"{preferred.name} unavailable ({why_not}); ATen lowering"


__all__ = ["AtenLowering", "Capabilities", "KernelSource", "Lowering", "choose_lowering"]
