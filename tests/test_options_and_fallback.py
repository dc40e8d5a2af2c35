"""Options are validated up front; failures fall back (or raise with fallback='error')."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import yirage_dynamo
from yirage_dynamo.options import parse_options


def test_backend_is_registered_in_a_fresh_interpreter():
    code = "import torch, sys; sys.exit(0 if 'yirage' in torch._dynamo.list_backends() else 1)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_changes_no_global_torch_state():
    code = (
        "import torch, torch._dynamo.config as d, torch._inductor.config as i;"
        "before=(repr(d.get_config_copy()), repr(i.get_config_copy()));"
        "import yirage_dynamo, yirage_dynamo.backend;"
        "after=(repr(d.get_config_copy()), repr(i.get_config_copy()));"
        "raise SystemExit(0 if before == after else 1)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_option_key_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="'devcie'.*valid options are"):
        parse_options({"devcie": "cpu"})
    model = torch.nn.Linear(3, 3)
    compiled = torch.compile(model, backend="yirage", options={"devcie": "cpu"})
    with pytest.raises(Exception, match="devcie"):
        compiled(torch.randn(2, 3))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"device": "tpu"}, "device"),
        ({"fallback": "never"}, "fallback"),
        ({"debug": "yes"}, "debug"),
        ({"passes": {"no_such_pass": False}}, "passes"),
        ({"passes": {"cse": "off"}}, "passes"),
        ({"cuda_codegen": "triton"}, "cuda_codegen"),
    ],
)
def test_bad_option_value_names_key_and_accepted_values(options, key):
    with pytest.raises(ValueError, match=key):
        parse_options(options)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        parse_options(None, mode="fastest")


def test_environment_overrides_apply_when_option_not_given(monkeypatch, tmp_path):
    monkeypatch.setenv("YIRAGE_DEBUG", "1")
    monkeypatch.setenv("YIRAGE_CACHE_DIR", str(tmp_path))
    opts = parse_options({})
    assert opts.debug is True and opts.cache_path == tmp_path
    assert parse_options({"debug": False}).debug is False


def test_disabling_a_pass_by_name_skips_it():
    fn = torch.compile(
        lambda x: x.sin() + x.sin(),
        backend="yirage",
        options={"passes": {"cse": False}, "fallback": "error"},
    )
    x = torch.randn(4)
    torch.testing.assert_close(fn(x), 2 * x.sin())
    assert "cse" not in [p.name for p in yirage_dynamo.last_report().passes]


@torch.library.custom_op("yirage_test::opaque_scale", mutates_args=())
def opaque_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@opaque_scale.register_fake
def _(x):
    return torch.empty_like(x)


def _uses_unsupported_op(x):
    return torch.ops.yirage_test.opaque_scale(x.cos()) + 1


def test_unsupported_op_falls_back_to_eager_and_report_says_why(caplog):
    x = torch.randn(5)
    compiled = torch.compile(_uses_unsupported_op, backend="yirage", options={"fallback": "eager"})
    with caplog.at_level(logging.WARNING, logger="yirage_dynamo"):
        torch.testing.assert_close(compiled(x), _uses_unsupported_op(x))
    report = yirage_dynamo.last_report()
    assert [f.to for f in report.fallbacks] == ["eager"]
    assert report.fallbacks[0].stage == "lowering"
    assert "yirage_test.opaque_scale" in report.fallbacks[0].reason
    assert "lowering" in caplog.text and "opaque_scale" in caplog.text


def test_unsupported_op_falls_back_to_inductor_by_default():
    x = torch.randn(5)
    compiled = torch.compile(_uses_unsupported_op, backend="yirage")
    torch.testing.assert_close(compiled(x), _uses_unsupported_op(x))
    report = yirage_dynamo.last_report()
    assert [f.to for f in report.fallbacks] == ["inductor"]


def test_fallback_error_raises_instead():
    compiled = torch.compile(_uses_unsupported_op, backend="yirage", options={"fallback": "error"})
    with pytest.raises(Exception, match="opaque_scale"):
        compiled(torch.randn(5))


def test_report_records_device_choice_and_pass_node_counts():
    compiled = torch.compile(lambda x: (x + 0).relu() * 2, backend="yirage")
    compiled(torch.randn(3))
    report = yirage_dynamo.last_report()
    assert report.device == "cpu" and "cpu" in report.device_reason
    assert report.passes[0].name == "remove_noops" and report.passes[0].matches == 1
    for prev, cur in zip(report.passes, report.passes[1:]):
        assert cur.nodes_before == prev.nodes_after
    assert report.nodes_out == report.passes[-1].nodes_after
    assert "remove_noops" in str(report)
    assert yirage_dynamo.CompileReport.from_json(report.to_json()).to_dict() == report.to_dict()


def test_debug_dumps_graph_after_each_pass_and_wrapper(tmp_path):
    compiled = torch.compile(
        lambda x: x.exp().sum(),
        backend="yirage",
        options={"debug": True, "debug_dir": str(tmp_path), "fallback": "error"},
    )
    compiled(torch.randn(4))
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert "00_input.txt" in files
    assert any(f.endswith("_dce.txt") for f in files)
    wrappers = [p for p in tmp_path.rglob("wrapper_*.py")]
    assert wrappers and "def call(args)" in wrappers[0].read_text()


def test_failure_on_first_call_restores_written_inputs_before_running_eagerly(monkeypatch):
    from yirage_dynamo.lowering.cpu import CppLowering

    def broken_lower(self, gm, ctx):
        def run(args):
            args[0].add_(100)  # a write lands, then the program fails half-way
            raise RuntimeError("kernel crashed")

        return run

    monkeypatch.setattr(CppLowering, "lower", broken_lower)

    def fn(x, y):
        x.add_(1)
        return x * y

    x, y = torch.randn(4), torch.randn(4)
    expected_x = x + 1
    compiled = torch.compile(fn, backend="yirage", options={"fallback": "eager"})
    with torch.no_grad():
        out = compiled(x, y)
    torch.testing.assert_close(x, expected_x)  # written once, not 1 + 100 + 1
    torch.testing.assert_close(out, expected_x * y)
    assert yirage_dynamo.last_report().fallbacks[-1].stage == "runtime"
