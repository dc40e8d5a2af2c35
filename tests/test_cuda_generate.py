"""CUDA end to end: our CUDA-graph runner, and HF Llama generate() vs eager.

Everything here skips cleanly without a GPU (the runner's non-tensor fallback, which needs
none, is in tests/test_cuda_choices.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import cuda_tol as _tol
from conftest import needs_cuda, needs_triton

pytestmark = pytest.mark.cuda


# --------------------------------------------------------------------------- CUDA graphs


def _step(x, pos, cache, counter):
    """A decode-step stand-in: writes x into a static cache at pos, bumps a (non-static)
    counter in place, returns a fresh tensor and a view of the cache."""
    cache.index_copy_(0, pos, x)
    counter.add_(1)
    return (x * 2 + cache.sum(0, keepdim=True), cache[:2])


@needs_cuda
def test_cuda_graph_runner_replays_with_new_inputs_and_in_place_updates():
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner

    cache = torch.zeros(8, 4, device="cuda")
    torch._dynamo.mark_static_address(cache)
    ref_cache = cache.clone()
    counter = torch.zeros(1, device="cuda")
    runner = CudaGraphRunner(_step, mutated_inputs=frozenset({1, 2, 3}))
    kept = []
    for step in range(5):
        x = torch.randn(1, 4, device="cuda")
        pos = torch.tensor([step], device="cuda")
        out, head = runner(x, pos, cache, counter)
        ref_cache.index_copy_(0, pos, x)
        torch.testing.assert_close(out, x * 2 + ref_cache.sum(0, keepdim=True))
        torch.testing.assert_close(cache, ref_cache)
        assert head.data_ptr() == cache.data_ptr()  # a view of the static input, not a copy
        assert counter.item() == step + 1  # the non-static mutated input is copied back
        kept.append((out, out.clone()))
    # Call 1 ran eagerly, call 2 captured, later calls replayed the one graph.
    assert runner.captures == 1 and runner.disabled is None
    # Outputs handed out earlier are not overwritten by later replays.
    for out, copy in kept:
        torch.testing.assert_close(out, copy)


def test_live_runners_are_listed_in_creation_order_and_unreplayable_before_capture():
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner, live_runners, replay_ms

    a, b = CudaGraphRunner(_step), CudaGraphRunner(_step)
    mine = [r for r in live_runners() if r is a or r is b]
    assert mine == [a, b]
    assert replay_ms(a) is None  # nothing captured yet


@needs_cuda
def test_replay_ms_times_the_captured_step_on_the_gpu():
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner, replay_ms

    cache = torch.zeros(8, 4, device="cuda")
    torch._dynamo.mark_static_address(cache)
    runner = CudaGraphRunner(_step, mutated_inputs=frozenset({3}))
    counter = torch.zeros(1, device="cuda")
    for step in range(3):
        runner(
            torch.randn(1, 4, device="cuda"), torch.tensor([step], device="cuda"), cache, counter
        )
    ms = replay_ms(runner, reps=5)
    assert ms is not None and 0 < ms < 100


@needs_cuda
def test_cuda_graph_runner_recaptures_when_a_static_input_moves():
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner

    runner = CudaGraphRunner(_step)
    counter = torch.zeros(1, device="cuda")
    for _ in range(2):
        cache = torch.zeros(8, 4, device="cuda")
        torch._dynamo.mark_static_address(cache)
        for step in range(3):
            x = torch.full((1, 4), float(step + 1), device="cuda")
            runner(x, torch.tensor([step], device="cuda"), cache, counter)
        # Each cache object got exactly the writes made with it.
        torch.testing.assert_close(cache[:3, 0], torch.tensor([1.0, 2.0, 3.0], device="cuda"))
    assert runner.captures == 2


@needs_cuda
def test_cuda_graph_runner_falls_back_without_graphs_when_capture_fails(caplog):
    from yirage_dynamo.runtime.cuda_graphs import CudaGraphRunner

    def syncs(x):
        return x * float(x.sum().item())  # a host sync: not capturable

    runner = CudaGraphRunner(syncs)
    for _ in range(3):
        x = torch.randn(3, device="cuda")
        torch.testing.assert_close(runner(x), x * x.sum())
    assert runner.disabled and "capture failed" in runner.disabled
    assert "CUDA graphs off" in caplog.text


# --------------------------------------------------------------------------- end to end


def _tiny_llama(dtype, layers=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=256,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=512,
        vocab_size=512,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(cfg).to("cuda", dtype).eval()


def _eager_then_compiled(dtype, kernels: str, repeats: int, layers: int = 2, new: int = 16):
    """A tiny Llama's static-cache generate(): (prompt length, eager result, first compiled
    result, memory after each of `repeats` more compiled calls, the last one's sequences,
    the compile reports); both first results with logits. Every graph compiled through
    the Triton lowering without a fallback."""
    import transformers

    import yirage_dynamo
    from yirage_dynamo.backend import yirage

    model = _tiny_llama(dtype, layers)
    ids = torch.randint(3, 512, (1, 12), device="cuda")
    gen = dict(max_new_tokens=new, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(
            ids, disable_compile=True, output_logits=True, return_dict_in_generate=True, **gen
        )
    yirage_dynamo.clear_reports()
    # The callable, not the entry-point name: works without an installed dist-info too.
    opts = {"fallback": "error", "cuda_kernels": kernels}
    cc = transformers.CompileConfig(backend=yirage, mode=None, options=opts)
    with torch.no_grad():
        out = model.generate(
            ids, compile_config=cc, output_logits=True, return_dict_in_generate=True, **gen
        )
        mems, last = [], None
        for _ in range(repeats):
            # The previous call's result is dropped first: a kept one may keep CUDA-graph
            # trees from reusing their pool (measured +33 MiB at the 4th call).
            last = None
            last = model.generate(ids, compile_config=cc, **gen)
            torch.cuda.synchronize()
            mems.append(torch.cuda.memory_allocated())
    reports = yirage_dynamo.reports()
    assert reports and all(r.lowering == "triton" and not r.fallbacks for r in reports)
    return ids.shape[1], ref, out, mems, last, reports


def _in_our_runner(notes: list[str]) -> bool:
    """The stitched step runs in one of our CUDA-graph runners (in order, or run-ahead
    where YIRAGE_RUN_AHEAD asks for it)."""
    return any(f"runs in a {r}" in n for n in notes for r in ("CudaGraphRunner", "RunAheadRunner"))


def _assert_matches_eager(out, ref, prompt: int, dtype: torch.dtype) -> None:
    """Logits match eager at every step whose prefix tokens agree (bf16 greedy decoding
    may flip a near-tie, after which the sequences legitimately differ); fp32 agrees on
    every token."""
    if dtype == torch.float32:
        assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        tol = _tol(dtype) if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
        torch.testing.assert_close(a, b, **tol)
        if not torch.equal(out.sequences[:, prompt + step], ref.sequences[:, prompt + step]):
            break


@needs_triton
@pytest.mark.parametrize(
    "dtype,kernels,graphs",
    [
        (torch.float32, "auto", "yirage"),
        (torch.bfloat16, "auto", "yirage"),
        (torch.bfloat16, "all", "yirage"),
        (torch.bfloat16, "auto", "inductor"),
    ],
)
def test_llama_generate_static_cache_matches_eager_with_cuda_graphs(
    dtype, kernels, graphs, monkeypatch
):
    if graphs == "inductor":
        monkeypatch.setenv("YIRAGE_CUDA_GRAPHS", "inductor")  # Inductor's CUDA-graph trees

    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    prompt, ref, out, mems, again, reports = _eager_then_compiled(dtype, kernels, repeats=4)
    decode = [r for r in reports if r.patterns.get("triton_attention")]
    assert decode, [(r.patterns, r.rejected) for r in reports]
    notes = [n for r in reports for n in r.notes]
    if graphs == "inductor":
        assert any("triton.cudagraphs=True" in n for n in notes)
        # The trees capture whole compile_fx graphs: compiled by layers, the step would
        # have run with no CUDA graph at all.
        assert not any(n.startswith("regional:") for n in notes), notes
        assert counters["inductor"]["cudagraph_skips"] == skips
    else:
        assert any("cuda graphs: yirage runner" in n for n in notes), notes
        # No Inductor: each layer's rotary and both cache writes run as one kernel.
        assert decode[-1].patterns.get("triton_rotary_kv_write") == 2, decode[-1].rejected
    if kernels == "all":
        assert any(r.patterns.get("triton_rotary") for r in reports)
        # Decode GEMVs, per layer: q/k/v as one gemv3, gate/up + SiLU as one gemv_gated,
        # o and down as gemv; plus lm_head. 2 layers: every projection substituted.
        step = decode[-1].patterns
        assert step.get("triton_gemv3") == 2, (step, decode[-1].rejected)
        assert step.get("triton_gemv_gated") == 2, (step, decode[-1].rejected)
        assert step.get("triton_gemv") == 2 * 2 + 1, (step, decode[-1].rejected)
        # Both norms of each layer and the final one run as GEMV prologues; the o and
        # down projections add the skip connection in their epilogue.
        assert step.get("gemv_norm_prologue") == 2 * 2 + 1, (step, decode[-1].rejected)
        assert step.get("gemv_residual_epilogue") == 2 * 2, (step, decode[-1].rejected)
        # Each fused launch got a config measured for the fused kernel itself.
        assert step.get("gemv_fused_retuned") == 2 * 4 + 1, (step, decode[-1].rejected)
        assert not step.get("triton_rms_norm_residual") and not step.get("triton_rms_norm")
    _assert_matches_eager(out, ref, prompt, dtype)
    assert torch.equal(again, out.sequences)
    # Steady state: CUDA-graph replays allocate nothing new across generate() calls.
    assert mems[-1] <= mems[-2] <= mems[-3], mems


@needs_triton
def test_llama_generate_dynamic_cache_matches_eager():
    """HF's default cache (DynamicCache: K/V grow by cat, lengths symbolic after the first
    recompile). The static-shape graphs (prefill, first decode step) run as CUDA graphs
    whose K/V outputs HF keeps in its cache across calls: they must stay valid (under
    Inductor's CUDA-graph trees the next replay overwrote them and reading raised)."""
    import yirage_dynamo

    model = _tiny_llama(torch.float32)
    ids = torch.randint(3, 512, (1, 12), device="cuda")
    gen = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **gen)
        yirage_dynamo.clear_reports()
        model.forward = torch.compile(
            model.forward, backend="yirage", options={"fallback": "error"}
        )
        out = model.generate(ids, **gen)
    reports = yirage_dynamo.reports()
    assert reports and all(r.lowering == "triton" and not r.fallbacks for r in reports)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype,kernels", [(torch.float32, "auto"), (torch.bfloat16, "all")])
def test_llama_generate_by_repeated_layers_matches_eager(dtype, kernels):
    """Regional compilation on CUDA: the 4 layers share one Inductor compile (layer 0
    opens with a zero residual like the others' moved residual add; weights as graph
    inputs, decode GEMVs reading them), and the stitched decode step replays as one CUDA
    graph: same results as eager, no memory growth across calls."""
    prompt, ref, out, mems, _, reports = _eager_then_compiled(
        dtype, kernels, repeats=3, layers=4, new=12
    )
    _assert_matches_eager(out, ref, prompt, dtype)
    notes = [n for r in reports for n in r.notes]
    assert any("regional: 6 pieces, 3 compiled, 3 reusing" in n for n in notes), notes
    assert _in_our_runner(notes), notes
    if kernels == "all":
        # The shared layer program (weights as inputs) runs q/k/v as one GEMV launch.
        gemv3 = [r.patterns.get("triton_gemv3", 0) for r in reports]
        assert gemv3.count(1) == 1, [(r.patterns, r.rejected) for r in reports]
    assert mems[-1] <= mems[-2], mems


@needs_triton
@pytest.mark.parametrize("dtype,kernels", [(torch.float32, "auto"), (torch.bfloat16, "all")])
@pytest.mark.parametrize("name", ["qwen2", "mistral", "phi3", "gemma"])
def test_hf_decoder_families_generate_with_static_cache_like_eager(name, dtype, kernels):
    """Other decoder families through the CUDA path (regional pieces, our decode
    attention with the cache writes in the rotary kernel, one CUDA graph per step):
    Qwen2's q/k/v biases, Phi-3's fused qkv and gate_up weights, Gemma's (1 + w) norms,
    scaled embedding and GELU gate. fp32: the same tokens as eager. bf16 with "all" (our
    kernels whatever cuBLAS measures at these tiny widths; the GEMVs are fp16/bf16
    only): norms run as GEMV prologues, logits as eager's while the tokens agree."""
    import transformers
    from llm_models import VOCAB, build

    import yirage_dynamo
    from yirage_dynamo.backend import yirage

    model = build(name, layers=3).to("cuda", dtype)
    ids = torch.randint(3, VOCAB, (1, 9), device="cuda")
    gen = dict(
        max_new_tokens=12, do_sample=False, cache_implementation="static",
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    opts = {"fallback": "error", "cuda_kernels": kernels}
    cc = transformers.CompileConfig(backend=yirage, mode=None, options=opts)
    with torch.no_grad():
        ref = model.generate(ids, disable_compile=True, **gen)
        yirage_dynamo.clear_reports()
        out = model.generate(ids, compile_config=cc, **gen)
    reports = yirage_dynamo.reports()
    assert reports and all(r.lowering == "triton" and not r.fallbacks for r in reports)
    ops = ["triton_attention", "triton_rotary_kv_write"]
    if dtype == torch.bfloat16:
        ops += ["triton_gemv", "gemv_norm_prologue"]
    for op in ops:
        assert any(r.patterns.get(op) for r in reports), (op, [r.rejected for r in reports])
    if dtype == torch.bfloat16:
        # Inside each layer's regional piece too, whose weights are inputs, not constants:
        # at least one norm per layer runs as a GEMV prologue and one skip add as an
        # epilogue (how many depends on the family: Qwen2's biased q/k/v are three GEMVs
        # of one normalised row, which the prologue form does not take).
        layers = [r for r in reports if r.patterns.get("triton_rotary_kv_write")]
        assert layers, [r.patterns for r in reports]
        for r in layers:
            n = r.patterns["triton_rotary_kv_write"]
            assert r.patterns.get("gemv_norm_prologue", 0) >= n, (r.patterns, r.rejected)
            assert r.patterns.get("gemv_residual_epilogue", 0) >= n, (r.patterns, r.rejected)
    _assert_matches_eager(out, ref, ids.shape[1], dtype)
    assert _in_our_runner([n for r in reports for n in r.notes])
