"""Memory planning pass + runtime arena: layouts never overlap, results never change."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import tolerances, yirage_compile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx
from yirage_dynamo.lowering.base import Capabilities
from yirage_dynamo.passes import memory_plan as mp
from yirage_dynamo.passes.context import PassContext
from yirage_dynamo.runtime.arena import Arena, format_layout
from yirage_dynamo.runtime.wrapper import build_wrapper

import yirage_dynamo
from yirage_dynamo.options import parse_options
from yirage_dynamo.report import CompileReport

# ---- random programs: a DAG over a pool of [B, d] tensors (B symbolic) ----------------

_UNARY = [torch.relu, torch.tanh, torch.sigmoid, torch.neg, torch.exp]
_BINARY = [torch.add, torch.mul, torch.sub]


def _program(seed: int, n_ops: int, widths: tuple[int, ...]):
    """A random straight-line program f(x, *weights) and the shapes of its inputs."""
    rng = random.Random(seed)
    d0 = widths[0]
    weights = [(rng.choice(widths), rng.choice(widths)) for _ in range(3)]
    steps = []
    width = {0: d0}  # value index -> last dim (every value is [B, width] or [B, 1])
    for i in range(1, n_ops + 1):
        kind = rng.choice(["unary", "binary", "binary", "matmul", "reduce", "cat"])
        a = rng.randrange(i)
        if kind == "matmul":
            cands = [k for k, (r, _) in enumerate(weights) if r == width[a]]
            if not cands:
                kind = "unary"
            else:
                k = rng.choice(cands)
                steps.append(("matmul", a, k))
                width[i] = weights[k][1]
                continue
        if kind == "binary":
            same = [j for j in range(i) if width[j] in (width[a], 1)]
            b = rng.choice(same)
            steps.append(("binary", a, b, rng.randrange(len(_BINARY))))
            width[i] = width[a]
        elif kind == "reduce":
            steps.append(("reduce", a))
            width[i] = 1
        elif kind == "cat":
            b = rng.randrange(i)
            steps.append(("cat", a, b))
            width[i] = width[a] + width[b]
        else:
            steps.append(("unary", a, rng.randrange(len(_UNARY))))
            width[i] = width[a]
    outs = sorted({n_ops, rng.randrange(n_ops + 1)})
    # Also return a view of an intermediate (half the time): its base must escape.
    view_out = rng.randrange(1, n_ops + 1) if rng.random() < 0.5 else None

    def f(x, *ws):
        vals = [x]
        for s in steps:
            if s[0] == "matmul":
                v = vals[s[1]] @ ws[s[2]]
            elif s[0] == "binary":
                v = _BINARY[s[3]](vals[s[1]], vals[s[2]])
            elif s[0] == "reduce":
                v = vals[s[1]].sum(-1, keepdim=True) * 0.1
            elif s[0] == "cat":
                v = torch.cat([vals[s[1]], vals[s[2]]], -1)
            else:
                v = _UNARY[s[2]](vals[s[1]])
            vals.append(torch.tanh(v) if s[0] != "unary" else v)
        res = [vals[k] for k in outs]
        if view_out is not None:
            res.append(vals[view_out].t())
        return tuple(res)

    return f, d0, weights


def _inputs(b: int, d0: int, weights, dtype, seed: int, transposed: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d0, b, generator=g).to(dtype).t() if transposed else None
    if x is None:
        x = torch.randn(b, d0, generator=g).to(dtype)
    ws = [(torch.randn(r, c, generator=g) / r**0.5).to(dtype) for r, c in weights]
    return [x, *ws]


def _ctx(example_inputs, planning: bool = True) -> PassContext:
    return PassContext(
        options=parse_options({"memory_planning": planning}),
        report=CompileReport(),
        capabilities=Capabilities(device_type="cpu"),
        example_inputs=example_inputs,
    )


def _trace(f, inputs):
    gm = make_fx(f, tracing_mode="symbolic")(*inputs)
    ph = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    return gm, ph


def assert_no_overlap(plan: mp.MemoryPlan, sig) -> None:
    """Every pair of slots live at the same step occupies disjoint, aligned bytes."""
    lay = plan.evaluate(sig)
    for s in plan.slots:
        assert lay.offsets[s.index] % plan.alignment == 0
        end = lay.offsets[s.index] + lay.sizes[s.index]
        assert end <= lay.arena_bytes[s.device]
    for a, b in itertools.combinations(plan.slots, 2):
        if a.device != b.device or a.end < b.start or b.end < a.start:
            continue
        if not lay.sizes[a.index] or not lay.sizes[b.index]:
            continue
        a0, b0 = lay.offsets[a.index], lay.offsets[b.index]
        assert a0 + lay.sizes[a.index] <= b0 or b0 + lay.sizes[b.index] <= a0, (
            f"{a.members} and {b.members} overlap at {sig}"
        )
    # Every buffer fits in its slot.
    for i, buf in enumerate(plan.buffers):
        numel = 1
        for d in lay.shapes[i]:
            numel *= d
        assert numel * buf.dtype.itemsize <= lay.sizes[buf.slot] or numel == 0


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    seed=st.integers(0, 10_000),
    n_ops=st.integers(3, 14),
    widths=st.sampled_from([(8,), (8, 16), (4, 12, 24)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    transposed=st.booleans(),
)
def test_random_programs_plan_never_overlaps_and_matches_eager(
    seed, n_ops, widths, dtype, transposed
):
    f, d0, weights = _program(seed, n_ops, widths)
    gm, ph = _trace(f, _inputs(6, d0, weights, dtype, seed, transposed))
    ctx = _ctx(ph)
    mp.memory_plan(gm, ctx)
    plan = ctx.artifacts.get("memory_plan")
    off_gm, off_ph = _trace(f, _inputs(6, d0, weights, dtype, seed, transposed))
    run_off = build_wrapper(off_gm, _ctx(off_ph, planning=False), {})
    run_on = build_wrapper(gm, ctx, {})
    if plan is not None:
        assert "out=_bufs[" in run_on.source
        mem = ctx.report.memory
        assert mem["planned_peak_bytes"] <= mem["arena_bytes"] <= mem["naive_bytes"]
        for sig in {plan.hint_sig, tuple(v * 3 + 1 for v in plan.hint_sig)}:
            assert_no_overlap(plan, sig)
    kept = []
    for b, s in ((6, 1), (6, 2), (11, 3), (3, 4)):  # same shape twice: cached views reused
        inputs = _inputs(b, d0, weights, dtype, seed + s, transposed)
        expected = f(*inputs)
        got = run_on(list(inputs))
        off = run_off(list(inputs))
        torch.testing.assert_close(got, off, rtol=0, atol=0)  # identical with planning off
        torch.testing.assert_close(got, expected, **tolerances(dtype))
        kept.append((got, expected))
    # Outputs never live in the arena: later calls did not overwrite earlier results.
    for got, expected in kept:
        torch.testing.assert_close(got, expected, **tolerances(dtype))


def test_planned_peak_is_below_naive_sum_for_a_chain():
    def f(x, w):
        for _ in range(6):
            x = torch.tanh(x @ w) + x
        return x.sum(-1)

    gm, ph = _trace(f, [torch.randn(5, 16), torch.randn(16, 16)])
    ctx = _ctx(ph)
    assert mp.memory_plan(gm, ctx) > 0
    mem = ctx.report.memory
    # A chain keeps ~2 buffers alive at a time: the arena is far below the naive sum.
    assert mem["arena_bytes"] * 3 <= mem["naive_bytes"]
    assert mem["inplace_reuses"] > 0
    assert "used" in mem["layout"] and "mm" in mem["layout"]


def test_graph_inputs_outputs_and_escaping_views_are_never_planned():
    def f(x, w):
        h = torch.relu(x @ w)
        g = torch.tanh(h @ w) * 2
        return g.t(), torch.sigmoid(g) + h, x.add_(1)

    gm, ph = _trace(f, [torch.randn(5, 8), torch.randn(8, 8)])
    ctx = _ctx(ph)
    plan = mp.plan_memory(gm, ctx)
    assert plan is not None
    names = set(plan.index)
    assert names, "nothing planned: the test would prove nothing"
    outs = {n.name for n in gm.graph.find_nodes(op="output")[0].all_input_nodes}
    placeholders = {n.name for n in gm.graph.find_nodes(op="placeholder")}
    assert not names & placeholders
    assert not names & outs
    # g escapes through its view g.t(): it must not be planned either.
    g = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    assert g.name not in names


def test_no_recompile_for_new_lengths_and_layout_evaluated_per_shape():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(5))

        def forward(self, x):
            for lin in self.layers:
                x = torch.nn.functional.silu(lin(x)) * 2 + x
            return x

    m = M().eval()
    c = yirage_compile(m)
    yirage_dynamo.clear_reports()
    with torch.no_grad():
        for n in (4, 9, 17, 9):
            x = torch.randn(n, 16)
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(c(x), m(x), **tolerances(torch.float32))
    reps = yirage_dynamo.reports()
    assert len(reps) == 1, "a new length must not recompile"
    mem = reps[0].memory
    assert mem["buffers"] >= mp.MIN_BUFFERS and mem["applied"]
    assert any(ch.isalpha() for ch in mem["naive_bytes_expr"]), "sizes should be symbolic"


def test_memory_planning_option_off_leaves_wrapper_unplanned():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = yirage_compile(m, memory_planning=False)(x)
    torch.testing.assert_close(out, m(x))
    rep = yirage_dynamo.last_report()
    assert rep.memory is None
    assert all(p.matches == 0 for p in rep.passes if p.name == "memory_plan")


def test_kv_cache_mutation_is_not_planned_and_stays_correct():
    class Cache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.zeros(8, 4))

        def forward(self, x, pos):
            h = torch.tanh(x * 3) + 1
            self.k.index_copy_(0, pos, h * 2)
            return (self.k.sum(0) * torch.sigmoid(h)).relu() + h

    m, ref = Cache(), Cache()
    c = yirage_compile(m)
    with torch.no_grad():
        for p in range(3):
            x, pos = torch.randn(1, 4), torch.tensor([p])
            torch.testing.assert_close(c(x, pos), ref(x, pos))
            torch.testing.assert_close(m.k, ref.k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama_with_planning_matches_eager_and_unplanned(dtype):
    from yirage_dynamo.models import build_model, random_input_ids

    model = build_model("llama", "tiny", dtype=dtype, layers=1)

    def compiled(planning: bool):
        # dynamic=True: one graph serves both lengths (the plan is evaluated per length).
        opts = {"fallback": "error", "verify": True, "memory_planning": planning}
        return torch.compile(model, backend="yirage", dynamic=True, options=opts)

    batches = [random_input_ids(model, 1, n, seed=n) for n in (7, 12)]
    with torch.no_grad():
        on = compiled(True)
        got = [on(ids).logits for ids in batches]
        mem = next(r.memory for r in reversed(yirage_dynamo.reports()) if r.memory)
        assert mem["buffers"] >= mp.MIN_BUFFERS and mem["arena_bytes"] < mem["naive_bytes"]
        torch._dynamo.reset()
        off = compiled(False)
        for ids, g in zip(batches, got):
            torch.testing.assert_close(g, model(ids).logits, **tolerances(dtype))
            torch.testing.assert_close(g, off(ids).logits, rtol=0, atol=0)


def test_debug_dumps_the_layout(tmp_path):
    m = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 16), torch.nn.Tanh()
    )
    x = torch.randn(4, 8)
    with torch.no_grad():
        yirage_compile(m, debug=True, debug_dir=str(tmp_path))(x)
    dumps = list(tmp_path.rglob("memory_plan.txt"))
    assert dumps, "no memory_plan.txt under the debug dir"
    text = dumps[0].read_text()
    assert "arena_bytes" in text and "used" in text and "address" in text


def test_arena_views_share_one_allocation_and_print_free_gaps():
    arena = Arena("cpu", alignment=64)
    arena.reserve(512)
    a = arena.view(0, torch.float32, (4, 4), (4, 1))
    b = arena.view(128, torch.bfloat16, (3, 5), (1, 3))  # column-major view
    a.fill_(1.0)
    b.fill_(2.0)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert b.data_ptr() - a.data_ptr() == 128 and b.stride() == (1, 3)
    assert torch.all(a == 1) and torch.all(b == 2)
    table = format_layout([(0, 64, "a", "x..y"), (128, 64, "b", "y..z")], 512, base=4096)
    assert "free" in table.splitlines()[2] and "0x1080" in table


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_arena_is_256_byte_aligned_and_replays_under_a_cuda_graph():
    def f(x, w):
        h = torch.relu(x @ w)
        for _ in range(3):
            h = torch.tanh(h @ w) + h
        return h.sum(-1)

    x, w = torch.randn(64, 32, device="cuda"), torch.randn(32, 32, device="cuda") / 6
    gm = make_fx(f, tracing_mode="fake")(x, w)
    ph = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    ctx = PassContext(
        options=parse_options({}),
        report=CompileReport(),
        capabilities=Capabilities(device_type="cuda"),
        example_inputs=ph,
    )
    assert mp.memory_plan(gm, ctx) > 0 and ctx.artifacts["memory_plan"].alignment == 256
    run = build_wrapper(gm, ctx, {})
    torch.testing.assert_close(run([x, w]), f(x, w))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run([x, w])  # warm-up on a side stream, as torch.cuda.graph requires
    torch.cuda.current_stream().wait_stream(side)
    ptrs = [v.data_ptr() for v in run.arena(())]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run([x, w])
    assert [v.data_ptr() for v in run.arena(())] == ptrs  # stable addresses
    for seed in range(2):
        x.copy_(torch.randn(64, 32, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.testing.assert_close(out, f(x, w))


def test_shape_cache_is_keyed_only_by_symbols_the_planned_sizes_use():
    def f(x, w, kv):
        h = torch.tanh(x @ w)
        for _ in range(3):
            h = torch.sigmoid(h @ w) * h
        return h.sum(-1) + kv.sum()  # kv's length never reaches a planned buffer

    gm, ph = _trace(f, [torch.randn(5, 8), torch.randn(8, 8), torch.randn(7, 3)])
    ctx = _ctx(ph)
    mp.memory_plan(gm, ctx)
    plan = ctx.artifacts["memory_plan"]
    kv_symbols = {d.node.expr for d in ph[2].shape}
    assert plan.symbols and not kv_symbols & set(plan.symbols)
    run = build_wrapper(gm, ctx, {})
    x, w = torch.randn(5, 8), torch.randn(8, 8)
    for n in (7, 9, 30):  # a growing "KV length": same layout, same views
        kv = torch.randn(n, 3)
        torch.testing.assert_close(run([x, w, kv]), f(x, w, kv))
    assert len(run.arena._views) == 1
