"""The pattern language the LLM passes match with (passes/pattern_expr.py)."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from yirage_dynamo.passes.pattern_expr import MULTIPLE, CallFunction, KeywordArg

aten = torch.ops.aten


def _graph(fn, *args):
    return make_fx(fn)(*args).graph


def _node(graph, target):
    return [n for n in graph.nodes if n.op == "call_function" and n.target is target][-1]


def test_repeated_keyword_must_bind_the_same_value():
    x = KeywordArg("x")
    square = CallFunction(aten.mul.Tensor, x, x)
    same = _graph(lambda a: a * a, torch.randn(3))
    other = _graph(lambda a, b: a * b, torch.randn(3), torch.randn(3))
    m = square.match(_node(same, aten.mul.Tensor))
    assert m is not None and m.kwargs["x"].op == "placeholder"
    assert square.match(_node(other, aten.mul.Tensor)) is None


def test_inner_node_with_another_user_does_not_match_unless_multiple():
    def fn(a):
        e = torch.exp(a)
        return e * 2, e + 1

    graph = _graph(fn, torch.randn(3))
    root = _node(graph, aten.mul.Tensor)
    single = CallFunction(aten.mul.Tensor, CallFunction(aten.exp.default, KeywordArg("a")), 2)
    multi = CallFunction(
        aten.mul.Tensor, CallFunction(aten.exp.default, KeywordArg("a"), _users=MULTIPLE), 2
    )
    assert single.match(root) is None
    m = multi.match(root)
    assert m is not None and [n.target for n in m.nodes] == [aten.exp.default, aten.mul.Tensor]


def test_constants_and_lists_compare_by_value():
    graph = _graph(lambda a: a.sum([-1], True), torch.randn(2, 3))
    node = _node(graph, aten.sum.dim_IntList)
    assert CallFunction(aten.sum.dim_IntList, KeywordArg("x"), [-1], True).match(node)
    assert CallFunction(aten.sum.dim_IntList, KeywordArg("x"), [0], True).match(node) is None
    captured = CallFunction(aten.sum.dim_IntList, KeywordArg("x"), KeywordArg("d"), True)
    assert captured.match(node).kwargs["d"] == [-1]


def test_keyword_pattern_ignores_other_node_kwargs():
    graph = _graph(lambda a: a.to(torch.float16), torch.randn(3))
    node = _node(graph, aten._to_copy.default)
    assert CallFunction(aten._to_copy.default, KeywordArg("x"), dtype=torch.float16).match(node)
    assert (
        CallFunction(aten._to_copy.default, KeywordArg("x"), dtype=torch.bfloat16).match(node)
        is None
    )


def test_pattern_passes_do_not_import_inductor_pattern_matcher():
    code = (
        "import sys, torch\n"
        "from yirage_dynamo.passes import pattern_rms_norm, pattern_rotary, pattern_swiglu\n"
        "for mod in (pattern_rms_norm, pattern_rotary, pattern_swiglu):\n"
        "    mod._patterns()\n"
        "print('torch._inductor.pattern_matcher' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
