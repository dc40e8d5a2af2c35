"""Gated MLP activation (SwiGLU / GeGLU) -> yirage::gated_act.

Matches (HF LlamaMLP `act_fn(gate_proj(x)) * up_proj(x)`, Phi-3 `up * act(gate)` after
`chunk`, Gemma `gelu_pytorch_tanh`; either operand order):

    a   = silu(gate)                         # or, core-ATen decomposed: mul(gate, sigmoid(gate))
                                             # or Inductor's: div(gate, add(exp(neg(gate)), 1))
                                             # (bf16: cast(act(cast(gate, f32)), bf16))
        | gelu tanh spelled out: mul(mul(gate, 0.5), add(tanh(mul(add(gate, 0.044715 gate^3), c)), 1))
        | gelu(gate, approximate="tanh")     # or exact gelu(gate)
    out = mul(a, up)

Rewrite:
    out = yirage.gated_act(gate, up, act)    # act in {"silu", "gelu_tanh", "gelu"}

Rejected (reported): gate and up of different shapes (a broadcasting mul is not an MLP
gate), an activation read elsewhere (it would be computed twice).
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from .context import PassContext
from .pattern_utils import (
    ensure_ops,
    first_match,
    insert_call,
    lazy_patterns,
    note_reference,
    refresh_layout,
    replace_and_erase,
    val,
)

aten = torch.ops.aten
NAME = "gated_act"


def _acts(g) -> list[tuple[object, str]]:
    """Activation patterns applied to the gate pattern `g`."""
    from .pattern_expr import CallFunction, KeywordArg

    def cf(op, *args, **kwargs):
        return CallFunction(op, *args, **kwargs)

    cube = cf(aten.mul.Tensor, cf(aten.mul.Tensor, g, g), g)
    inner = cf(aten.add.Tensor, g, cf(aten.mul.Tensor, cube, KeywordArg("kappa")))
    tanh = cf(aten.tanh.default, cf(aten.mul.Tensor, inner, KeywordArg("beta")))
    return [
        (cf(aten.silu.default, g), "silu"),
        (cf(aten.mul.Tensor, g, cf(aten.sigmoid.default, g)), "silu"),
        (cf(aten.mul.Tensor, cf(aten.sigmoid.default, g), g), "silu"),
        # Inductor's decomposition: gate / (1 + exp(-gate)).
        (
            cf(
                aten.div.Tensor,
                g,
                cf(aten.add.Tensor, cf(aten.exp.default, cf(aten.neg.default, g)), 1),
            ),
            "silu",
        ),
        (cf(aten.gelu.default, g, approximate="tanh"), "gelu_tanh"),
        (cf(aten.gelu.default, g), "gelu"),
        (cf(aten.gelu.default, g, approximate="none"), "gelu"),
        # Inductor's gelu(tanh): 0.5 * g * (1 + tanh(beta * (g + kappa * g^3))).
        (
            cf(
                aten.mul.Tensor,
                cf(aten.mul.Tensor, g, KeywordArg("half")),
                cf(aten.add.Tensor, tanh, 1),
            ),
            "gelu_tanh",
        ),
    ]


@lazy_patterns
def _patterns() -> list[tuple[object, str]]:
    from .pattern_expr import MULTIPLE, CallFunction, KeywordArg

    gate, up = KeywordArg("gate"), KeywordArg("up")
    prims = torch.ops.prims
    f32 = torch.float32
    variants = list(_acts(gate))
    # Reduced-precision graphs decomposed by Inductor compute the activation in fp32:
    # cast(act(cast(gate, f32)), dtype) — the same rounding as the fused op's one cast.
    casts = [
        (
            # The upcast gate feeds several nodes of the activation: any user count.
            lambda p: CallFunction(prims.convert_element_type.default, p, f32, _users=MULTIPLE),
            lambda p: CallFunction(prims.convert_element_type.default, p, KeywordArg("dtype")),
        ),
        (
            lambda p: CallFunction(aten._to_copy.default, p, dtype=f32, _users=MULTIPLE),
            lambda p: CallFunction(aten._to_copy.default, p, dtype=KeywordArg("dtype")),
        ),
    ]
    for up_cast, down_cast in casts:
        variants += [(down_cast(act), name) for act, name in _acts(up_cast(gate))]
    out = []
    for act, name in variants:
        out.append((CallFunction(aten.mul.Tensor, act, up), name))
        out.append((CallFunction(aten.mul.Tensor, up, act), name))
    return out


_GELU_CONSTANTS = {"half": 0.5, "kappa": 0.044715, "beta": (2 / math.pi) ** 0.5}


def extra_check(m) -> str | None:
    """Why act(gate) * up is not a gated-MLP activation to fuse, or None."""
    gate, up = m.kwargs["gate"], m.kwargs["up"]
    if not isinstance(up, Node) or not isinstance(gate, Node):
        return "gate or up is not a tensor"
    gv, uv = val(gate), val(up)
    if gv.shape != uv.shape or gv.dtype != uv.dtype:
        return "gate/up shapes or dtypes differ"
    if "dtype" in m.kwargs and m.kwargs["dtype"] != gv.dtype:
        return "activation cast to a dtype other than the gate's"
    for key, want in _GELU_CONSTANTS.items():
        if key in m.kwargs and not (
            isinstance(m.kwargs[key], float) and abs(m.kwargs[key] - want) < 1e-6
        ):
            return f"gelu-tanh constant {key}={m.kwargs[key]!r}, expected {want:.6g}"
    return None


def fuse_gated_act(gm: GraphModule, ctx: PassContext) -> int:
    ensure_ops()
    count = 0
    for node in reversed(list(gm.graph.nodes)):
        if node._erased or node.target is not aten.mul.Tensor:
            continue
        found = first_match(node, _patterns(), extra_check, ctx, NAME)
        if found is None:
            continue
        m, act = found
        gate, up = m.kwargs["gate"], m.kwargs["up"]
        fused = insert_call(gm, node, torch.ops.yirage.gated_act.default, (gate, up, act))
        replace_and_erase(node, fused, m.nodes)
        refresh_layout(gm, [fused])
        count += 1
    if count:
        ctx.report.count_pattern(NAME, count)
        note_reference(ctx, "gated_act")
    return count
