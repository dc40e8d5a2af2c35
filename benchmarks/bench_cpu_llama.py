"""CPU decode benchmark: eager vs Inductor vs yirage, HF Llama in the SmolLM-135M shape.

    .venv/bin/python benchmarks/bench_cpu_llama.py [--new-tokens 128] [--prompt 128] [--rounds 5]

One invocation measures all three backends, each in fresh subprocesses (so caches, RSS
and compile state do not leak between them): a "cold" process with empty Inductor and
yirage caches, then a "warm" process reusing those caches. Per backend it reports decode
tok/s, achieved GB/s (weight bytes streamed per token x tok/s), prefill ms, cold and warm
compile seconds (first short generate() minus the same call once compiled), peak RSS, and
host time per decode step of a 30-layer model of width 64 (compute ~0: the per-step
Python/dispatch overhead). Random weights (no download); fp32; static cache; greedy.
Then (`--rounds`, default 5) an interleaved comparison in one process: every backend's
decode tok/s measured round by round, generate() calls alternating between backends, so
that this shared VM's slow spells hit every backend alike; it reports the median per
backend and of the per-round yirage / Inductor ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SMOL = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)
TINY = dict(
    SMOL,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


def _model(cfg: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


class _Stamps:
    """A generate() streamer that only timestamps each emitted token.

    Median inter-token time is robust to the bursts of load on a shared machine, where a
    total-time average is not."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def median_step(self) -> float:
        gaps = sorted(b - a for a, b in zip(self.times[1:], self.times[2:]))
        return gaps[len(gaps) // 2]


ENV_VARIANTS = {
    # Regional compilation off: the graph compiled whole.
    "yirage_whole": ("YIRAGE_REGIONAL", "0"),
    # The layers' step-counter increments run in the last piece (CUDA's choice).
    "yirage_defer": ("YIRAGE_REGIONAL_DEFER_INCREMENTS", "1"),
}


def _generate(model, ids, n: int, backend: str | None, streamer=None):
    from transformers.generation import CompileConfig

    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
    if streamer is not None:
        kw["streamer"] = streamer
    if backend in ENV_VARIANTS:  # "yirage" with an environment override
        name, value = ENV_VARIANTS[backend]
        os.environ[name] = value
        try:
            return _generate(model, ids, n, "yirage", streamer)
        finally:
            del os.environ[name]
    if backend is not None:
        cc = CompileConfig(backend=backend, fullgraph=False)
        cc._compile_all_devices = True
        kw["compile_config"] = cc
    else:
        kw["disable_compile"] = True
    return model.generate(ids, **kw)


def child(backend: str, prompt: int, new: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    name = None if backend == "eager" else backend
    if backend == "yirage":
        import yirage_dynamo  # noqa: F401 - registers nothing globally; backend via entry point
    out: dict = {"backend": backend}
    with torch.no_grad():
        model = _model(SMOL)
        ids = torch.randint(0, SMOL["vocab_size"], (1, prompt))
        # Every call uses the same lengths: a different static-cache size would recompile.
        t = time.perf_counter()
        _generate(model, ids, new, name)
        first = time.perf_counter() - t
        stamps = _Stamps()
        t = time.perf_counter()
        res = _generate(model, ids, new, name, stamps)
        again = time.perf_counter() - t
        out["compile_s"] = max(first - again, 0.0)
        # put() sees the prompt at once, then each token: the first gap is the prefill.
        out["prefill_ms"] = (stamps.times[1] - t) * 1e3
        assert res.shape[1] == prompt + new
        out["tokens"] = res[0, -new:].tolist()
        out["decode_tok_s"] = 1.0 / stamps.median_step()
        out["decode_tok_s_mean"] = (new - 1) / (stamps.times[-1] - stamps.times[1])
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        out["weight_mb"] = weights / 1e6
        out["gb_s"] = weights * out["decode_tok_s"] / 1e9
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # host overhead: a 30-layer model of width 64 (its compute is negligible). Dynamo
        # reset first: otherwise its second model's shapes are made dynamic (automatic
        # dynamic shapes) and this would time a dynamic graph, not the static decode step.
        torch._dynamo.reset()
        tiny = _model(TINY)
        tids = torch.randint(0, TINY["vocab_size"], (1, 8))
        _generate(tiny, tids, 34, name)
        tiny_stamps = _Stamps()
        _generate(tiny, tids, 34, name, tiny_stamps)
        out["host_us_per_step"] = tiny_stamps.median_step() * 1e6
    if backend == "yirage":
        import yirage_dynamo

        reps_ = yirage_dynamo.reports()
        out["yirage_kernels"] = sum(len(r.kernels) for r in reps_)
        out["yirage_cache"] = [r.cache for r in reps_]
        out["yirage_graph_cache"] = [r.graph_cache for r in reps_]
        out["yirage_fallbacks"] = [str(f) for r in reps_ for f in r.fallbacks]
    return out


def interleaved(backends: list[str], prompt: int, new: int, threads: int, rounds: int) -> dict:
    """Decode tok/s of every backend in ONE process, generate() calls alternating between
    backends round by round (the first backend rotates each round): a slow spell of this
    shared VM hits all backends alike, unlike rows measured minutes apart. Each backend has
    its own model with the same weights (same seed) and its own compiled decode step."""
    import torch

    torch.set_num_threads(threads)
    out: dict = {"rounds": rounds, "tok_s": {b: [] for b in backends}}
    with torch.no_grad():
        ids = torch.randint(0, SMOL["vocab_size"], (1, prompt))
        models = {b: _model(SMOL) for b in backends}
        for b in backends:  # compile (not timed here) and warm up
            # The measured length: another static-cache size would recompile the step
            # with the cache length symbolic, and the rounds would time that graph.
            _generate(models[b], ids, new, None if b == "eager" else b)
        for r in range(rounds):
            order = backends[r % len(backends) :] + backends[: r % len(backends)]
            for b in order:
                stamps = _Stamps()
                _generate(models[b], ids, new, None if b == "eager" else b, stamps)
                out["tok_s"][b].append(1.0 / stamps.median_step())
    return out


def _fresh_cache_env(tmp: str) -> dict:
    """Child environment with empty compile caches under `tmp`."""
    return dict(
        os.environ,
        OMP_NUM_THREADS="2",
        TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
        YIRAGE_CACHE_DIR=os.path.join(tmp, "yirage"),
        TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
    )


def run_child(backend: str, env: dict, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--backends",
        args.backends,
        "--rounds",
        str(args.rounds),
        "--child",
        backend,
        "--prompt",
        str(args.prompt),
        "--new-tokens",
        str(args.new_tokens),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"backend": backend, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--backends", default="eager,inductor,yirage")
    # 2 = the machine's cores; on a shared, oversubscribed machine 2 OpenMP threads stall
    # each other at every barrier (10-100x slower), so recorded runs there use 1.
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rounds", type=int, default=5, help="interleaved decode rounds (0: skip that part)"
    )
    ap.add_argument("--interleaved-only", action="store_true", help="skip the per-backend rows")
    args = ap.parse_args()
    if args.child == "interleaved":
        out = interleaved(
            args.backends.split(","), args.prompt, args.new_tokens, args.threads, args.rounds
        )
        print(json.dumps(out))
        return
    if args.child:
        print(json.dumps(child(args.child, args.prompt, args.new_tokens, args.threads)))
        return
    rows = []
    for backend in [] if args.interleaved_only else args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            env = _fresh_cache_env(tmp)
            cold = run_child(backend, env, args)
            warm = run_child(backend, env, args) if backend != "eager" else {}
        cold["warm_compile_s"] = warm.get("compile_s")
        if warm and "decode_tok_s" in warm:
            cold["decode_tok_s_warm_run"] = warm["decode_tok_s"]
            cold["warm_graph_cache"] = warm.get("yirage_graph_cache")
        rows.append(cold)
        print(json.dumps({k: v for k, v in cold.items() if k != "tokens"}), flush=True)
    ref = rows[0].get("tokens") if rows else None
    if rows:
        _print_rows(rows, ref)
    if args.rounds > 0:
        _print_interleaved(args)


def _print_rows(rows: list[dict], ref) -> None:
    print(
        "\n| backend | decode tok/s | GB/s | prefill ms | cold compile s | warm compile s "
        "| peak RSS MB | host µs/step (30 layers, width 64) | same tokens as eager "
        "| decode tok/s, warm process |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | error: {r['error'][-200:]!r} |")
            continue
        warm = r.get("warm_compile_s")
        print(
            f"| {r['backend']} | {r['decode_tok_s']:.1f} | {r['gb_s']:.1f} | "
            f"{r['prefill_ms']:.0f} | {r['compile_s']:.1f} | "
            f"{'-' if warm is None else f'{warm:.1f}'} | {r['peak_rss_mb']:.0f} | "
            f"{r['host_us_per_step']:.0f} | {r.get('tokens') == ref} | "
            f"{r.get('decode_tok_s_warm_run', float('nan')):.1f} |"
        )


def _print_interleaved(args) -> None:
    """The interleaved comparison (see the module docstring), in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        res = run_child("interleaved", _fresh_cache_env(tmp), args)
    if "error" in res:
        print(f"\ninterleaved run failed: {res['error'][-500:]}")
        return
    tok = res["tok_s"]
    print(f"\nInterleaved decode, one process, {res['rounds']} rounds (tok/s per round):")
    for b, vals in tok.items():
        med = sorted(vals)[len(vals) // 2]
        print(f"  {b:9s} median {med:6.1f}   " + " ".join(f"{v:.1f}" for v in vals))
    for b in [b for b in tok if b.startswith("yirage")] if "inductor" in tok else []:
        ratios = sorted(y / i for y, i in zip(tok[b], tok["inductor"]))
        print(
            f"  {b} / inductor per round: median {ratios[len(ratios) // 2]:.3f}, "
            f"range {ratios[0]:.3f}-{ratios[-1]:.3f}"
        )


if __name__ == "__main__":
    main()
