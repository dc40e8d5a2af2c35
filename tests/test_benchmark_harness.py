"""The CUDA benchmark's interleaved A/Bs compile every variant on one model in one
process. Dynamo reuses a compiled graph for any backend that compares equal, so variants
that differ only by an environment switch need backends of their own, or each would
time the first one's program (RESULTS.md, seventeenth session)."""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))


def test_every_yirage_variant_of_the_cuda_benchmark_compiles_its_own_program():
    pytest.importorskip("transformers")
    from bench_cuda_llama import ENV_VARIANTS, variant_configs

    configs = variant_configs({})
    names = ["yirage", *ENV_VARIANTS]
    wrappers = {
        n: torch._TorchCompileWrapper(configs[n].backend, configs[n].mode, configs[n].options, None)
        for n in names
    }
    for a, b in itertools.combinations(names, 2):
        assert wrappers[a] != wrappers[b], (a, b)


def test_equal_backends_share_dynamos_compiled_code():
    """The mechanism itself, so that a torch upgrade that changes it shows here."""
    compiles = []

    def backend(gm, example_inputs, **kwargs):
        compiles.append(1)
        return gm.forward

    def f(x):
        return x + 1

    x = torch.ones(3)
    torch.compile(f, backend=backend, options={"k": 1})(x)
    torch.compile(f, backend=backend, options={"k": 1})(x)
    assert len(compiles) == 1
    torch.compile(f, backend=functools.partial(backend), options={"k": 1})(x)
    assert len(compiles) == 2


def test_cache_positions_are_put_back_after_steps_timed_over_and_over():
    """Timing one decode step again and again advances HF's per-layer write counters; past
    the cache's end the writes would leave it (RESULTS.md, nineteenth session)."""
    transformers = pytest.importorskip("transformers")
    from cuda_step_timing import cache_positions_kept

    cfg = transformers.LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=64, vocab_size=100,
    )  # fmt: skip
    cache = transformers.StaticCache(config=cfg, max_cache_len=16)
    kv = torch.randn(1, 2, 3, 8)
    for layer in range(2):
        cache.update(kv, kv, layer)
    counters = [layer.cumulative_length for layer in cache.layers]
    if not all(isinstance(c, torch.Tensor) for c in counters):
        pytest.skip("this transformers' StaticCache counts positions on the host")
    reset, room = cache_positions_kept({"past_key_values": cache})
    assert room == 16 - 3
    for c in counters:
        c.add_(5)  # five timed steps
    reset()
    assert [int(c) for c in counters] == [3, 3]
    # Nothing to keep without a static cache: no reset, no limit.
    reset, room = cache_positions_kept({})
    reset()
    assert room >= 10**9


def _event(name: str, cat: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "args": {}}


def test_trace_split_divides_each_token_into_our_call_hf_work_and_gpu_time(tmp_path):
    """Three decode calls 1000 µs apart: our call 100 µs, HF's sync 500 µs after it
    returns (blocked 50 µs), two overlapping kernels per token, one inside our call."""
    import gzip
    import json

    from trace_split import format_split, load, split_per_token

    events = [_event("aten::add", "cpu_op", 5, 1)]  # before any call: ignored
    for k in range(3):
        t = 1000.0 * k
        events += [
            _event("Torch-Compiled Region: 0/0", "cpu_op", t, 100),
            _event("cudaStreamSynchronize", "cuda_runtime", t + 20, 5),  # ours: inside
            _event("cudaStreamSynchronize", "cuda_runtime", t + 600, 50),
            _event("kernel_a", "kernel", t + 50, 300),
            _event("kernel_b", "kernel", t + 250, 200),  # overlaps a: 100 µs counted once
        ]
    path = tmp_path / "t_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events + [{"ph": "M", "name": "meta"}]}, f)
    split = split_per_token(load(path), skip=0)
    assert split["tokens"] == 2
    assert split["period"] == 1000 and split["our call"] == 100
    assert split["after the call"] == 600 - 100
    assert split["sync waits"] == 50
    assert split["before the call"] == 1000 - 650
    assert split["GPU busy"] == 400
    assert "500  after the call" in format_split(split)
    with pytest.raises(ValueError, match="need 2"):
        split_per_token(events, skip=2)


def test_run_ahead_periods_split_each_quarter_of_a_sequence_by_mode():
    """profile_run_ahead_periods.quarters: per quarter of a sequence's decode calls, the
    median call-to-call period (ms, with the count) of the calls that handed out a step
    started ahead (A) and of the others (O); a quarter no call reached prints "-"."""
    from profile_run_ahead_periods import quarters

    t, log = 0.0, []
    for k in range(17):  # 16 periods: 2 ms in order, 1 ms ahead from call 7 on
        ahead = k >= 7
        t += 0.001 if ahead else 0.002
        log.append((t, ahead))
    assert quarters(log, 17) == "O 2.000 (4) | A 1.000 (2) O 2.000 (2) | A 1.000 (4) | A 1.000 (4)"
    assert quarters(log[:9], 17) == "O 2.000 (4) | A 1.000 (2) O 2.000 (2) | - | -"
