#!/usr/bin/env bash
# A whole CUDA check in one command on a GPU machine (the device tool's `run`), logs under
# $OUT (benchmarks/out without it). Stages, each with its own time limit, so that one
# that hangs cannot take the others' time:
#   1. install the project (no dependencies: the machine has torch, triton, transformers)
#   2. the L2-prefetch micro-benchmark                        (MICRO_S, default 0: skipped)
#   3. TEST_FILES (default: the kernels, HF generate(), KV write) (TESTS_S, 250 s)
#   4. 7B decode, the variants interleaved in one process     (BENCH_S, default 300 s);
#      by default the A/Bs still due: our CUDA-graph runner against Inductor's trees,
#      regional against whole-graph (RESULTS.md, 18th session)
#   5. the 7B cold compile, yirage and Inductor               (COMPILE_S, default 0)
#   6. the rest of the CUDA test set                          (REST_S,  default 0: skipped)
#   (3b. tests/test_cuda_generate.py under YIRAGE_RUN_AHEAD=auto  (AUTO_S,  default 0))
# A stage whose limit is 0 is skipped. The device tool allows 600 s a command, so:
#   bash benchmarks/cuda_device_pass.sh                       (stages 1, 3, 4: ~9 min)
#   TESTS_S=0 BENCH_S=0 REST_S=570 bash benchmarks/cuda_device_pass.sh   (stage 6: ~480 s)
#   VARIANTS=yirage,inductor ROUNDS=5 bash benchmarks/cuda_device_pass.sh
#   PROFILE=1 ...: the bench also lists each compiled variant's kernels (torch.profiler)
#   AUTO_S=N: before the bench, tests/test_cuda_generate.py with YIRAGE_RUN_AHEAD=auto
#   (every generate() test under staged run-ahead: what making "auto" the default needs).
#   COMPILE_S=N: after the bench, the 7B cold compile of yirage and of Inductor, each in a
#   fresh process with empty caches (each limited to N s).
#   The watch on a kept run-ahead (runtime/run_ahead.py `_watch`; RESULTS.md, 29th
#   session: it turned 1B's off after 32 calls and kept 7B's):
#   TEST_FILES="tests/test_run_ahead.py tests/test_run_ahead_staged.py" TESTS_S=120 \
#     SHAPES=1b,7b VARIANTS=yirage,yirage_in_order,inductor ROUNDS=5 BENCH_S=420 \
#     bash benchmarks/cuda_device_pass.sh                     (~9 min)
#   The trial run again in order (runtime/run_ahead.py RETRY_FIRST; RESULTS.md, 30th
#   session: built, its gain where in order gets chosen not yet measured): the watch's
#   command with VARIANTS=yirage,yirage_in_order,yirage_always_staged,inductor; the
#   bench prints every trial (kept, ms) of the default's runner.
#   1B decode periods by position and mode, run-ahead against in order (RESULTS.md, 29th):
#   python3 benchmarks/profile_run_ahead_periods.py --shape 1b --rounds 4 \
#     --variants yirage_always_staged,yirage_in_order
#   Run-ahead against in order and Inductor (RESULTS.md, 22nd session):
#   TEST_FILES=tests/test_run_ahead.py SHAPES=1b,7b \
#     VARIANTS=yirage,yirage_run_ahead,yirage_run_ahead_always,inductor ROUNDS=3 \
#     BENCH_S=330 bash benchmarks/cuda_device_pass.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 ||
  { tail -n 20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

if [ "${MICRO_S:-0}" -gt 0 ]; then
  timeout "$MICRO_S" python3 benchmarks/bench_l2_prefetch.py 2>&1 | grep -v -i warn |
    tee "$OUT/micro.log"
fi

if [ "${TESTS_S:-250}" -gt 0 ]; then
  # shellcheck disable=SC2086 # a list of files
  timeout "${TESTS_S:-250}" python3 -m pytest -q -p no:cacheprovider \
    ${TEST_FILES:-tests/test_cuda.py tests/test_cuda_generate.py tests/test_cuda_kv_write.py} 2>&1 |
    tee "$OUT/tests_full.log" | tail -n 25 | tee "$OUT/tests.log"
fi

if [ "${AUTO_S:-0}" -gt 0 ]; then
  YIRAGE_RUN_AHEAD=auto timeout "$AUTO_S" python3 -m pytest -q -p no:cacheprovider \
    tests/test_cuda_generate.py 2>&1 | tee "$OUT/tests_auto_full.log" | tail -n 25 |
    tee "$OUT/tests_auto.log"
fi

if [ "${BENCH_S:-300}" -gt 0 ]; then
  timeout "${BENCH_S:-300}" python3 benchmarks/bench_cuda_llama.py --shapes "${SHAPES:-7b}" \
    --variants "${VARIANTS:-yirage,yirage_trees,yirage_whole,inductor}" \
    --interleaved "${ROUNDS:-3}" ${PROFILE:+--profile} 2>&1 | grep -v -i warn | tee "$OUT/bench.log"
fi

if [ "${COMPILE_S:-0}" -gt 0 ]; then
  # Cold compile, each backend alone in a fresh process with empty caches (7B).
  for variant in yirage inductor; do
    timeout "$COMPILE_S" python3 benchmarks/profile_compile_cuda.py --shape 7b \
      --variant "$variant" --out "$OUT" 2>&1 | grep -v -i warn |
      tee "$OUT/compile_$variant.log" | grep -E "cold compile|Dynamo compile|runner _" |
      tee -a "$OUT/compile.log"
  done
fi

if [ "${REST_S:-0}" -gt 0 ]; then
  timeout "$REST_S" python3 -m pytest -q -p no:cacheprovider tests/test_triton_pool.py \
    tests/test_cuda.py tests/test_cuda_choices.py tests/test_cuda_kv_write.py \
    tests/test_cuda_debug.py tests/test_regional.py tests/test_llm_patterns.py \
    tests/test_cuda_pdl.py tests/test_frozen_weights.py tests/test_memory_plan.py \
    tests/test_run_ahead_staged.py 2>&1 |
    tee "$OUT/tests_rest_full.log" | tail -n 25 | tee "$OUT/tests_rest.log"
fi
