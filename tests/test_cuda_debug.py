"""YIRAGE_DEBUG for the CUDA lowering (lowering/cuda_debug.py): what the lowered graph's
op calls run, as source files with their FX origins. Checked on any machine with the
yirage ops' reference implementations standing in for the Triton ops."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_triton
from torch.fx.experimental.proxy_tensor import make_fx
from yirage_dynamo.lowering.base import Capabilities
from yirage_dynamo.lowering.cuda_debug import dump_lowered, op_launcher, referenced_sources
from yirage_dynamo.passes.context import PassContext

import yirage_dynamo.ops  # noqa: F401 - registers the yirage ops
from yirage_dynamo.options import parse_options
from yirage_dynamo.report import CompileReport, KernelRecord

pytestmark = pytest.mark.cuda


class _FakeJit:
    """Shaped like triton's JITFunction: the Python function as `.fn`, `.src`, `.run`."""

    def __init__(self, fn):
        self.fn, self.src = fn, "..."

    def run(self, *args):
        return None


def _kernel_body(x):
    return _helper_of_kernel(x)


def _helper_of_kernel(x):
    return x


_kernel = _FakeJit(_kernel_body)


def _launcher(x):
    return _kernel.run(x)


def _op(x):
    return _launcher(x) or _unrelated_name_in_a_string("_op")


def _unrelated_name_in_a_string(s):
    return s


def test_referenced_sources_follow_launchers_into_kernels_once_each():
    found = referenced_sources(_op, lambda o: isinstance(o, _FakeJit), (__name__,))
    names = [name for name, _ in found]
    assert names[:3] == ["_op", "_launcher", "_unrelated_name_in_a_string"]
    assert set(names) == {
        "_op", "_launcher", "_unrelated_name_in_a_string", "_kernel_body", "_helper_of_kernel",
    }  # fmt: skip
    assert len(names) == len(set(names))
    assert "return _launcher(x)" in dict(found)["_op"]


def test_op_launcher_sees_through_triton_ops_wrapper():
    # triton_op registers torch's wrapper, not the function: the dump must show ours.
    from torch._library.custom_ops import _maybe_get_opdef
    from torch.library import triton_op

    def _scaled(x: torch.Tensor) -> torch.Tensor:
        return _launcher(x)

    op = triton_op("yirage_test::scaled_for_debug_dump", mutates_args=())(_scaled)
    registered = _maybe_get_opdef(op)._init_fn
    assert registered is not _scaled  # else this test checks nothing
    assert op_launcher(registered, (__name__,)) is _scaled
    assert op_launcher(_op, (__name__,)) is _op  # a plain function is itself


def test_debug_dump_names_each_ops_origins_and_constants_and_links_the_report(tmp_path):
    def f(q, k, cos, sin):
        q2, k2 = torch.ops.yirage.rotary(q, k, cos, sin, False)
        return q2 + k2

    x = torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    gm = make_fx(f, tracing_mode="fake")(x, x, cos, sin)
    rot = next(n for n in gm.graph.nodes if n.target is torch.ops.yirage.rotary.default)
    rot.meta["yirage_origin"] = "pattern_rotary_0"
    opts = parse_options({"debug": True, "debug_dir": str(tmp_path)})
    ctx = PassContext(opts, CompileReport(), Capabilities("cuda"), [])
    ctx.report.kernels.append(KernelRecord("rotary", "cuda", None, [rot.name]))
    dump_lowered(gm, ctx, "lowered_cuda", namespace="yirage")
    graphs = list(tmp_path.rglob("lowered_cuda.txt"))
    assert len(graphs) == 1 and "yirage.rotary" in graphs[0].read_text()
    kernels = list(tmp_path.rglob("kernels/rotary_*.py"))
    assert len(kernels) == 1
    text = kernels[0].read_text()
    assert "# yirage kernel rotary (yirage::rotary)" in text
    assert f"#   pattern_rotary_0 -> {rot.name}: " in text
    assert "def rotary(" in text and "def _rotate(" in text  # the op and what it calls
    assert ctx.report.kernels[0].source_path == str(kernels[0])


def test_no_inductor_path_dumps_each_graph_as_lowered(monkeypatch, tmp_path):
    from test_cuda_choices import direct_generate_on_cpu

    direct_generate_on_cpu(monkeypatch, debug=True, debug_dir=str(tmp_path))
    lowered = list(tmp_path.rglob("lowered_cuda.txt"))
    # embedding | layers | head, for the prompt and for the decode step
    assert len(lowered) >= 3, sorted(p.parent.name for p in tmp_path.rglob("*.txt"))
    assert any("yirage.attention" in p.read_text() for p in lowered)


@needs_triton
def test_debug_dump_of_a_triton_op_holds_its_jit_kernels(tmp_path):
    from yirage_dynamo.lowering.cuda_ops import _kernels

    _kernels()

    # Built by hand: tracing would look into a triton_op.
    graph = torch.fx.Graph()
    args = [graph.placeholder(name) for name in ("q", "k", "cos", "sin")]
    graph.output(graph.call_function(torch.ops.yirage_cuda.rotary.default, tuple(args)))
    gm = torch.fx.GraphModule({}, graph)
    opts = parse_options({"debug": True, "debug_dir": str(tmp_path)})
    ctx = PassContext(opts, CompileReport(), Capabilities("cuda"), [])
    dump_lowered(gm, ctx, "lowered_cuda")
    (kernel,) = tmp_path.rglob("kernels/rotary_*.py")
    text = kernel.read_text()
    assert "def rotary(" in text and "def _rotate(" in text and "def _rotate_row(" in text
    assert "@triton.jit" in text and "def _rotary_kernel(" in text
