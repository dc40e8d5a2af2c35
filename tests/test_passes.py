"""Unit tests of the generic passes on small ATen graphs: counts, graph shape, numerics."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from yirage_dynamo.lowering import AtenLowering
from yirage_dynamo.passes import PIPELINE, PassContext, cleanup, freezing, reinplace, run_pipeline
from yirage_dynamo.runtime.wrapper import build_wrapper

from yirage_dynamo.options import parse_options
from yirage_dynamo.report import CompileReport

aten = torch.ops.aten


def trace(fn, *args, functionalize=False):
    if functionalize:
        fn = torch.func.functionalize(fn, remove="mutations_and_views")
    return make_fx(fn, tracing_mode="fake")(*args)


def context(gm, real_inputs=None, **options):
    example = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    return PassContext(
        options=parse_options({"verify": True, **options}),
        report=CompileReport(),
        capabilities=AtenLowering().capabilities,
        example_inputs=example,
        real_inputs=real_inputs,
    )


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def run(gm, *args):
    return build_wrapper(gm, None, kernels={})(list(args))


def test_pipeline_is_one_ordered_list_with_unique_names():
    names = [p.name for p in PIPELINE]
    assert len(names) == len(set(names))
    assert names.index("freeze_parameters") < names.index("constant_fold") < names.index("dce")


def test_remove_noops_drops_identity_ops_only():
    def fn(x):
        return (x.clone() * 1 + 0).view(x.shape) + x.to(torch.float64).sum()

    gm = trace(fn, torch.randn(3, 4))
    removed = cleanup.remove_noops(gm, context(gm))
    gm.recompile()
    assert removed == 4  # clone, mul 1, add 0, view to same shape
    assert aten._to_copy.default in targets(gm)  # a real dtype change stays
    x = torch.randn(3, 4)
    torch.testing.assert_close(run(gm, x), fn(x))


def test_cse_merges_repeated_pure_ops_but_not_random_ones():
    def fn(x):
        return x.sin() + x.sin(), torch.rand_like(x) + torch.rand_like(x)

    gm = trace(fn, torch.randn(4))
    merged = cleanup.cse(gm, context(gm))
    assert merged == 1
    assert targets(gm).count(aten.sin.default) == 1
    assert targets(gm).count(aten.rand_like.default) == 2


def test_dce_removes_unused_pure_nodes_and_keeps_mutations():
    def fn(x, buf):
        x.cos()  # dead
        buf.add_(1)
        return x * 2

    gm = trace(fn, torch.randn(3), torch.randn(3))
    removed = cleanup.dce(gm, context(gm))
    assert removed == 1
    assert aten.cos.default not in targets(gm)
    assert aten.add_.Tensor in targets(gm)


def test_freeze_parameters_inlines_weights_by_reference_and_folds_casts():
    weight = torch.nn.Parameter(torch.randn(4, 4))

    def fn(w, x):
        return x @ (w.to(torch.float64) * 2).to(torch.float32).t()

    gm = trace(fn, weight, torch.randn(2, 4))
    ctx = context(gm, real_inputs=[weight, None])
    assert freezing.freeze_parameters(gm, ctx) == 1
    frozen = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert [t.data_ptr() for t in frozen] == [weight.data_ptr()]  # no copy
    assert freezing.constant_fold(gm, ctx) == 1
    cleanup.dce(gm, ctx)
    gm.recompile()
    assert aten.mul.Tensor not in targets(gm)  # folded at compile time
    assert aten.t.default in targets(gm)  # views stay lazy (no weight copy)
    x = torch.randn(2, 4)
    torch.testing.assert_close(run(gm, weight, x), fn(weight, x))


def test_freeze_skips_mutated_and_non_parameter_inputs():
    weight = torch.nn.Parameter(torch.randn(3))

    def fn(w, b, x):
        b.add_(1)
        return x * w + b

    gm = trace(fn, weight, torch.randn(3), torch.randn(3), functionalize=True)
    plain = torch.randn(3)
    ctx = context(gm, real_inputs=[weight, plain, None])
    ctx.mutated_inputs = frozenset({1})
    assert freezing.freeze_parameters(gm, ctx) == 1


def test_reinplace_turns_index_copy_into_in_place_update():
    def fn(cache, pos, k):
        cache.index_copy_(0, pos, k)
        return cache.sum(0)

    cache = torch.zeros(8, 4)
    gm = trace(fn, cache, torch.tensor([2]), torch.randn(1, 4), functionalize=True)
    assert aten.copy_.default in targets(gm)
    assert reinplace.reinplace_input_mutations(gm, context(gm)) == 1
    gm.recompile()
    assert aten.index_copy_.default in targets(gm)
    assert aten.copy_.default not in targets(gm)
    real, ref = torch.zeros(8, 4), torch.zeros(8, 4)
    k = torch.randn(1, 4)
    out = run(gm, real, torch.tensor([5]), k)
    torch.testing.assert_close(out, fn(ref, torch.tensor([5]), k))
    torch.testing.assert_close(real, ref)


def test_reinplace_refuses_when_old_value_is_read_later():
    def fn(cache, pos, k):
        old = cache * 1.5
        cache.index_copy_(0, pos, k)
        return cache.sum(0) + old.sum(0)

    gm = trace(fn, torch.zeros(8, 4), torch.tensor([2]), torch.randn(1, 4), functionalize=True)
    # Move nothing: the multiply reads `cache` before the update, so reinplacing is safe...
    ctx = context(gm)
    assert reinplace.reinplace_input_mutations(gm, ctx) == 1

    def late_read(cache, pos, k):
        new = cache.index_copy(0, pos, k)
        out = new.sum(0) + cache.sum(0)  # reads the OLD cache after computing the new one
        cache.copy_(new)
        return out

    gm = trace(late_read, torch.zeros(8, 4), torch.tensor([2]), torch.randn(1, 4))
    ctx = context(gm)
    assert reinplace.reinplace_input_mutations(gm, ctx) == 0
    assert any("read after" in r for r in ctx.report.rejected)


def test_run_pipeline_records_every_enabled_pass():
    gm = trace(lambda x: x.relu() + 0, torch.randn(3))
    ctx = context(gm, passes={"cse": False})
    run_pipeline(gm, ctx)
    names = [p.name for p in ctx.report.passes]
    assert "cse" not in names and names[0] == "remove_noops"
