"""What a pass may read besides the graph: options, the report, the lowering's capabilities."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.fx import GraphModule, Node
from yirage_dynamo.lowering.base import Capabilities

from yirage_dynamo.options import Options
from yirage_dynamo.report import CompileReport


@dataclasses.dataclass
class PassContext:
    options: Options
    report: CompileReport
    capabilities: Capabilities
    # AOTAutograd's example inputs (fake tensors / SymInts), one per placeholder.
    example_inputs: list[Any]
    # Real tensors behind the placeholders (parameters), where known; used by freezing.
    real_inputs: list[Any] | None = None
    inference: bool = True
    # Placeholder indices that the graph mutates (kept in-graph as copy_ nodes).
    mutated_inputs: frozenset[int] = frozenset()
    # Anything a later stage wants from an earlier pass (e.g. the memory plan).
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def fake_mode(self):
        return torch._guards.detect_fake_mode(self.example_inputs)


def node_val(node: Any) -> Any:
    """The example value FX meta carries for a node (or the literal itself)."""
    return node.meta.get("val") if isinstance(node, Node) else node


def set_fake_val(gm: GraphModule, node: Node) -> None:
    """Compute meta["val"] for a node a pass created, by running it on fake inputs."""
    fake_mode = None
    for inp in node.all_input_nodes:
        fake_mode = torch._guards.detect_fake_mode([inp.meta.get("val")])
        if fake_mode is not None:
            break
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), node_val)
    if node.op == "get_attr":
        node.meta["val"] = getattr(gm, node.target)
        return
    if fake_mode is None:
        fake_mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        fake_mode.allow_non_fake_inputs = True
        node.meta["val"] = node.target(*args, **kwargs)


def is_op(node: Any, *targets: Any) -> bool:
    """True if node calls one of `targets` (OpOverload or OpOverloadPacket)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    return any(t is x or packet is x for x in targets)


def count_nodes(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
