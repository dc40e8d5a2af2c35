"""HF generate() decode benchmark on CUDA: eager vs Inductor (reduce-overhead) vs yirage.

One process, one model per shape (random bf16 weights, batch 1, static KV cache of
`max_cache_len` slots), the three variants run one after another on the same weights:

  eager, inductor, yirage and the yirage variants: benchmarks/cuda_variants.py

HF compiles only the decode step (prefill runs eagerly in every variant). Reported per
variant: decode tok/s and ms/token (from the difference between a full and a 1-token
generate), achieved GB/s (weight bytes read per token / decode time per token), prefill ms
(the 1-token generate), cold compile s (first call minus a warm call of the same length),
peak GPU memory (reset after the model is built), max |logit - eager logit| over the steps
whose tokens agree with eager, and how many greedy tokens agree.

    python benchmarks/bench_cuda_llama.py --shapes 1b,long --json out.json

`--interleaved ROUNDS` compiles the given variants once each and then times them in
alternation (one full and one 1-token generate per variant per round): the honest way to
compare variants whose difference is smaller than the host's drift between runs.

    python benchmarks/bench_cuda_llama.py --shapes 7b --variants yirage,inductor --interleaved 5
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import statistics
import sys
import time
from typing import Any

import torch
from cuda_step_timing import cache_positions_kept, gpu_call_ms, last_decode_call
from cuda_variants import ENV_VARIANTS, _env, variant_configs  # noqa: F401 - re-exported

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-2-7B: MHA, 32 layers.
    "7b": dict(
        hidden=4096, layers=32, heads=32, kv=32, inter=11008, vocab=32000, prompt=128, new=256
    ),
    # Llama-3.2-1B-like: GQA 32/8, large vocabulary.
    "1b": dict(
        hidden=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, prompt=128, new=64
    ),
    # 1B shape with a 4096-slot static cache and a short prompt: attention over the cache.
    "long": dict(
        hidden=2048,
        layers=16,
        heads=32,
        kv=8,
        inter=8192,
        vocab=128256,
        prompt=128,
        new=128,
        max_cache_len=4096,
    ),
    # A small shape for smoke runs.
    "tiny": dict(hidden=512, layers=2, heads=8, kv=2, inter=1024, vocab=4096, prompt=32, new=16),
}


def build_model(s: dict[str, Any]):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        intermediate_size=s["inter"],
        vocab_size=s["vocab"],
        max_position_embeddings=max(4096, s.get("max_cache_len", 0)),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: all but the embedding table (one row)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    return total + emb.shape[1] * emb.element_size()


# Spec HBM bandwidth, TB/s, by a substring of the device name (for "% of peak").
HBM_TB_S = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8, "A100": 2.0}


def hbm_peak_tb_s() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_TB_S.items() if k in name), None)


def _bandwidth(bytes_tok: int, ms: float, peak: float | None) -> str:
    tb_s = bytes_tok / (ms / 1e3) / 1e12
    return f"{tb_s * 1e3:.0f}" + (f" ({tb_s / peak:.0%})" if peak else "")


def _sync_time(fn) -> tuple[float, Any]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


class Runner:
    def __init__(self, model, s: dict[str, Any]) -> None:
        import transformers

        self.model, self.s = model, s
        self.ids = torch.randint(3, s["vocab"], (1, s["prompt"]), device="cuda")
        self.max_len = s.get("max_cache_len", s["prompt"] + s["new"])
        self.cache = transformers.StaticCache(config=model.config, max_cache_len=self.max_len)

    def generate(self, new: int, compile_config=None, logits: bool = False):
        self.cache.reset()
        kw: dict[str, Any] = dict(
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            past_key_values=self.cache,
            return_dict_in_generate=True,
            output_logits=logits,
        )
        if compile_config is None:
            kw["disable_compile"] = True
        else:
            kw["compile_config"] = compile_config
        with torch.no_grad():
            return self.model.generate(self.ids, **kw)


def forget_compiled(model) -> None:
    """Drops HF's compiled forward: the next generate() compiles the config it is given."""
    for attr in ("_compiled_call", "_last_compile_config"):
        if hasattr(model, attr):
            delattr(model, attr)


def use_compiled(model, compiled_call: Any, config: Any) -> None:
    """Makes HF's generate() run a variant's compiled forward, kept since its compile."""
    model._compiled_call = compiled_call
    model._last_compile_config = config


def compile_variant(
    runner: Runner, key: str, name: str, config: Any, record=contextlib.nullcontext
) -> tuple[Any, list]:
    """Compiles variant `name` (its environment set) with a full generate(), under
    `record()`, and a 1-token one. Returns HF's compiled forward and the yirage
    CUDA-graph runners it made. A yirage variant that compiled nothing raises: Dynamo
    reused an earlier variant's program, and timing it would time that one."""
    from yirage_dynamo.runtime.cuda_graphs import live_runners

    import yirage_dynamo

    forget_compiled(runner.model)
    before = {id(r) for r in live_runners()}
    n_reports = len(yirage_dynamo.reports())
    with _env(ENV_VARIANTS.get(name, {})):
        print(f"[{key}] compiling {name} ...", file=sys.stderr, flush=True)
        with record():
            runner.generate(runner.s["new"], config)
        runner.generate(1, config)
    if name.startswith("yirage") and len(yirage_dynamo.reports()) == n_reports:
        raise RuntimeError(f"{name} compiled nothing: it would time an earlier variant")
    # Different torch.compile wrappers: Dynamo keeps each one's entry (backend guard).
    return runner.model._compiled_call, [r for r in live_runners() if id(r) not in before]


def run_variant(runner: Runner, name: str, compile_config, repeats: int) -> dict[str, Any]:
    new = runner.s["new"]
    torch._dynamo.reset()
    forget_compiled(runner.model)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cold, out = _sync_time(lambda: runner.generate(new, compile_config, logits=True))
    warm_full = []
    warm_one = []
    mems = []
    for _ in range(repeats):
        warm_full.append(_sync_time(lambda: runner.generate(new, compile_config))[0])
        warm_one.append(_sync_time(lambda: runner.generate(1, compile_config))[0])
        mems.append(torch.cuda.memory_allocated())
    full, one = statistics.median(warm_full), statistics.median(warm_one)
    per_tok = (full - one) / (new - 1)
    return {
        "variant": name,
        "cold_s": cold,
        "compile_s": max(0.0, cold - full),
        "prefill_ms": one * 1e3,
        "decode_ms_per_tok": per_tok * 1e3,
        "decode_tok_s": 1.0 / per_tok,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        # Allocated memory growth between the first and last warm repeat (CUDA graphs
        # must not grow across generate() calls).
        "mem_growth_mib": (mems[-1] - mems[0]) / 2**20,
        "sequences": out.sequences,
        "logits": [x.float() for x in out.logits],
    }


def profile_decode(runner: Runner, compile_config, steps: int = 32, top: int = 14) -> str:
    """Where a decode step's time goes: GPU busy time per token vs wall time per token,
    and the kernels that take it (torch.profiler; the variant is already compiled)."""
    from torch.profiler import ProfilerActivity, profile

    runner.generate(steps, compile_config)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = _sync_time(lambda: runner.generate(steps, compile_config))
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    busy = sum(e.self_device_time_total for e in events) / 1e3  # ms
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines = [
        f"{steps} tokens: wall {wall * 1e3 / steps:.3f} ms/token, "
        f"GPU busy {busy / steps:.3f} ms/token (prefill included)"
    ]
    for e in events[:top]:
        lines.append(
            f"  {e.self_device_time_total / 1e3 / steps:8.4f} ms/tok {e.count // steps:5d}x/tok  "
            f"{e.key[:90]}"
        )
    # Host side: what the CPU does per token (HF's loop, Dynamo guards, graph replay).
    cpu = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    lines.append("  host (self CPU time):")
    for e in cpu[:10]:
        lines.append(
            f"  {e.self_cpu_time_total / 1e3 / steps:8.4f} ms/tok {e.count / steps:7.1f}x/tok  "
            f"{e.key[:90]}"
        )
    return "\n".join(lines)


def compare(res: dict[str, Any], ref: dict[str, Any]) -> None:
    same = 0
    for a, b in zip(res["sequences"][0].tolist(), ref["sequences"][0].tolist()):
        if a != b:
            break
        same += 1
    prompt = ref["sequences"].shape[1] - len(ref["logits"])
    agree = max(0, same - prompt)
    res["tokens_agree"] = f"{agree}/{len(ref['logits'])}"
    steps = min(agree + 1, len(ref["logits"]))  # the first diverging step's logits too
    res["max_logit_diff"] = max(
        (res["logits"][i] - ref["logits"][i]).abs().max().item() for i in range(steps)
    )


def bench_interleaved(
    key: str, variants: list[str], rounds: int, options: dict, profile: bool = False
) -> str:
    """`_bench_interleaved` with room in Dynamo's cache for every variant's entries: past
    its recompile limit (8) a frame runs eagerly, and a later variant would time HF's eager
    forward (seen with 7 variants and the grad-mode slip fixed in `gpu_call_ms`)."""
    with torch._dynamo.config.patch(recompile_limit=max(8, 4 * len(variants))):
        return _bench_interleaved(key, variants, rounds, options, profile)


def _bench_interleaved(
    key: str, variants: list[str], rounds: int, options: dict, profile: bool = False
) -> str:
    """Decode ms/token of compiled variants measured in alternation, in one process.

    Each variant is compiled once (its compiled call kept aside); then every round runs
    one full and one 1-token generate() per variant, in turn. Variants run back to back
    drift with the host (clocks, other tenants) by more than the effects compared here;
    alternating puts every variant under the same conditions. Returns a table of the
    per-variant medians and, per round, each variant's ratio to the first one's."""
    s = SHAPES[key]
    model = build_model(s)
    runner = Runner(model, s)
    configs = variant_configs(options)
    from yirage_dynamo.runtime.cuda_graphs import replay_ms

    compiled = {}
    graphs: dict[str, list] = {}  # variant -> the yirage CUDA-graph runners it made
    torch._dynamo.reset()
    for name in variants:
        compiled[name], graphs[name] = compile_variant(runner, key, name, configs[name])
    per_tok: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in variants:
            use_compiled(model, compiled[name], configs[name])
            full = _sync_time(functools.partial(runner.generate, s["new"], configs[name]))[0]
            one = _sync_time(functools.partial(runner.generate, 1, configs[name]))[0]
            per_tok[name].append((full - one) / (s["new"] - 1) * 1e3)
    base = variants[0]
    bytes_tok, peak = weight_bytes_per_token(model), hbm_peak_tb_s()
    lines = [
        f"weights read per token {bytes_tok / 1e9:.2f} GB; HBM spec "
        + (f"{peak} TB/s" if peak else "unknown for this GPU"),
        f"| shape | variant | ms/token (median of {rounds}) | tok/s | GB/s (% of spec) | "
        f"per-round ratio to {base}: median (min-max) | GPU ms/step (graph replay) "
        "| GPU GB/s (% of spec) | rest of the token, ms (host) | GPU ms/step (one call, "
        "GPU ahead of the host: any backend) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in variants:
        use_compiled(model, compiled[name], configs[name])
        args, kwargs = last_decode_call(runner, configs[name])
        reset, room = cache_positions_kept(kwargs)
        try:
            step = f"{gpu_call_ms(model._compiled_call, args, kwargs, reset=reset):.3f}"
        except Exception as exc:  # noqa: BLE001 - a column of a table, not the benchmark
            print(f"[{key}] {name}: GPU step per call not measured: {exc}", file=sys.stderr)
            step = "-"
        reset()
        med = statistics.median(per_tok[name])
        ratios = [b / a for a, b in zip(per_tok[name], per_tok[base])]
        # The decode step's own GPU time, without the host time between steps: the
        # variant's last captured graph replayed back to back (yirage's runner only).
        captured = [r for r in graphs[name] if r.graph is not None]
        # Replays advance the cache positions too: as many as fit (a warm one first).
        gpu = replay_ms(captured[-1], reps=min(50, room - 2)) if captured and room > 2 else None
        reset()
        lines.append(
            f"| {key} | {name} | {med:.3f} | {1e3 / med:.1f} | "
            f"{_bandwidth(bytes_tok, med, peak)} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
            + (
                f"{gpu:.3f} | {_bandwidth(bytes_tok, gpu, peak)} | {med - gpu:.3f} |"
                if gpu is not None
                else "- | - | - |"
            )
            + f" {step} |"
        )
    for name in variants:  # what run-ahead did (yirage_dynamo.profiling.cuda_graph_stats)
        ahead = [r for r in graphs[name] if hasattr(r, "hits")]
        if ahead:
            lines.append(
                f"{name}: steps handed out from a run-ahead step "
                f"{sum(r.hits for r in ahead)}, dropped {sum(r.misses for r in ahead)}; "
                f"kept now, every trial (kept, ms): {[(r.choice, list(r.trials)) for r in ahead]}"
                + "".join(f"; off: {r.launch_error}" for r in ahead if r.launch_error)
            )
    if profile:  # every kernel of a step, per variant, after the timed rounds
        for name in variants:
            use_compiled(model, compiled[name], configs[name])
            lines.append(f"\n--- profile {key} {name} ---")
            lines.append(profile_decode(runner, configs[name], steps=16, top=60))
    del runner, model, compiled, graphs
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return "\n".join(lines)


def bench_shape(
    key: str, variants: list[str], repeats: int, options: dict, profile: bool = False
) -> list[dict]:
    s = SHAPES[key]
    model = build_model(s)
    bytes_tok = weight_bytes_per_token(model)
    runner = Runner(model, s)
    configs = variant_configs(options)
    rows = []
    ref = None

    def one(name: str, runner: Runner, configs: dict, ref: dict | None) -> dict[str, Any]:
        print(f"[{key}] {name} ...", file=sys.stderr, flush=True)
        import yirage_dynamo

        n_reports = len(yirage_dynamo.reports())
        try:
            res = run_variant(runner, name, configs[name], repeats)
        except Exception as exc:  # noqa: BLE001 - a failing variant is reported, not fatal
            print(f"[{key}] {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return {"shape": key, "variant": name, "error": f"{type(exc).__name__}: {exc}"}
        res["shape"] = key
        res["GB_s"] = bytes_tok / (res["decode_ms_per_tok"] / 1e3) / 1e9
        if ref is not None:
            compare(res, ref)
        if profile and name != "eager":
            try:
                res["profile"] = profile_decode(runner, configs[name])
            except Exception as exc:  # noqa: BLE001
                res["profile"] = f"profile failed: {type(exc).__name__}: {exc}"
        if name.startswith("yirage"):
            import yirage_dynamo

            reps = [r for r in yirage_dynamo.reports()[n_reports:] if r.lowering]
            res["report"] = str(reps[-1]) if reps else ""
            if len(reps) > 1:  # regional pieces: where each piece's compile time went
                res["report"] += "\n" + "\n".join(
                    f"  piece graph {r.graph_id}: nodes {r.nodes_in}, "
                    + ", ".join(f"{k} {v:.2f}s" for k, v in r.stages.items() if v > 0.05)
                    for r in reps
                )
            res["fallbacks"] = [f.reason for r in reps for f in r.fallbacks]
        return res

    for name in variants:
        with _env(ENV_VARIANTS.get(name, {})):
            res = one(name, runner, configs, ref)
        if name == "eager" and "error" not in res:
            ref = res
            compare(res, ref)
        rows.append(res)
    for r in rows:
        r.pop("sequences", None)
        r.pop("logits", None)
    del runner, model, configs
    # Compiled code holds the weights (frozen constants): drop what Dynamo holds before the
    # next shape. Measured: the previous model still stays allocated (likely held by the
    # CUDA-graph tree), so later shapes' peaks include it; compare variants within a shape.
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| shape | variant | decode tok/s | ms/token | GB/s | prefill ms | cold compile s "
        "| peak GiB | mem growth MiB | max abs logit diff | tokens = eager |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | error: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['shape']} | {r['variant']} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_ms_per_tok']:.2f} | {r['GB_s']:.0f} | {r['prefill_ms']:.1f} | "
            f"{r['compile_s']:.1f} | {r['peak_gib']:.2f} | {r['mem_growth_mib']:.1f} | "
            f"{r.get('max_logit_diff', float('nan')):.3g} | {r.get('tokens_agree', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1b,long,7b")
    p.add_argument("--variants", default="eager,inductor,yirage")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="profile decode of compiled variants")
    p.add_argument("--yirage-options", default="{}", help="JSON dict of yirage options")
    p.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="compare the compiled variants in alternation (ROUNDS rounds) instead",
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    env = (
        f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton_version}, "
        f"transformers {transformers.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(env, flush=True)
    rows: list[dict] = []
    options = json.loads(args.yirage_options)
    if args.interleaved:
        for key in args.shapes.split(","):
            print(
                bench_interleaved(
                    key, args.variants.split(","), args.interleaved, options, args.profile
                ),
                flush=True,
            )
        return 0
    for key in args.shapes.split(","):
        rows += bench_shape(key, args.variants.split(","), args.repeats, options, args.profile)
        print(table([r for r in rows if r["shape"] == key]), flush=True)
    print("\n" + env + "\n" + table(rows))
    for r in rows:
        if r.get("profile"):
            print(f"\n--- profile {r['shape']} {r['variant']} ---\n{r['profile']}")
    for r in rows:
        if r.get("report"):
            print(f"\n--- report {r['shape']} {r['variant']} ---\n{r['report']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1, default=str)
    ok = all("error" not in r and not r.get("fallbacks") for r in rows)
    return 0 if ok and all(math.isfinite(r.get("decode_tok_s", 0.0)) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
