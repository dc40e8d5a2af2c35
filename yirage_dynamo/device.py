"""Which device a graph runs on, and why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .options import Options

_PREFERENCE = ("cuda", "mps", "neuron", "xla", "cpu")


def graph_devices(example_inputs: Sequence[Any]) -> set[str]:
    return {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}


def select_device(example_inputs: Sequence[Any], options: Options) -> tuple[str, str]:
    """(device type, reason). Raises ValueError when the request contradicts the inputs."""
    found = graph_devices(example_inputs)
    if options.device != "auto":
        accel = found - {"cpu", "meta"}
        if accel and options.device not in accel:
            raise ValueError(
                f"yirage option 'device'={options.device!r} but the graph's tensors are on "
                f"{sorted(found)}"
            )
        if options.device != "cpu" and not accel and found:
            raise ValueError(
                f"yirage option 'device'={options.device!r} but the graph's tensors are on "
                f"{sorted(found)}; move the model first"
            )
        return options.device, "requested by options"
    if not found:
        return "cpu", "no tensor inputs; defaulting to cpu"
    for dev in _PREFERENCE:
        if dev in found:
            if len(found) > 1:
                return dev, f"tensors on {sorted(found)}; {dev} holds the work"
            return dev, f"all tensor inputs on {dev}"
    dev = sorted(found)[0]
    return dev, f"tensors on {dev}"


def available_devices() -> list[str]:
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devs.append("mps")
    return devs
