"""C-style renderer for fused regions: one loop-nest function per region.

A region (a small GraphModule made by passes/fusion.py) is rendered by *inlining*: the
value of every output element is generated as an expression of loads from the region's
inputs, walking the FX nodes backwards with an index per dimension:

    gen(add(a, b), (i0, i1))        -> gen(a, bcast(i0, i1)) + gen(b, bcast(i0, i1))
    gen(transpose(x, 0, 1), (i, j)) -> gen(x, (j, i))
    gen(placeholder x, (i, j))      -> load(x[i * 64 + j])      (strides from the fake values)

Views therefore cost nothing (they only change index expressions), and non-contiguous,
transposed and broadcast inputs need no copies. Strides are compile-time expressions of
the size symbols; the launcher checks them (cheaply) before each call.

Loop structure (the domain is the reduction input shape, or the output shape):

    parallel for xo in outer rows:          # dims that are not reduced (pointwise: all but last)
        acc_k = reduce over r in inner: gen(reduction_k.input, (xo, r))   # one loop per reduction
        for r in inner: out_j[...] = gen(out_j, (xo, r))                  # full-size outputs
        out_m[...] = gen(out_m, xo)                                       # reduced outputs

Values that depend only on the row (reduction results and what is computed from them) are
hoisted out of the inner loops. Floating point computes in float (bf16/fp16 are converted
on load/store; an explicit cast to bf16/fp16 rounds), sums accumulate in double, variance is
two-pass (mean, then centred squares), amax/amin propagate NaN like ATen.

The op table (`POINTWISE`) and the language hooks (`CLanguage`) are plain data so that a
Metal renderer can reuse the generator with different type names, pragmas and signature.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import sympy
import torch
from torch.fx import GraphModule, Node
from torch.utils._sympy.printers import CppPrinter, PythonPrinter

from .c_ops import (
    _COMPARE,
    _LOGICAL,
    _VIEWS,
    POINTWISE,
    REDUCTIONS,
    RENDERABLE,
    CLanguage,
    KernelParam,
    RenderedKernel,
    Unsupported,
    _ctype_of,
    _Scope,
    _val,
    op_key,
)
from .c_reductions import ReductionMixin
from .c_sizes import SizeMixin
from .c_views import ViewMixin
from .cpp_lang import CPP, CPP_PRELUDE

__all__ = [
    "CPP",
    "CPP_PRELUDE",
    "RENDERABLE",
    "CLanguage",
    "CRenderer",
    "KernelParam",
    "RenderedKernel",
    "Signature",
    "Unsupported",
    "op_key",
]


@dataclasses.dataclass
class Signature:
    """The C parameters of a hand-written kernel (attention, KV write), built in order:
    its input tensors, its outputs, then the size symbols it reads."""

    renderer: CRenderer
    sig: list[str] = dataclasses.field(default_factory=list)
    c_types: list[str] = dataclasses.field(default_factory=list)
    params: list[KernelParam] = dataclasses.field(default_factory=list)
    stride_checks: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)
    contiguous: list[int] = dataclasses.field(default_factory=list)

    def tensor(self, i: int, v: torch.Tensor, ctype: str, restrict: bool = True) -> None:
        """Input p{i}: a `ctype` pointer, with its layout checks at run time."""
        self.sig.append(f"{ctype} __restrict__ p{i}" if restrict else f"{ctype} p{i}")
        self.c_types.append(ctype)
        self.params.append(KernelParam("tensor", i))
        self.renderer.note_layout(i, v, self.stride_checks, self.contiguous)

    def output(self, j: int, ctype: str) -> None:
        self.sig.append(f"{ctype} __restrict__ o{j}")
        self.c_types.append(ctype)
        self.params.append(KernelParam("out", j))

    def kernel(
        self,
        body: str,
        nodes: list[Node],
        outputs: list[tuple[str, str, torch.dtype]],
        symbol_sources: dict[str, str],
        **extra: Any,
    ) -> RenderedKernel:
        """The RenderedKernel of a one-region kernel with this signature (`nodes`: the
        region's graph nodes; `extra`: guards, returns_status)."""
        return RenderedKernel(
            body=body,
            params=self.params,
            outputs=outputs,
            symbol_sources=symbol_sources,
            n_placeholders=sum(1 for n in nodes if n.op == "placeholder"),
            multi_output=False,
            origins=[f"{n.name}: {n.target}" for n in nodes if n.op == "call_function"],
            stride_checks=self.stride_checks,
            c_types=self.c_types,
            contiguous_inputs=self.contiguous,
            **extra,
        )

    def symbols(self, placeholders: list[Node]) -> dict[str, str]:
        """Appends the size symbols as int64 parameters; returns where each is read."""
        sources = self.renderer.find_symbols(placeholders)
        for c_param, param in self.renderer.symbol_params():
            self.sig.append(c_param)
            self.c_types.append("int64_t")
            self.params.append(param)
        return sources


class CRenderer(SizeMixin, ReductionMixin, ViewMixin):
    """Renders one region GraphModule as one C-like function (see module docstring)."""

    def __init__(self, lang: CLanguage = CPP) -> None:
        self.lang = lang
        self.symbols: set[str] = set()
        # Derived sizes (c_sizes.SizeMixin.bind_derived_sizes): symbol -> its replacement,
        # derived symbol -> where the launcher reads it.
        self.subst: dict[sympy.Symbol, sympy.Expr] = {}
        self.derived: dict[str, str] = {}
        self._cpp = CppPrinter()
        self._py = PythonPrinter()

    # -- statements ----------------------------------------------------------------------
    def tmp(self) -> str:
        self._ntmp += 1
        return f"t{self._ntmp}"

    def emit(self, ctype: str, expr: str, level: int) -> tuple[str, str, int]:
        name = self.tmp()
        scope = self.branch if self.branch is not None else self.scopes[level]
        scope.lines.append(f"const {ctype} {name} = {expr};")
        return name, ctype, level

    def level_of(self, idx: tuple[str, ...]) -> int:
        text = " ".join(idx)
        return 1 if self.inner_vars and re.search(self.inner_re, text) else 0

    # -- values --------------------------------------------------------------------------
    def cast(self, v: tuple[str, str, int], ctype: str) -> str:
        return v[0] if v[1] == ctype else f"(({ctype})({v[0]}))"

    def literal(self, x: Any, ctype: str | None = None) -> tuple[str, str, int]:
        if isinstance(x, bool):
            return ("true" if x else "false"), self.lang.bool_t, 0
        if isinstance(x, int):
            return f"((int64_t){x}LL)", self.lang.int_t, 0
        if isinstance(x, float):
            if math.isnan(x):
                text = "NAN"
            elif math.isinf(x):
                text = "INFINITY" if x > 0 else "(-INFINITY)"
            else:
                text = repr(x)
                text += "" if ("e" in text or "." in text) else ".0"
                text += "f"
            return text, self.lang.float_t, 0
        if isinstance(x, torch.SymInt | torch.SymFloat):
            raise Unsupported("symbolic scalar operand")
        raise Unsupported(f"literal {type(x).__name__}")

    def operand(self, a: Any, node: Node, idx: tuple[str, ...]) -> tuple[str, str, int]:
        if not isinstance(a, Node):
            return self.literal(a)
        v = _val(a)
        if isinstance(v, torch.Tensor):
            return self.gen(a, self.bcast(idx, _val(node).shape, v.shape))
        return self.gen(a, ())

    def gen(self, node: Node, idx: tuple[str, ...]) -> tuple[str, str, int]:
        """(C expression, C type, level) of element `idx` of node's value."""
        shape = getattr(_val(node), "shape", ())
        # Canonical form: a size-1 dim is always indexed by 0 (so equal indices compare equal).
        idx = tuple("0" if self.is_one(s) else i for i, s in zip(idx, shape))
        key = (node, idx)
        memo = self.memo
        if key in memo:
            return memo[key]
        res = self._gen(node, tuple(idx))
        memo[key] = res
        return res

    def _gen(self, node: Node, idx: tuple[str, ...]) -> tuple[str, str, int]:
        if node.op == "placeholder":
            return self.load(node, idx)
        if node in self.reduced:
            return self.reduced_value(node, idx)
        if node.op != "call_function":
            raise Unsupported(f"{node.op} node")
        if node.target is __import__("operator").getitem:
            return self.gen_getitem(node, idx)
        key = op_key(node.target)
        val = _val(node)
        if not isinstance(val, torch.Tensor):
            raise Unsupported(f"{node.target} returns no tensor")
        if key in _VIEWS:
            return self.gen(node.args[0], self.view_index(node, key, idx))
        ctype = _ctype_of(val.dtype, self.lang)
        if key in POINTWISE and key not in ("div",):
            return self.gen_pointwise(node, key, idx, ctype)
        return self.gen_special(node, key, idx, ctype)

    def load(self, node: Node, idx: tuple[str, ...]) -> tuple[str, str, int]:
        i = self.placeholder_index[node]
        v = _val(node)
        if not isinstance(v, torch.Tensor):
            if isinstance(v, torch.SymFloat | float):
                return f"p{i}", self.lang.float_t, 0
            return f"p{i}", self.lang.int_t, 0
        # Strides are the ones fake-tensor propagation predicts (compile-time constants or
        # size-symbol expressions); the launcher checks them and runs the ATen reference if a
        # tensor arrives with others. Passing them as arguments would cost ~0.6 us each.
        st = v.stride()
        terms = [f"{ix} * {self.size(st[k])}" for k, ix in enumerate(idx) if ix != "0"]
        off = " + ".join(terms) or "0"
        raw = f"p{i}[{off}]"
        if v.dtype == torch.bfloat16:
            expr = f"y_bf16_to_f({raw})"
        elif v.dtype == torch.float16:
            expr = f"y_f16_to_f({raw})"
        elif v.dtype == torch.bool:
            expr = raw
        elif not v.dtype.is_floating_point:
            expr = f"(int64_t){raw}"
        else:
            expr = raw
        return self.emit(_ctype_of(v.dtype, self.lang), expr, self.level_of(idx))

    def gen_pointwise(
        self, node: Node, key: str, idx: tuple[str, ...], ctype: str
    ) -> tuple[str, str, int]:
        args = list(node.args)
        alpha = node.kwargs.get("alpha")
        if set(node.kwargs) - {"alpha"}:
            raise Unsupported(f"{node.target} kwargs {sorted(node.kwargs)}")
        ops = [self.operand(a, node, idx) for a in args]
        if key == "where":
            cond = self.cast(ops[0], self.lang.bool_t)
            vals = [cond] + [self.cast(o, ctype) for o in ops[1:]]
        elif key in _COMPARE or key in _LOGICAL:
            common = (
                self.lang.float_t
                if any(o[1] == self.lang.float_t for o in ops)
                else (self.lang.bool_t if key in _LOGICAL else self.lang.int_t)
            )
            vals = [self.cast(o, common) for o in ops]
        else:
            vals = [self.cast(o, ctype) for o in ops]
        if alpha is not None and key in ("add", "sub"):
            a = self.cast(self.literal(alpha), ctype)
            vals[1] = f"({a} * {vals[1]})"
        template = POINTWISE[key]
        if key == "bitwise_not" and ctype == self.lang.bool_t:
            template = "(!{0})"
        expr = template.replace("{T}", ctype).format(*vals)
        level = max([o[2] for o in ops] + [0])
        return self.emit(ctype, expr, level)

    def gen_special(
        self, node: Node, key: str, idx: tuple[str, ...], ctype: str
    ) -> tuple[str, str, int]:
        val = _val(node)
        F = self.lang.float_t
        if key in ("div", "prims.div", "prims.mul", "prims.add", "prims.sub"):
            a, b = (self.operand(x, node, idx) for x in node.args[:2])
            op = {"div": "/", "prims.div": "/", "prims.mul": "*", "prims.add": "+"}.get(key, "-")
            mode = node.kwargs.get("rounding_mode")
            if ctype == self.lang.int_t and op == "/":
                x, y = self.cast(a, ctype), self.cast(b, ctype)
                expr = f"y_floordiv({x}, {y})" if mode == "floor" else f"({x} / {y})"
            else:
                expr = f"({self.cast(a, ctype)} {op} {self.cast(b, ctype)})"
                if mode == "floor":
                    expr = f"floor({expr})"
                elif mode == "trunc":
                    expr = f"trunc({expr})"
            return self.emit(ctype, expr, max(a[2], b[2]))
        if key in ("_to_copy", "prims.convert_element_type"):
            kw = dict(node.kwargs)
            dev = kw.pop("device", None)
            if dev is not None and torch.device(dev).type != val.device.type:
                raise Unsupported("device copy")
            kw.pop("dtype", None)
            kw.pop("layout", None)
            kw.pop("memory_format", None)
            if kw.pop("non_blocking", False) or kw:
                raise Unsupported(f"_to_copy kwargs {sorted(kw)}")
            src = self.gen(node.args[0], idx)
            expr = self.cast(src, ctype)
            if ctype == self.lang.bool_t and src[1] != self.lang.bool_t:
                expr = f"({src[0]} != 0)"
            if val.dtype == torch.bfloat16:
                expr = f"y_round_bf16({expr})"
            elif val.dtype == torch.float16:
                expr = f"y_round_f16({expr})"
            elif val.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
                expr = f"(int64_t)({self.lang.storage[val.dtype]})({expr})"
            return self.emit(ctype, expr, src[2])
        if key == "pow":
            base, exp_ = node.args[0], node.args[1]
            if isinstance(base, Node) and not isinstance(exp_, Node):
                x = self.operand(base, node, idx)
                xs = self.cast(x, ctype)
                # ATen's own special cases (PowKernel.cpp), computed the same way: they
                # round alike, and libm's pow is a call per element (GPT-2's GELU cubes).
                if exp_ == 2:
                    expr = f"({xs} * {xs})"
                elif exp_ == 3:
                    expr = f"({xs} * {xs} * {xs})"
                elif exp_ == 1:
                    expr = xs
                elif exp_ == 0.5 and ctype == F:
                    expr = f"sqrt({xs})"
                elif exp_ == -0.5 and ctype == F:
                    expr = f"(1.0f / sqrt({xs}))"
                elif exp_ == -1 and ctype == F:
                    expr = f"(1.0f / {xs})"
                elif exp_ == -2 and ctype == F:
                    expr = f"(1.0f / ({xs} * {xs}))"
                elif ctype == F:
                    expr = f"pow({xs}, {self.cast(self.literal(float(exp_)), F)})"
                else:
                    raise Unsupported("integer pow")
                return self.emit(ctype, expr, x[2])
            if ctype != F:
                raise Unsupported("integer pow")
            a, b = (self.operand(x, node, idx) for x in (base, exp_))
            return self.emit(ctype, f"pow({self.cast(a, F)}, {self.cast(b, F)})", max(a[2], b[2]))
        if key == "clamp":
            x = self.operand(node.args[0], node, idx)
            expr = self.cast(x, ctype)
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
            level = x[2]
            for bound, fn in ((lo, "y_max"), (hi, "y_min")):
                if bound is not None:
                    b = self.operand(bound, node, idx)
                    level = max(level, b[2])
                    expr = f"{fn}({expr}, {self.cast(b, ctype)})"
            return self.emit(ctype, expr, level)
        if key == "gelu":
            x = self.cast(self.operand(node.args[0], node, idx), F)
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            if approx == "tanh":
                expr = (
                    f"(0.5f * {x} * (1.0f + y_tanh(0.7978845608028654f * "
                    f"({x} + 0.044715f * {x} * {x} * {x}))))"
                )
            else:
                expr = f"(0.5f * {x} * (1.0f + y_erf({x} * 0.7071067811865476f)))"
            return self.emit(ctype, expr, self.gen(node.args[0], idx)[2])
        if key == "masked_fill":
            x = self.operand(node.args[0], node, idx)
            m = self.operand(node.args[1], node, idx)
            v = self.operand(node.args[2], node, idx)
            expr = f"({self.cast(m, self.lang.bool_t)} ? {self.cast(v, ctype)} : {self.cast(x, ctype)})"
            return self.emit(ctype, expr, max(x[2], m[2], v[2]))
        if key == "cat":
            return self.gen_cat(node, idx, ctype)
        raise Unsupported(f"op {node.target}")

    def gen_getitem(self, node: Node, idx: tuple[str, ...]) -> tuple[str, str, int]:
        raise Unsupported("multi-output op inside a region")

    # -- the function --------------------------------------------------------------------
    def render(self, region: GraphModule) -> RenderedKernel:
        self.symbols: set[str] = set()
        self._ntmp = 0
        self.memo: dict[tuple, tuple[str, str, int]] = {}
        self.branch: _Scope | None = None
        self.reduced: dict[Node, str] = {}
        nodes = list(region.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self.placeholder_index = {n: i for i, n in enumerate(placeholders)}
        out_node = next(n for n in nodes if n.op == "output")
        outs_arg = out_node.args[0]
        multi = isinstance(outs_arg, tuple | list)
        outs = list(outs_arg) if multi else [outs_arg]
        if any(not isinstance(o, Node) or not isinstance(_val(o), torch.Tensor) for o in outs):
            raise Unsupported("non-tensor region output")
        reds = [n for n in nodes if n.op == "call_function" and op_key(n.target) in REDUCTIONS]

        if reds:
            self.full_shape, self.red_dims = self.red_spec(reds[0])
            for r in reds[1:]:
                shape, dims = self.red_spec(r)
                if dims != self.red_dims or len(shape) != len(self.full_shape):
                    raise Unsupported("reductions over different domains")
                if not all(self.same(a, b) for a, b in zip(shape, self.full_shape)):
                    raise Unsupported("reductions over different shapes")
        else:
            self.full_shape = _val(outs[0]).shape
            self.red_dims = (len(self.full_shape) - 1,) if len(self.full_shape) else ()
        fs = self.full_shape
        nd = len(fs)
        self.dom = tuple("0" if self.is_one(fs[d]) else f"i{d}" for d in range(nd))
        outer = [d for d in range(nd) if d not in self.red_dims]
        inner = [d for d in range(nd) if d in self.red_dims]
        self.inner_vars = [self.dom[d] for d in inner if self.dom[d] != "0"]
        self.inner_re = r"\b(" + "|".join(self.inner_vars) + r")\b" if inner else "$^"
        full_numel = self.numel(fs)
        red_shape = [1 if d in self.red_dims else fs[d] for d in range(nd)]
        red_numel = self.numel(red_shape)

        # index decls: outer dims from xo, inner dims from r
        def decls(dims: list[int], var: str) -> list[str]:
            dims = [d for d in dims if self.dom[d] != "0"]
            res, rem = [], "1"
            for d in reversed(dims):
                sz = self.size(fs[d])
                res.append(f"const int64_t {self.dom[d]} = ({var} / {rem}) % {sz};")
                rem = f"({rem} * {sz})"
            if len(dims) == 1:
                res = [f"const int64_t {self.dom[dims[0]]} = {var};"]
            return list(reversed(res))

        self.n_outer = "(" + " * ".join(["1"] + [self.size(fs[d]) for d in outer]) + ")"
        self.n_inner = "(" + " * ".join(["1"] + [self.size(fs[d]) for d in inner]) + ")"
        self.inner_decls = decls(inner, "r")
        self.scopes = {0: _Scope(), 1: _Scope()}
        for r in reds:
            self.render_reduction(r)
        # outputs
        full_store: list[str] = []
        self.scopes[1] = _Scope()
        self.memo = {k: v for k, v in self.memo.items() if v[2] == 0}
        out_meta = []
        row_stores: list[str] = []
        for j, o in enumerate(outs):
            ov = _val(o)
            n = self.numel(ov.shape)
            if sympy.expand(n - full_numel) == 0:
                oidx = self.reshape_inverse(ov.shape, fs)
                dest = full_store
            elif reds and sympy.expand(n - red_numel) == 0:
                oidx = self.reshape_inverse(ov.shape, red_shape, reduced=True)
                dest = row_stores
            else:
                raise Unsupported("region outputs of different sizes")
            v = self.gen(o, oidx)
            ost = ov.stride()
            off = " + ".join(
                f"{ix} * {self.size(ost[k])}" for k, ix in enumerate(oidx) if ix != "0"
            )
            stored = self.store(v, ov.dtype)
            if dest is row_stores or (not self.inner_vars):
                self.scopes[0].lines.append(f"o{j}[{off or '0'}] = {stored};")
            else:
                full_store.append(f"o{j}[{off or '0'}] = {stored};")
            out_meta.append(
                (
                    "(" + "".join(self.py_size(s) + ", " for s in ov.shape) + ")",
                    "(" + "".join(self.py_size(s) + ", " for s in ov.stride()) + ")",
                    ov.dtype,
                )
            )
        body_lines = list(self.scopes[0].lines)
        if full_store and self.inner_vars:
            inner_body = [f"for (int64_t r = 0; r < {self.n_inner}; ++r) {{"]
            inner_body += ["  " + d for d in self.inner_decls]
            inner_body += ["  " + ln for ln in self.scopes[1].lines + full_store]
            inner_body.append("}")
            if not reds and not outer:  # one long row: the inner loop is the parallel one
                big = f"{self.n_inner} >= {self.lang.parallel_threshold}"
                body_lines += [f"if ({big}) {{", self.lang.parallel_simd, *inner_body]
                body_lines += ["} else {", self.lang.simd, *inner_body, "}"]
            else:
                body_lines += [self.lang.simd, *inner_body]

        # signature
        params: list[KernelParam] = []
        sig: list[str] = []
        stride_checks: list[tuple[int, int, str]] = []
        contiguous: list[int] = []
        for n, i in self.placeholder_index.items():
            v = _val(n)
            if isinstance(v, torch.Tensor):
                st = self.lang.storage.get(v.dtype)
                if st is None:
                    raise Unsupported(f"input dtype {v.dtype}")
                sig.append(f"const {st}* __restrict__ p{i}")
                params.append(KernelParam("tensor", i))
                self.note_layout(i, v, stride_checks, contiguous)
            elif isinstance(v, torch.SymFloat | float):
                sig.append(f"double p{i}")
                params.append(KernelParam("float", i))
            else:
                sig.append(f"int64_t p{i}")
                params.append(KernelParam("int", i))
        for j, o in enumerate(outs):
            ov = _val(o)
            st = self.lang.storage.get(ov.dtype)
            if st is None:
                raise Unsupported(f"output dtype {ov.dtype}")
            sig.append(f"{st}* __restrict__ o{j}")
            params.append(KernelParam("out", j))
        symbol_sources = self.find_symbols(placeholders)
        for c_param, param in self.symbol_params():
            sig.append(c_param)
            params.append(param)
        lines = [f'extern "C" void FUNC({", ".join(sig)}) {{']
        if outer:
            # The row body is a lambda so that small launches (decode: one row) skip the
            # OpenMP runtime entirely instead of entering a serialised parallel region.
            big = f"{self.n_outer} > 1 && {self.n_outer} * {self.n_inner} >= "
            big += str(self.lang.parallel_threshold)
            lines.append("auto row = [&](const int64_t xo) {")
            lines += ["  " + d for d in decls(outer, "xo")]
            lines += ["  " + ln for ln in body_lines]
            lines.append("};")
            lines += [f"if ({big}) {{", self.lang.parallel_for]
            lines.append(f"  for (int64_t xo = 0; xo < {self.n_outer}; ++xo) row(xo);")
            lines.append("} else {")
            lines.append(f"  for (int64_t xo = 0; xo < {self.n_outer}; ++xo) row(xo);")
            lines.append("}")
        else:
            lines.append("{")
            lines += ["  " + ln for ln in body_lines]
            lines.append("}")
        lines.append("}")
        origins = [f"{n.name}: {n.target}" for n in nodes if n.op == "call_function"]
        return RenderedKernel(
            body="\n".join(lines) + "\n",
            params=params,
            outputs=out_meta,
            symbol_sources=symbol_sources,
            n_placeholders=len(placeholders),
            multi_output=multi,
            origins=origins,
            stride_checks=stride_checks,
            c_types=[" ".join(w for w in d.split()[:-1] if w != "__restrict__") for d in sig],
            contiguous_inputs=contiguous,
        )

    def reshape_inverse(self, oshape: Any, dshape: Any, reduced: bool = False) -> tuple[str, ...]:
        """Index into an output of shape `oshape` of domain element `dom` (row-major)."""
        dom = tuple(
            "0" if reduced and d in self.red_dims else self.dom[d] for d in range(len(dshape))
        )
        return self.reshape(dom, dshape, oshape)

    def store(self, v: tuple[str, str, int], dtype: torch.dtype) -> str:
        if dtype == torch.bfloat16:
            return f"y_f_to_bf16({self.cast(v, self.lang.float_t)})"
        if dtype == torch.float16:
            return f"y_f_to_f16({self.cast(v, self.lang.float_t)})"
        return f"({self.lang.storage[dtype]})({v[0]})"
