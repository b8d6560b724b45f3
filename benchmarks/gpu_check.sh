#!/usr/bin/env bash
# One-call GPU check for the kernels (see ../shared/device/README.md), run from the repo root on
# the lent GPU machine:  bash benchmarks/gpu_check.sh   (with `carry: [".whl"]`, timeout_s ~420
# plus up to 300 s for the compile matrix; GPU_CHECK_COMPILE=0 skips it).
#
# 1. installs the carried wheels (../shared/device/fetch-wheels.sh: liger-kernel, ...) into /tmp/site;
# 2. runs the CUDA-marked tests (compiled kernels vs the float64 reference; shared-prompt
#    passes and packed SFT batches in bf16 with SDPA / flash-attention 2);
# 3. runs the kernel benchmarks (bench_grpo_loss.py, and bench_linear_grpo_loss.py when present);
# 4. compiles every Triton kernel config for sm_80 and sm_90 (make compile-check, on all cores;
#    appended to cuda_tests.log, last because it needs no GPU);
# 5. prints a short summary with the benchmark tables last.
# Full logs and CSVs go to $OUT (at most 8 files come back): env.txt, cuda_tests.log,
# bench_grpo_loss.{log,csv}, bench_linear_grpo_loss.{log,csv}, bench_trainer.{log,csv}.
set -uo pipefail

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
export PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
# The CUDA tests must compile the real kernels, never the interpreter.
unset TRITON_INTERPRET

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import liger_kernel, importlib.metadata as m; print('liger', m.version('liger-kernel'))" 2>&1
} > "$OUT/env.txt" 2>&1

timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_kernels tests/test_prefix.py \
  tests/test_data/test_packing.py > "$OUT/cuda_tests.log" 2>&1
tests_rc=$?
tests_tail=$(tail -n 1 "$OUT/cuda_tests.log")

bench() {  # bench NAME: run benchmarks/NAME.py, log and CSV under $OUT
  if [ -f "benchmarks/$1.py" ]; then
    timeout 300 python3 "benchmarks/$1.py" --csv "$OUT/$1.csv" > "$OUT/$1.log" 2>&1
    echo "$1 exit code: $?" >> "$OUT/$1.log"
  fi
}
bench bench_grpo_loss
bench bench_linear_grpo_loss
bench bench_trainer  # random Qwen2.5-VL-3B GRPO step, ours vs TRL (TRL side skipped unless trl + datasets are importable)

compile_rc=skipped
if [ "${GPU_CHECK_COMPILE:-1}" != 0 ]; then
  timeout 300 python3 -m pytest -q -m compile_matrix -p no:cacheprovider \
    tests/test_kernels/test_compile.py > /tmp/compile_matrix.log 2>&1
  compile_rc=$?
  { echo "== compile matrix (exit code $compile_rc)"; cat /tmp/compile_matrix.log; } \
    >> "$OUT/cuda_tests.log"
fi

echo "== environment"
cat "$OUT/env.txt"
echo "== CUDA tests (exit code $tests_rc): $tests_tail"
if [ "$tests_rc" -ne 0 ]; then
  grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.log" | head -20
fi
if [ "$compile_rc" != skipped ]; then
  echo "== compile matrix (exit code $compile_rc): $(tail -n 1 /tmp/compile_matrix.log)"
fi
for name in bench_grpo_loss bench_linear_grpo_loss bench_trainer; do
  if [ -f "$OUT/$name.log" ]; then
    echo "== $name"
    tail -n 30 "$OUT/$name.log"
  fi
done
