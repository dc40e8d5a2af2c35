"""Sizes and size symbols of the C-like renderer (a mixin of CRenderer).

Symbolic sizes become int64 kernel parameters: `size()` prints a size as C and records the
symbols it uses; `find_symbols()` tells the launcher where to read each one at run time (an
int argument or an input tensor's dim). `bind_derived_sizes()` covers dims that are sums of
symbols no input holds alone (a cache grown by `cat`), by making each such dim a size of
its own.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
from torch.fx import Node

from .c_ops import KernelParam, Unsupported, _val


class SizeMixin:
    """Needs `self.symbols` (set of symbol names), `self.subst` / `self.derived` (empty
    until bind_derived_sizes), `self._cpp` / `self._py` (printers) and `self.expr`
    (c_views.ViewMixin)."""

    # -- sizes ---------------------------------------------------------------------------
    def _expr(self, s: torch.SymInt) -> sympy.Expr:
        """A size's expression, in the derived sizes where `bind_derived_sizes` made any."""
        expr = s.node.expr
        return sympy.expand(expr.subs(self.subst)) if self.subst else expr

    def bind_derived_sizes(self, placeholders: list[Node]) -> None:
        """Let input dims that are expressions stand for the symbols they hide.

        A KV cache grown by `cat` has length s0 + s1 while no input has s0 or s1 alone, so
        neither can be read at run time. For such a dim E (linear, coefficient +-1 in an
        unreadable symbol x) a new size symbol y, read from the dim itself, replaces x by
        the solution of E = y in every size this kernel renders afterwards: the cache's
        strides 64*s0 + 64*s1 become 64*y. Call before any size is rendered. A symbol that
        still appears elsewhere stays missing, and find_symbols says so (the caller falls
        back)."""
        readable = set(self._bare_symbols(placeholders))
        self.subst = {}
        self.derived = {}
        for i, n in enumerate(placeholders):
            v = _val(n)
            if not isinstance(v, torch.Tensor):
                continue
            for d, s in enumerate(v.shape):
                if not isinstance(s, torch.SymInt) or s.node.expr.is_Symbol:
                    continue
                e = sympy.expand(s.node.expr.subs(self.subst))
                unknown = sorted(
                    (x for x in e.free_symbols if str(x) not in readable), key=str, reverse=True
                )
                x = next((u for u in unknown if sympy.diff(e, u) in (1, -1)), None)
                if x is None:
                    continue
                c = sympy.diff(e, x)
                y = sympy.Symbol(f"y{i}_{d}", integer=True, nonnegative=True)
                solution = sympy.expand(c * (y - (e - c * x)))
                self.subst = {k: sympy.expand(w.subs(x, solution)) for k, w in self.subst.items()}
                self.subst[x] = solution
                self.derived[str(y)] = f"a{i}.size({d})"
                readable.add(str(y))

    def size(self, s: Any) -> str:
        """C expression of a (possibly symbolic) size; records the symbols it needs."""
        if isinstance(s, torch.SymInt):
            expr = self._expr(s)
            if expr.is_number:
                return str(int(expr))
            for sym in expr.free_symbols:
                self.symbols.add(str(sym))
            return f"((int64_t)({self._cpp.doprint(expr)}))"
        return str(int(s))

    def py_size(self, s: Any) -> str:
        if isinstance(s, torch.SymInt):
            expr = self._expr(s)
            for sym in expr.free_symbols:
                self.symbols.add(str(sym))
            return self._py.doprint(expr)
        return str(int(s))

    @staticmethod
    def same(a: Any, b: Any) -> bool:
        ea = a.node.expr if isinstance(a, torch.SymInt) else sympy.Integer(int(a))
        eb = b.node.expr if isinstance(b, torch.SymInt) else sympy.Integer(int(b))
        return bool(sympy.expand(ea - eb) == 0)

    @staticmethod
    def is_one(s: Any) -> bool:
        return not isinstance(s, torch.SymInt) and int(s) == 1

    def is_contiguous(self, v: torch.Tensor) -> bool:
        """Tensor.is_contiguous() of the fake value (strides of size-1 dims do not count)."""
        expected = sympy.Integer(1)
        for size, stride in reversed(list(zip(v.shape, v.stride()))):
            if not self.is_one(size):
                if sympy.expand(self.expr(stride) - expected) != 0:
                    return False
                expected = expected * self.expr(size)
        return True

    def note_layout(
        self,
        i: int,
        v: torch.Tensor,
        stride_checks: list[tuple[int, int, str]],
        contiguous: list[int],
    ) -> None:
        """Record input p{i}'s run-time stride checks (dims of size != 1) and whether it is
        contiguous (the launcher then skips reading its strides)."""
        for k, (size, stride) in enumerate(zip(v.shape, v.stride())):
            if not self.is_one(size):
                stride_checks.append((i, k, self.py_size(stride)))
        if self.is_contiguous(v):
            contiguous.append(i)

    def symbol_params(self) -> list[tuple[str, KernelParam]]:
        """(C parameter, launcher parameter) of every size symbol the kernel reads."""
        return [(f"int64_t {s}", KernelParam("sym", -1, symbol=s)) for s in sorted(self.symbols)]

    def numel(self, shape: Any) -> sympy.Expr:
        out = sympy.Integer(1)
        for s in shape:
            out *= s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(int(s))
        return sympy.expand(out)

    @staticmethod
    def _bare_symbols(placeholders: list[Node]) -> dict[str, str]:
        """Size symbols an input gives directly: an int argument or a tensor dim."""
        found: dict[str, str] = {}
        for i, n in enumerate(placeholders):
            v = _val(n)
            if isinstance(v, torch.SymInt) and v.node.expr.is_Symbol:
                found.setdefault(str(v.node.expr), f"a{i}")
        for i, n in enumerate(placeholders):
            v = _val(n)
            if isinstance(v, torch.Tensor):
                for d, s in enumerate(v.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                        found.setdefault(str(s.node.expr), f"a{i}.size({d})")
        return found

    def find_symbols(self, placeholders: list[Node]) -> dict[str, str]:
        """Where the launcher reads each size symbol: an int argument or a tensor's size
        (or a dim that `bind_derived_sizes` turned into a symbol of its own)."""
        found = {**self._bare_symbols(placeholders), **self.derived}
        missing = self.symbols - set(found)
        if missing:
            raise Unsupported(f"size symbols {sorted(missing)} not readable from inputs")
        return {s: found[s] for s in sorted(self.symbols)}
