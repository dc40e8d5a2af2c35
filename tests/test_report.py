"""Compile reports (stage times, node counts, JSON, report dir), graph-break summaries and
run-time profiling ranges of the generated wrapper."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tolerances, yirage_compile
from torch.fx.experimental.proxy_tensor import make_fx
from yirage_dynamo.runtime.wrapper import build_wrapper

import yirage_dynamo
from yirage_dynamo import backend
from yirage_dynamo.profiling import kernel_time_table
from yirage_dynamo.report import CompileReport, FallbackRecord, KernelRecord, PassRecord


def _mlp(x, w, b):
    h = torch.nn.functional.gelu(x @ w + b)
    return (h * h).sum(-1)


def _inputs(dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g).to(dtype)
    w = torch.randn(16, 16, generator=g).to(dtype).requires_grad_(requires_grad)
    b = torch.randn(16, generator=g).to(dtype).requires_grad_(requires_grad)
    return x, w, b


def _count(gm: torch.fx.GraphModule) -> int:
    return len([n for n in gm.graph.nodes if n.op not in ("placeholder", "output")])


@pytest.fixture
def spy_pipeline(monkeypatch):
    """Node counts of the graphs the pipeline receives and hands to the lowering."""
    seen: list[tuple[int, int, int]] = []
    real = backend.run_pipeline

    def spy(gm, ctx):
        before = _count(gm)
        out = real(gm, ctx)
        externs = sum(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
        seen.append((before, _count(gm), externs))
        return out

    monkeypatch.setattr(backend, "run_pipeline", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_report_stages_sum_to_at_most_total_and_node_counts_match(dtype, spy_pipeline):
    yirage_dynamo.clear_reports()
    x, w, b = _inputs(dtype)
    with torch.no_grad():
        out = yirage_compile(_mlp)(x, w, b)
    torch.testing.assert_close(out, _mlp(x, w, b), **tolerances(dtype))
    (report,) = yirage_dynamo.reports()
    stages = report.top_level_stages
    for name in ("dynamo_trace", "device_selection", "aot_autograd", "passes", "lowering"):
        assert stages.get(name, -1) >= 0, f"stage {name} missing: {report.stages}"
    assert stages["dynamo_trace"] > 0 and report.dynamo_compile_id == "0/0"
    assert sum(stages.values()) <= report.total_seconds + 1e-9
    assert sum(p.seconds for p in report.passes) <= stages["passes"] + 1e-9
    ((nodes_in, nodes_out, externs),) = spy_pipeline
    assert (report.nodes_in, report.nodes_out) == (nodes_in, nodes_out)
    assert report.passes[0].nodes_before == nodes_in
    assert report.passes[-1].nodes_after == nodes_out
    if not report.kernels:  # generated kernels replace extern calls; without any, all are
        assert report.extern_calls == externs


def _affine_sq(x, w, b):
    return ((x @ w + b) * x).sum(-1)


def test_dynamo_trace_time_falls_back_to_frame_start_without_the_metric(monkeypatch):
    from torch._dynamo import utils as dynamo_utils

    class NoTracingMetric(dict):
        def get(self, key, default=None):  # as if this torch did not record the metric
            return default if key == "bytecode_tracing" else super().get(key, default)

    monkeypatch.setattr(dynamo_utils, "compilation_time_metrics", NoTracingMetric())
    x, w, b = _inputs()
    with torch.no_grad():
        yirage_compile(_mlp)(x, w, b)
    report = yirage_dynamo.last_report()
    assert report.stages["dynamo_trace"] > 0
    assert sum(report.top_level_stages.values()) <= report.total_seconds + 1e-9


def test_backend_called_outside_dynamo_has_no_dynamo_trace_stage():
    gm = torch.fx.symbolic_trace(lambda x: (x.sin() + 1,))  # Dynamo graphs return tuples
    x = torch.randn(5)
    fn = backend.yirage(gm, [x], options={"fallback": "error"})
    torch.testing.assert_close(fn(x), (x.sin() + 1,))
    report = yirage_dynamo.last_report()
    assert report.dynamo_compile_id is None and "dynamo_trace" not in report.stages


def test_training_reports_forward_and_backward_each_with_consistent_totals():
    yirage_dynamo.clear_reports()
    x, w, b = _inputs(requires_grad=True)
    yirage_compile(_affine_sq)(x, w, b).sum().backward()
    w_ref, b_ref = w.detach().requires_grad_(), b.detach().requires_grad_()
    _affine_sq(x, w_ref, b_ref).sum().backward()
    torch.testing.assert_close((w.grad, b.grad), (w_ref.grad, b_ref.grad))
    by_kind = {r.kind: r for r in yirage_dynamo.reports()}
    assert set(by_kind) == {"forward", "backward"}
    for r in by_kind.values():
        assert sum(r.top_level_stages.values()) <= r.total_seconds + 1e-9
        assert r.nodes_in > 0 and r.nodes_out > 0
    assert "dynamo_trace" in by_kind["forward"].stages
    # The backward is a separate graph compiled later, by the same Dynamo frame compile.
    assert "dynamo_trace" not in by_kind["backward"].stages
    assert by_kind["backward"].dynamo_compile_id == by_kind["forward"].dynamo_compile_id
    assert by_kind["backward"].graph_id != by_kind["forward"].graph_id


def test_report_dir_option_writes_json_per_graph_that_round_trips(tmp_path):
    yirage_dynamo.clear_reports()
    x, w, b = _inputs()
    with torch.no_grad():
        yirage_compile(_mlp, report=str(tmp_path))(x, w, b)
    report = yirage_dynamo.last_report()
    path = tmp_path / f"graph_{report.graph_id}_{report.kind}.json"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert CompileReport.from_json(path.read_text()).to_dict() == report.to_dict()
    assert json.loads(path.read_text())["stages"]["total"] == report.total_seconds


def test_yirage_report_env_var_writes_json(tmp_path, monkeypatch):
    monkeypatch.setenv("YIRAGE_REPORT", str(tmp_path / "env"))
    x, w, b = _inputs()
    with torch.no_grad():
        yirage_compile(_mlp)(x, w, b)
    (written,) = (tmp_path / "env").iterdir()
    assert (
        CompileReport.from_json(written.read_text()).graph_id
        == yirage_dynamo.last_report().graph_id
    )


def _full_report() -> CompileReport:
    return CompileReport(
        kind="inference",
        device="cpu",
        device_reason="all tensor inputs on cpu",
        lowering="cpp",
        stages={"dynamo_trace": 0.5, "passes": 0.25, "lowering/kernel_compile": 0.2, "total": 1},
        passes=[PassRecord("cse", 0.01, 10, 8, 2)],
        patterns={"rms_norm": 2},
        rejected=["attention: mask is not causal"],
        kernels=[KernelRecord("k0_fused_add", "cpu", "/tmp/k0.cpp", ["add", "mul"])],
        fallbacks=[FallbackRecord("lowering", "NotImplementedError: x", "eager")],
        memory={"arena_bytes": 4096, "layout": [1, 2]},
        cache={"hits": 1, "misses": 2},
    )


def test_report_json_round_trip_keeps_every_field():
    report = _full_report()
    again = CompileReport.from_json(report.to_json())
    assert again == report
    assert again.kernels[0].origins == ["add", "mul"]


def test_report_from_json_ignores_fields_it_does_not_know():
    data = json.loads(_full_report().to_json())
    data["added_by_a_newer_version"] = 1
    assert CompileReport.from_dict(data).patterns == {"rms_norm": 2}


def test_nested_stage_is_recorded_under_its_parent():
    report = CompileReport()
    with report.stage("lowering"):
        with report.stage("cpp_build"):
            pass
        with report.stage("lowering/already_qualified"):
            pass
    with report.stage("passes"):
        pass
    assert list(report.stages) == [
        "lowering/cpp_build",
        "lowering/already_qualified",
        "lowering",
        "passes",
    ]
    assert list(report.top_level_stages) == ["lowering", "passes"]
    assert report.stages["lowering"] >= report.stages["lowering/cpp_build"]
    assert "_open_stages" not in report.to_dict()


def test_sub_stages_are_left_out_of_the_top_level_sum():
    report = _full_report()
    assert report.top_level_stages == {"dynamo_trace": 0.5, "passes": 0.25}
    del report.stages["total"]
    assert report.total_seconds == 0.75


def test_report_str_lists_stages_kernels_cache_patterns_memory_and_fallbacks():
    text = str(_full_report())
    for needle in (
        "dynamo_trace",
        "lowering/kernel_compile",
        "kernel k0_fused_add [cpu] /tmp/k0.cpp <- add, mul",
        "cache: hits=1, misses=2",
        "patterns: rms_norm=2",
        "rejected attention: mask is not causal",
        "memory: arena_bytes=4096",
        "FALLBACK at lowering -> eager",
    ):
        assert needle in text, needle
    assert "layout" not in text


def test_explain_summarises_graph_breaks_of_a_whole_model():
    def model(x):
        x = torch.sin(x) + 1
        torch._dynamo.graph_break()
        return torch.cos(x) * 2

    summary = yirage_dynamo.explain(model, torch.randn(8))
    assert (summary.graph_count, summary.graph_break_count) == (2, 1)
    assert "graph_break" in summary.breaks[0].reason
    assert any("test_report.py" in w for w in summary.breaks[0].where)
    assert summary.to_dict()["graph_break_count"] == 1
    assert "graph breaks 1" in str(summary)


def _aten_graph():
    def f(x, y):
        return torch.relu(x @ y).sum(-1)

    x, y = torch.randn(8, 8), torch.randn(8, 8)
    return make_fx(f)(x, y), (x, y), f


def test_plain_wrapper_body_has_no_profiler_ranges():
    gm, _, _ = _aten_graph()
    source = build_wrapper(gm, None, {}).source
    plain = source.split("def call_profiled")[0]
    assert "def call(args)" in plain and "_record_function" not in plain
    assert source.count("with _record_function(") == _count(gm) + 1  # per node + whole call


def test_profiler_trace_names_every_extern_call_and_kernel():
    gm, (x, y), f = _aten_graph()

    class Kernel:  # a compiled kernel as lowerings hand it to the wrapper
        kernel_name = "k0_double"

        def __call__(self, t):
            return t * 2

    # Route the relu through a call_module node so the kernels dict is exercised.
    gm.add_submodule("fused0", torch.nn.ReLU())
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    with gm.graph.inserting_before(relu):
        mod = gm.graph.call_module("fused0", relu.args)
    relu.replace_all_uses_with(mod)
    gm.graph.erase_node(relu)
    gm.recompile()
    run = build_wrapper(gm, None, {"fused0": Kernel()})
    assert "k0_double" in run.source
    with torch.profiler.profile() as prof:
        for _ in range(3):
            out = run([x, y])
    # The kernel (not the module's relu) ran: negative products survive, doubled.
    torch.testing.assert_close(out, ((x @ y) * 2).sum(-1))
    rows, step_us = kernel_time_table(prof.events())
    counts = {r.name: r.count for r in rows}
    assert counts == {"aten_mm_default": 3, "k0_double": 3, "aten_sum_dim_IntList": 3}
    assert step_us > 0 and all(0 <= r.percent <= 100 for r in rows)


def test_compiled_model_ops_appear_by_name_in_torch_profiler_trace():
    x, w, b = _inputs()
    compiled = yirage_compile(_mlp)
    with torch.no_grad():
        compiled(x, w, b)
        with torch.profiler.profile() as prof:
            out = compiled(x, w, b)
    torch.testing.assert_close(out, _mlp(x, w, b))
    names = {e.name for e in prof.events()}
    assert any(n.startswith("[yirage] wrapper_") for n in names)
    rows, _ = kernel_time_table(prof.events())
    assert rows and all(r.count >= 1 for r in rows if not r.name.startswith("("))


class _Evt:
    """The FunctionEvent fields the kernel tables read."""

    def __init__(self, name, us, device="cpu", parent=None, annotation=False):
        cuda = device == "cuda"
        self.name, self.cpu_parent, self.is_user_annotation = name, parent, annotation
        self.device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        self.cpu_time_total = 0.0 if cuda else us
        self.device_time_total = us


def test_kernel_tables_attribute_time_to_kernels_and_to_code_outside_graphs():
    from yirage_dynamo.profiling import device_kernel_table, format_kernel_table

    step = _Evt("yirage_step", 1000.0)
    wrapper = _Evt("[yirage] wrapper_abc", 600.0, parent=step)
    events = [step, wrapper, _Evt("aten_mm_default", 400.0, parent=wrapper)]
    events += [_Evt("k0_fused", 100.0, parent=wrapper), _Evt("k0_fused", 50.0, parent=wrapper)]
    events += [_Evt("aten::mm", 390.0, parent=events[2])]  # below a kernel range: not a row
    rows, step_us = kernel_time_table(events)
    table = {r.name: (r.count, r.total_us, round(r.percent, 3)) for r in rows}
    assert step_us == 1000.0
    assert table == {
        "aten_mm_default": (1, 400.0, 40.0),
        "k0_fused": (2, 150.0, 15.0),
        "(outside compiled graphs)": (0, 400.0, 40.0),
    }
    assert "k0_fused" in format_kernel_table(rows, step_us)

    gpu = [step, _Evt("sgemm", 300.0, "cuda"), _Evt("sgemm", 100.0, "cuda")]
    gpu += [_Evt("yirage_step", 1000.0, "cuda", annotation=True)]
    rows, step_us = device_kernel_table(gpu)
    assert [(r.name, r.count, r.total_us, r.percent) for r in rows] == [("sgemm", 2, 400.0, 40.0)]
