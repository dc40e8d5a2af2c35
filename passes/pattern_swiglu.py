"""Gated MLP activation (SwiGLU / GeGLU) -> yirage::gated_act.

Matches (HF LlamaMLP `act_fn(gate_proj(x)) * up_proj(x)`, Phi-3 `up * act(gate)` after
`chunk`, Gemma `gelu_pytorch_tanh`; either operand order):

    a   = silu(gate)                         # or, core-ATen decomposed: mul(gate, sigmoid(gate))
                                             # or Inductor's: div(gate, add(exp(neg(gate)), 1))
        | gelu(gate, approximate="tanh")     # or exact gelu(gate)
    out = mul(a, up)

Rewrite:
    out = yirage.gated_act(gate, up, act)    # act in {"silu", "gelu_tanh", "gelu"}

Rejected (reported): gate and up of different shapes (a broadcasting mul is not an MLP
gate), an activation read elsewhere (it would be computed twice).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .context import PassContext
from .pattern_utils import (
    ensure_ops,
    insert_call,
    lazy_patterns,
    match,
    note_reference,
    refresh_layout,
    replace_and_erase,
    val,
)

aten = torch.ops.aten
NAME = "gated_act"


@lazy_patterns
def _patterns() -> list[tuple[object, str]]:
    from torch._inductor.pattern_matcher import CallFunction, KeywordArg

    g, up = KeywordArg("gate"), KeywordArg("up")
    acts = [
        (CallFunction(aten.silu.default, g), "silu"),
        (CallFunction(aten.mul.Tensor, g, CallFunction(aten.sigmoid.default, g)), "silu"),
        (CallFunction(aten.mul.Tensor, CallFunction(aten.sigmoid.default, g), g), "silu"),
        # Inductor's decomposition: gate / (1 + exp(-gate)).
        (
            CallFunction(
                aten.div.Tensor,
                g,
                CallFunction(
                    aten.add.Tensor,
                    CallFunction(aten.exp.default, CallFunction(aten.neg.default, g)),
                    1,
                ),
            ),
            "silu",
        ),
        (CallFunction(aten.gelu.default, g, approximate="tanh"), "gelu_tanh"),
        (CallFunction(aten.gelu.default, g), "gelu"),
        (CallFunction(aten.gelu.default, g, approximate="none"), "gelu"),
    ]
    out = []
    for act, name in acts:
        out.append((CallFunction(aten.mul.Tensor, act, up), name))
        out.append((CallFunction(aten.mul.Tensor, up, act), name))
    return out


def extra_check(m) -> str | None:
    """Why act(gate) * up is not a gated-MLP activation to fuse, or None."""
    gate, up = m.kwargs["gate"], m.kwargs["up"]
    if not isinstance(up, Node) or not isinstance(gate, Node):
        return "gate or up is not a tensor"
    gv, uv = val(gate), val(up)
    if gv.shape != uv.shape or gv.dtype != uv.dtype:
        return "gate/up shapes or dtypes differ"
    return None


def fuse_gated_act(gm: GraphModule, ctx: PassContext) -> int:
    ensure_ops()
    count = 0
    for node in reversed(list(gm.graph.nodes)):
        if node._erased or node.target is not aten.mul.Tensor:
            continue
        for pattern, act in _patterns():
            m = match(pattern, node)
            if m is None:
                continue
            why = extra_check(m)
            if why is not None:
                ctx.report.reject(NAME, f"{node.name}: {why}")
                break
            gate, up = m.kwargs["gate"], m.kwargs["up"]
            fused = insert_call(gm, node, torch.ops.yirage.gated_act.default, (gate, up, act))
            replace_and_erase(node, fused, m.nodes)
            refresh_layout(gm, [fused])
            count += 1
            break
    if count:
        ctx.report.count_pattern(NAME, count)
        note_reference(ctx, "gated_act")
    return count
