"""A small FX pattern language: `CallFunction`, `KeywordArg`, `MULTIPLE`.

The same expressions and matching rules as torch._inductor.pattern_matcher (which the
pattern passes were first written against), without importing Inductor: that import
pulls in Inductor's lowerings and kernel templates and costs 0.6-1.2 s of every cold
compile on CPU, where Inductor is otherwise never used.

Rules (as Inductor's):
  * `CallFunction(op, *args, _users=1, **kwargs)` matches a call_function node of `op`
    (or any of a list of ops) with exactly as many positional args; only the kwargs the
    pattern names are compared (a node that passes them positionally is normalised);
  * a constant in the pattern must equal the node's argument; where the pattern has a
    list, the node's argument must be a list of the same length, compared element-wise;
    a node argument where the pattern has a constant fails;
  * a non-root CallFunction node must have exactly `_users` users (`MULTIPLE`: any), so
    a rewrite never erases a value still used elsewhere;
  * `KeywordArg(name)` captures anything; the same name captured twice must be the same
    value; the same pattern object reached twice must match the same node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import Node


class _Multiple:
    def __repr__(self) -> str:
        return "MULTIPLE"


MULTIPLE = _Multiple()


class FailedMatch(Exception):
    pass


class Match:
    """A successful match: captured `kwargs` and the matched `nodes` (inputs first)."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}
        self.nodes: list[Node] = []

    def __bool__(self) -> bool:
        return True

    def extend(self, other: Match) -> None:
        for key in self.kwargs.keys() & other.kwargs.keys():
            if self.kwargs[key] != other.kwargs[key]:
                raise FailedMatch(f"kwarg mismatch: {key}")
        self.kwargs.update(other.kwargs)
        self.nodes.extend(other.nodes)


class _Context:
    def __init__(self, root: PatternExpr) -> None:
        self.root = root
        self.pattern_to_node: dict[int, Any] = {}

    def match(self, pattern: Any, value: Any) -> Match:
        key = id(pattern)
        if key in self.pattern_to_node:
            if self.pattern_to_node[key] is value:
                return Match()  # this pattern already matched this very node
            raise FailedMatch("repeated pattern differs")
        m = pattern.match_in(value, self)
        self.pattern_to_node[key] = value
        return m


class PatternExpr:
    def match_in(self, value: Any, ctx: _Context) -> Match:
        raise NotImplementedError

    def match(self, node: Node) -> Match | None:
        """The match rooted at `node`, or None."""
        try:
            return _Context(self).match(self, node)
        except FailedMatch:
            return None


class KeywordArg(PatternExpr):
    """Capture whatever is at this position under `name`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def match_in(self, value: Any, ctx: _Context) -> Match:
        m = Match()
        m.kwargs[self.name] = value
        return m

    def __repr__(self) -> str:
        return f"KeywordArg({self.name!r})"


def _match_value(pattern: Any, value: Any, ctx: _Context, m: Match) -> None:
    """Match one argument; the pattern's structure decides how deep lists are compared."""
    if isinstance(pattern, PatternExpr):
        m.extend(ctx.match(pattern, value))
    elif isinstance(pattern, list | tuple):
        if not isinstance(value, list | tuple) or len(value) != len(pattern):
            raise FailedMatch("argument structure")
        for p, v in zip(pattern, value):
            _match_value(p, v, ctx, m)
    elif isinstance(value, Node) or not _same_constant(value, pattern):
        raise FailedMatch("constant argument")


class CallFunction(PatternExpr):
    """Match `op(*args, **kwargs)`; `op` may be a list of alternative targets."""

    def __init__(self, fns: Any, *args: Any, _users: int | _Multiple = 1, **kwargs: Any):
        self.fns = tuple(fns) if isinstance(fns, Sequence) else (fns,)
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.users = _users

    def __repr__(self) -> str:
        return f"CallFunction({self.fns[0]}, ...)"

    def match_in(self, node: Any, ctx: _Context) -> Match:
        if not isinstance(node, Node) or node.op != "call_function" or node.target not in self.fns:
            raise FailedMatch("function mismatch")
        if len(node.args) != len(self.args):
            raise FailedMatch("argument count")
        if self is not ctx.root and self.users is not MULTIPLE and len(node.users) != self.users:
            raise FailedMatch("users")
        args, kwargs = node.args, node.kwargs
        if len(kwargs) < len(self.kwargs):
            from torch.fx.operator_schemas import normalize_function

            norm = normalize_function(node.target, node.args, node.kwargs)
            if norm is None or len(norm[0]) != len(self.args):
                raise FailedMatch("cannot normalise arguments")
            args, kwargs = norm
        if any(k not in kwargs for k in self.kwargs):
            raise FailedMatch("missing keyword argument")
        m = Match()
        for pattern, value in zip(self.args, args):
            _match_value(pattern, value, ctx, m)
        for key, pattern in self.kwargs.items():
            _match_value(pattern, kwargs[key], ctx, m)
        m.nodes.append(node)
        return m


def _same_constant(value: Any, pattern: Any) -> bool:
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return False  # a symbolic size is not the pattern's constant (no guard added)
    return bool(value == pattern)
