"""Index mapping of the C-like renderer: broadcasts, views and `cat` cost no memory traffic.

A view is rendered as index arithmetic on its input (walking the region backwards):

    gen(transpose(x, 1, 2), (i0, i1, i2))   -> gen(x, (i0, i2, i1))
    gen(view(x, [9, 64]) of x [576], (i, j)) -> gen(x, (i * 64 + j,))
    gen(cat([a, b], -1), (.., r))           -> r < n_a ? gen(a, (.., r)) : gen(b, (.., r - n_a))

`cat` evaluates only the input the index falls into (a branch per input), so rotate-half
(`cat(-x2, x1)`) reads each element of x once.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
from torch.fx import Node

from .c_ops import Unsupported, _Scope, _val


class ViewMixin:
    """Methods of CRenderer that map indices through views, broadcasts and `cat`."""

    # -- index mapping -------------------------------------------------------------------
    def bcast(self, idx: tuple[str, ...], out_shape: Any, in_shape: Any) -> tuple[str, ...]:
        lead = len(out_shape) - len(in_shape)
        if lead < 0:
            raise Unsupported("broadcast to fewer dims")
        res = []
        for k, s in enumerate(in_shape):
            o = out_shape[lead + k]
            if self.is_one(s) and not self.is_one(o):
                res.append("0")
            elif self.same(s, o):
                res.append(idx[lead + k])
            else:
                raise Unsupported(f"cannot broadcast {tuple(in_shape)} to {tuple(out_shape)}")
        return tuple(res)

    def reshape(self, idx: tuple[str, ...], shape: Any, src: Any) -> tuple[str, ...]:
        """Index into `src` of element `idx` of reshape(src, shape) (row-major semantics).

        Dims are matched in groups of equal size products (e.g. [9, 64] <-> [576]): a
        merge is `i1 * 64 + i3` and a split divides within its group only, so the common
        head/flatten views need no division or modulo at all.
        """
        a = [(i, s) for i, s in zip(idx, shape) if not self.is_one(s)]
        b = [k for k, s in enumerate(src) if not self.is_one(s)]
        res = ["0"] * len(src)
        if not a or not b:  # one element
            return tuple(res)
        groups = self.reshape_groups([s for _, s in a], [src[k] for k in b])
        if groups is None:  # sizes that cannot be matched: one linear index
            groups = [(list(range(len(a))), list(range(len(b))))]
        for ga, gb in groups:
            lin = a[ga[0]][0]
            for j in ga[1:]:
                lin = f"({lin} * {self.size(a[j][1])} + {a[j][0]})"
            rem = "1"
            for n, j in enumerate(reversed(gb)):
                k = b[j]
                part = lin if rem == "1" else f"({lin} / {rem})"
                res[k] = part if n == len(gb) - 1 else f"({part} % {self.size(src[k])})"
                rem = self.size(src[k]) if rem == "1" else f"({rem} * {self.size(src[k])})"
        return tuple(res)

    def reshape_groups(self, sa: list, sb: list) -> list[tuple[list, list]] | None:
        """Runs of dims of `sa` and `sb` with equal size products, or None."""
        groups: list[tuple[list, list]] = []
        i = j = 0
        ga, gb = [0], [0]
        pa, pb = self.expr(sa[0]), self.expr(sb[0])
        while True:
            if sympy.expand(pa - pb) == 0:
                groups.append((ga, gb))
                i, j = i + 1, j + 1
                if i == len(sa) or j == len(sb):
                    return groups if i == len(sa) and j == len(sb) else None
                ga, gb = [i], [j]
                pa, pb = self.expr(sa[i]), self.expr(sb[j])
                continue
            if pa.is_Integer and pb.is_Integer:
                grow_a = pa < pb
            else:  # symbolic: grow the side whose product divides the other's
                ratio = sympy.cancel(pb / pa)
                if ratio.is_integer and ratio.is_positive:
                    grow_a = True
                elif (1 / ratio).is_integer and (1 / ratio).is_positive:
                    grow_a = False
                else:
                    return None
            if grow_a and i + 1 < len(sa):
                i += 1
                ga.append(i)
                pa = pa * self.expr(sa[i])
            elif not grow_a and j + 1 < len(sb):
                j += 1
                gb.append(j)
                pb = pb * self.expr(sb[j])
            else:
                return None

    @staticmethod
    def expr(s: Any) -> sympy.Expr:
        return s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(int(s))

    def view_index(self, node: Node, key: str, idx: tuple[str, ...]) -> tuple[str, ...]:
        src = _val(node.args[0]).shape
        shape = _val(node).shape
        if key in ("alias", "clone", "prims.view_of"):
            return idx
        if key in ("view", "reshape", "_unsafe_view", "prims.reshape"):
            return self.reshape(idx, shape, src)
        if key == "unsqueeze":
            d = node.args[1] % (len(shape))
            return idx[:d] + idx[d + 1 :]
        if key in ("squeeze", "prims.squeeze"):
            return self.reshape(idx, shape, src)
        if key == "permute":
            perm = [p % len(shape) for p in node.args[1]]
            res = ["0"] * len(src)
            for i, p in enumerate(perm):
                res[p] = idx[i]
            return tuple(res)
        if key in ("transpose", "t"):
            if key == "t" or len(node.args) < 3:
                a, b = (0, 1) if len(src) == 2 else (0, 0)
            else:
                a, b = node.args[1] % len(src), node.args[2] % len(src)
            res = list(idx)
            res[a], res[b] = idx[b], idx[a]
            return tuple(res)
        if key == "expand":
            return self.bcast(idx, shape, src)
        if key == "prims.broadcast_in_dim":
            bdims = node.args[2]
            return tuple(
                "0" if self.is_one(src[k]) and not self.is_one(shape[d]) else idx[d]
                for k, d in enumerate(bdims)
            )
        if key == "slice":
            dim = (node.args[1] if len(node.args) > 1 else 0) % len(src)
            start = node.args[2] if len(node.args) > 2 else 0
            step = node.args[4] if len(node.args) > 4 else 1
            start = 0 if start is None else start
            if not isinstance(start, int) or not isinstance(step, int):
                raise Unsupported("symbolic slice bounds")
            if start < 0:
                if isinstance(src[dim], torch.SymInt):
                    raise Unsupported("negative slice start on a symbolic dim")
                start = max(start + int(src[dim]), 0)
            res = list(idx)
            res[dim] = f"({idx[dim]} * {step} + {start})"
            return tuple(res)
        if key == "select":
            dim = node.args[1] % len(src)
            index = node.args[2]
            if not isinstance(index, int):
                raise Unsupported("symbolic select index")
            if index < 0:
                if isinstance(src[dim], torch.SymInt):
                    raise Unsupported("negative select on a symbolic dim")
                index += int(src[dim])
            return idx[:dim] + (str(index),) + idx[dim:]
        raise Unsupported(f"view {key}")

    def gen_cat(self, node: Node, idx: tuple[str, ...], ctype: str) -> tuple[str, str, int]:
        def legacy_empty(t: Node) -> bool:  # cat ignores 1-D empty inputs; static check only
            n = _val(t).numel()
            return not isinstance(n, torch.SymInt) and n == 0 and _val(t).dim() == 1

        tensors = [t for t in node.args[0] if not legacy_empty(t)]
        shape = _val(node).shape
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
        name = self.tmp()
        level = self.level_of(idx)
        outer_branch = self.branch
        target = outer_branch if outer_branch is not None else self.scopes[level]
        target.lines.append(f"{ctype} {name};")
        offset = "0"
        saved = dict(self.memo)
        for k, t in enumerate(tensors):
            size = self.size(_val(t).shape[dim])
            block = _Scope()
            self.branch = block
            sub = list(idx)
            sub[dim] = f"({idx[dim]} - {offset})"
            v = self.gen(t, tuple(sub))
            self.branch = outer_branch
            self.memo = dict(saved)
            end = f"({offset} + {size})"
            head = "" if k == 0 else "else "
            cond = f"if ({idx[dim]} < {end}) " if k < len(tensors) - 1 else ""
            target.lines.append(f"{head}{cond}{{")
            target.lines.extend("  " + ln for ln in block.lines)
            target.lines.append(f"  {name} = {self.cast(v, ctype)};")
            target.lines.append("}")
            offset = end
        return name, ctype, level
