"""Reductions of the C-like renderer: one accumulation loop per reduction, per row.

    acc = init
    for r in inner: acc = combine(acc, gen(reduction.input, (row, r)))
    result = finish(acc)            # a per-row scalar, hoisted out of later loops

Sums accumulate in double (int64 for integers); mean divides by the reduced count; var is
two-pass (mean, then the sum of centred squares: as exact as Welford and vectorisable);
amax/amin propagate NaN like ATen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from .c_ops import Unsupported, _ctype_of, _norm_dims, _Scope, _val, op_key


class ReductionMixin:
    """Methods of CRenderer that render reductions (state lives on the renderer)."""

    # -- reductions ----------------------------------------------------------------------
    def reduced_value(self, node: Node, idx: tuple[str, ...]) -> tuple[str, str, int]:
        """A reduction result is a per-row scalar: valid only at the current row."""
        expect = self.reduced_index(node)
        if tuple(idx) != expect:
            raise Unsupported("reduction result used at another row")
        return self.reduced[node], _ctype_of(_val(node).dtype, self.lang), 0

    def reduced_index(self, node: Node) -> tuple[str, ...]:
        keepdim = self.red_keepdim(node)
        res = []
        for d in range(len(self.full_shape)):
            if d in self.red_dims:
                if keepdim:
                    res.append("0")
            else:
                res.append(self.dom[d])
        return tuple(res)

    def red_keepdim(self, node: Node) -> bool:
        return len(_val(node).shape) == len(self.full_shape) and len(self.full_shape) > 0

    def red_spec(self, node: Node) -> tuple[Any, tuple[int, ...]]:
        key = op_key(node.target)
        src = _val(node.args[0]).shape
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if key in ("var",) and len(node.args) == 1:
            dims = node.kwargs.get("dim")
        return src, _norm_dims(dims, len(src))

    def render_reduction(self, node: Node) -> None:
        key = op_key(node.target)
        val = _val(node)
        body_scope = _Scope()
        self.scopes[1] = body_scope
        self.memo = {k: v for k, v in self.memo.items() if v[2] == 0}
        x = self.gen(node.args[0], self.dom)
        acc = self.tmp()
        lines = self.scopes[0].lines
        count = f"((double)({self.n_inner}))"
        if key in ("sum", "mean", "prims.sum", "var", "prims.var"):
            is_float = val.dtype.is_floating_point
            acc_t = self.lang.acc_t if is_float else self.lang.int_t
            xs = f"(({acc_t}){x[0]})"
            if key in ("var", "prims.var"):
                mean = self.tmp()
                lines.append(f"{acc_t} {acc} = 0;")
                lines.extend(self.loop(body_scope.lines, f"{acc} += {xs};", acc))
                lines.append(f"const double {mean} = {acc} / {count};")
                acc2 = self.tmp()
                corr = node.kwargs.get("correction", node.args[2] if len(node.args) > 2 else 1)
                if key == "var" and node.kwargs.get("unbiased") is False:
                    corr = 0
                corr = 1 if corr is None else corr
                lines.append(f"double {acc2} = 0;")
                body = f"{{ const double d_ = {xs} - {mean}; {acc2} += d_ * d_; }}"
                lines.extend(self.loop(body_scope.lines, body, acc2))
                result = f"(float)({acc2} / std::max(0.0, {count} - {float(corr)!r}))"
            else:
                lines.append(f"{acc_t} {acc} = 0;")
                lines.extend(self.loop(body_scope.lines, f"{acc} += {xs};", acc))
                result = f"({acc} / {count})" if key == "mean" else acc
            ctype = _ctype_of(val.dtype, self.lang)
            result = f"(({ctype})({result}))"
        else:  # amax / amin: NaN propagates like ATen
            ctype = x[1]
            better = ">" if key in ("amax", "prims.amax") else "<"
            init = "-" if better == ">" else ""
            if ctype == self.lang.float_t:
                lines.append(f"{ctype} {acc} = {init}INFINITY;")
            else:
                limit = "lowest" if better == ">" else "max"
                lines.append(f"{ctype} {acc} = std::numeric_limits<{ctype}>::{limit}();")
            # A NaN enters through the negated compare and then sticks (acc != acc).
            cmp = "<=" if better == ">" else ">="
            body = f"if (!({x[0]} {cmp} {acc}) && {acc} == {acc}) {acc} = {x[0]};"
            lines.extend(self.loop(body_scope.lines, body, None))
            result = acc
        if val.dtype in (torch.bfloat16, torch.float16):
            fn = "y_round_bf16" if val.dtype == torch.bfloat16 else "y_round_f16"
            result = f"{fn}({result})"
        name = self.tmp()
        lines.append(f"const {ctype} {name} = {result};")
        self.reduced[node] = name

    def loop(self, body: list[str], last: str, acc: str | None) -> list[str]:
        if not self.inner_vars:
            return ["{"] + ["  " + b for b in body] + [f"  {last}", "}"]
        pragma = self.lang.simd_reduce.format(acc=acc) if acc else ""
        out = [pragma] if pragma else []
        out.append(f"for (int64_t r = 0; r < {self.n_inner}; ++r) {{")
        out += ["  " + d for d in self.inner_decls]
        out += ["  " + b for b in body]
        out.append(f"  {last}")
        out.append("}")
        return out
