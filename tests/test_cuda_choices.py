"""CUDA lowering's choices, checked on any machine: why it is unavailable, when CUDA graphs
apply and whose runner replays them, who generates a graph's code (`cuda_codegen`), the
no-Inductor path end to end on the CPU, and the Inductor config it passes.
Kernels: tests/test_cuda.py; the runner and HF generate() on a GPU: tests/test_cuda_generate.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from yirage_dynamo.lowering import choose_lowering

from yirage_dynamo.options import parse_options

pytestmark = pytest.mark.cuda


def test_cuda_lowering_reports_why_it_is_unavailable_without_gpu():
    lowering, why = choose_lowering("cuda")
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        assert lowering.name == "triton"
    else:
        assert lowering.name == "aten" and "triton unavailable" in why


def test_cudagraphs_auto_for_static_inference_and_opt_out():
    from yirage_dynamo.lowering.cuda import inductor_config_patches, wants_cudagraphs

    x = torch.randn(2, 3)
    with torch.no_grad():
        assert inductor_config_patches(parse_options({}), [x])["triton.cudagraphs"] is True
        off = inductor_config_patches(parse_options({"cudagraphs": False}), [x])
        assert off["triton.cudagraphs"] is False
        assert wants_cudagraphs(parse_options({}, "max-autotune-no-cudagraphs"), [x])[0] is False
    w = torch.nn.Parameter(torch.randn(3))
    on, why = wants_cudagraphs(parse_options({}), [w])
    assert not on and "training" in why
    patches = inductor_config_patches(parse_options({}, "max-autotune"), [x])
    assert patches["max_autotune"] is True and patches["freezing"] is False
    assert patches["fx_graph_cache"] is False


def test_own_cuda_graph_runner_unless_inductor_trees_asked_for(monkeypatch):
    from yirage_dynamo.lowering.cuda import CUDA_GRAPHS_ENV, _own_cuda_graphs

    x = torch.randn(2, 3)
    assert _own_cuda_graphs([x, x])
    assert not _own_cuda_graphs([x, 3])  # a scalar input would be baked into a graph
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "inductor")
    assert not _own_cuda_graphs([x, x])


def test_cuda_graph_runner_runs_without_graphs_on_non_tensor_inputs(caplog):
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner

    runner = CudaGraphRunner(lambda x, k: x * k)
    x = torch.randn(3)
    for k in (2, 3, 4):
        torch.testing.assert_close(runner(x, k), x * k)
    assert runner.captures == 0 and "non-tensor" in runner.disabled
    assert "CUDA graphs off" in caplog.text


def test_cuda_codegen_auto_runs_cuda_graphed_graphs_without_inductor(monkeypatch):
    from yirage_dynamo.lowering.cuda import CODEGEN_ENV, TritonLowering, codegen

    monkeypatch.delenv(CODEGEN_ENV, raising=False)
    monkeypatch.delenv("YIRAGE_CUDA_GRAPHS", raising=False)
    x, w = torch.randn(2, 3), torch.nn.Parameter(torch.randn(3))
    with torch.no_grad():
        assert codegen(parse_options({}), [x]) == "direct"
        assert codegen(parse_options({"cudagraphs": False}), [x]) == "inductor"
        assert codegen(parse_options({}, "max-autotune-no-cudagraphs"), [x]) == "inductor"
        assert codegen(parse_options({"cuda_codegen": "inductor"}), [x]) == "inductor"
        monkeypatch.setenv("YIRAGE_CUDA_GRAPHS", "inductor")  # the trees replay Inductor's code
        assert codegen(parse_options({}), [x]) == "inductor"
        monkeypatch.delenv("YIRAGE_CUDA_GRAPHS")
        # PDL for Inductor's own kernels needs Inductor's kernels.
        monkeypatch.setattr("yirage_dynamo.lowering.cuda.pdl_mode", lambda: "all")
        assert codegen(parse_options({}), [x]) == "inductor"
        monkeypatch.setattr("yirage_dynamo.lowering.cuda.pdl_mode", lambda: "gemv")
        assert codegen(parse_options({}), [x]) == "direct"
        monkeypatch.setenv(CODEGEN_ENV, "inductor")
        assert codegen(parse_options({}), [x]) == "inductor"
        monkeypatch.setenv(CODEGEN_ENV, "fastest")
        with pytest.raises(ValueError, match=CODEGEN_ENV):
            codegen(parse_options({}), [x])
    monkeypatch.delenv(CODEGEN_ENV)
    assert codegen(parse_options({}), [w]) == "inductor"  # training: Inductor's fused code
    # Regional pieces capture nothing themselves; "auto" is decided for the stitched step.
    piece = TritonLowering().regional_options(parse_options({}), shared=True)
    assert piece.cudagraphs is False and piece.cuda_codegen == "direct"
    piece = TritonLowering().regional_options(parse_options({"cudagraphs": False}), True)
    assert piece.cuda_codegen == "inductor"


def test_inductor_cuda_graph_trees_make_the_step_compile_whole(monkeypatch):
    """The trees capture what compile_fx compiles: a step stitched from regional pieces
    would run with no CUDA graph (4.5x slower on 7B decode), so it compiles whole."""
    from yirage_dynamo.lowering.cuda import CUDA_GRAPHS_ENV, TritonLowering

    lowering, x = TritonLowering(), [torch.ones(2, 3)]
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    assert lowering.regional_refusal(x, parse_options({})) is None  # our runner: by blocks
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "inductor")
    assert "trees" in lowering.regional_refusal(x, parse_options({}))
    # No CUDA graphs at all: nothing to lose by compiling the layers once.
    assert lowering.regional_refusal(x, parse_options({"cudagraphs": False})) is None


def direct_generate_on_cpu(monkeypatch, **options):
    """A tiny Llama's static-cache generate() through the CUDA lowering's no-Inductor path
    on the CPU (the lowering forced, its Triton swaps declining CPU tensors), checked
    against eager token for token and logit for logit; returns the compile reports."""
    transformers = pytest.importorskip("transformers")
    from yirage_dynamo.lowering.cuda import TritonLowering

    import yirage_dynamo
    import yirage_dynamo.backend as backend
    import yirage_dynamo.regional_backend as regional_backend

    def triton(device):
        return TritonLowering(), "forced for the test"

    monkeypatch.setattr(backend, "choose_lowering", triton)
    monkeypatch.setattr(regional_backend, "choose_lowering", triton)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 8))
    gen = dict(
        max_new_tokens=6, do_sample=False, cache_implementation="static",
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    opts = {"fallback": "error", "cuda_codegen": "direct", "cudagraphs": False, **options}
    cc = transformers.CompileConfig(backend="yirage", mode=None, fullgraph=False, options=opts)
    cc._compile_all_devices = True  # HF compiles on CPU only when asked
    with torch.no_grad():
        ref = model.generate(ids, **gen)
        yirage_dynamo.clear_reports()
        out = model.generate(ids, compile_config=cc, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    reports = yirage_dynamo.reports()
    assert reports and all(r.lowering == "triton" and not r.fallbacks for r in reports)
    return reports


def test_direct_codegen_runs_the_post_pass_llama_graph_like_eager(monkeypatch):
    """The CUDA lowering's no-Inductor path end to end on the CPU: the backend's AOT
    capture and passes, `TritonLowering.lower` (whose Triton swaps decline CPU tensors),
    regional pieces; generate() matches eager token for token."""
    reports = direct_generate_on_cpu(monkeypatch)
    notes = [n for r in reports for n in r.notes]
    assert any("runs as is (no Inductor)" in n for n in notes), notes
    assert not any(n.startswith("inductor config") for n in notes), notes
    assert any("3 compiled" in n for n in notes), notes  # embedding | layers | head
    layer = [r for r in reports if r.patterns.get("attention")]
    assert layer and layer[0].patterns.get("rotary") and layer[0].patterns.get("gated_act")


def test_inductor_config_env_override_is_merged_last(monkeypatch):
    from yirage_dynamo.lowering.cuda import INDUCTOR_CONFIG_ENV, inductor_config_patches

    x = torch.randn(2, 3)
    monkeypatch.setenv(INDUCTOR_CONFIG_ENV, '{"combo_kernels": true, "fx_graph_cache": true}')
    with torch.no_grad():
        patches = inductor_config_patches(parse_options({}), [x])
    assert patches["combo_kernels"] is True and patches["fx_graph_cache"] is True
    assert patches["triton.cudagraphs"] is True


def test_each_cuda_switch_is_in_the_graph_cache_key(monkeypatch):
    """A benchmark flips these between variants in one process: each must key its own
    compiled programs (the second variant once ran the first one's)."""
    from yirage_dynamo.lowering import (
        cuda,
        cuda_gemv,
        cuda_gemv_fusion,
        cuda_kv_write,
        cuda_ops,
        cuda_pdl,
    )
    from yirage_dynamo.runtime.graph_cache import graph_key

    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    inputs, opts, lowering = [torch.ones(2)], parse_options({}), cuda.TritonLowering()
    switches = {
        cuda.CODEGEN_ENV: "inductor", cuda.CUDA_GRAPHS_ENV: "inductor",
        cuda.INDUCTOR_CONFIG_ENV: "{}", cuda_pdl.PDL_ENV: "gemv",
        cuda_gemv.GEMV_ENV: "off", cuda_gemv_fusion.FUSE_ENV: "on",
        cuda_kv_write.KV_WRITE_ENV: "off", cuda_kv_write.KV_POS_ENV: "off",
        cuda_kv_write.KV_COUNTERS_ENV: "off", cuda_ops.ATTN_MERGE_ENV: "search",
    }  # fmt: skip
    for env in switches:
        monkeypatch.delenv(env, raising=False)
    keys = {graph_key(gm, inputs, opts, lowering, disk=False)[0]}
    for env, value in switches.items():
        with monkeypatch.context() as m:
            m.setenv(env, value)
            keys.add(graph_key(gm, inputs, opts, lowering, disk=False)[0])
    assert None not in keys and len(keys) == 1 + len(switches)


def test_attention_merge_search_is_validated_and_for_the_direct_codegen_only(monkeypatch):
    from types import SimpleNamespace

    from yirage_dynamo.lowering.cuda_ops import (
        ATTN_MERGE_ENV,
        _split_candidates,
        merge_in_last_program,
    )

    direct = SimpleNamespace(artifacts={"cuda_codegen": "direct"})
    inductor = SimpleNamespace(artifacts={"cuda_codegen": "inductor"})
    monkeypatch.delenv(ATTN_MERGE_ENV, raising=False)
    assert not merge_in_last_program(direct)
    monkeypatch.setenv(ATTN_MERGE_ENV, "search")
    assert merge_in_last_program(direct) and not merge_in_last_program(inductor)
    monkeypatch.setenv(ATTN_MERGE_ENV, "maybe")
    with pytest.raises(ValueError, match=ATTN_MERGE_ENV):
        merge_in_last_program(direct)
    plain, merged = _split_candidates(384), _split_candidates(384, merge_last=True)
    assert merged[: len(plain)] == plain and all("merge" not in c for c in plain)
    extra = merged[len(plain) :]
    assert extra == [{**c, "merge": "last"} for c in plain[:2]]
    # A cache in one split has nothing to merge.
    assert all(c["split"] < 64 for c in _split_candidates(64, True) if c.get("merge"))
