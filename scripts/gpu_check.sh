#!/usr/bin/env bash
# The GPU check of the compressed-expert kernels, in one go (under 9 minutes on an H100: the step
# limits add up to 525 s): build the kernels, run every GPU test, benchmark one expert matrix at
# 1/8/16/32/64 tokens on Switch's six expert shapes (ternary, 4-bit, 2-bit) against bf16
# torch.matmul, one c2048-shaped sparse block at 1, 8 and 32 tokens against the same block with
# bf16 experts, and a Mixtral- and a Qwen3-30B-A3B-shaped decoder block (top-k SwiGLU experts)
# at 1, 8 and 32 tokens, packed ternary against bf16 experts.
# Writes markdown under $OUT (default ./gpu-check): build.txt, tests.txt, kernel.md, block.md,
# moe_block.md, and summary.md with all of them. Run from the checkout root:
#
#     PYTHONPATH=. OUT=/tmp/out bash scripts/gpu_check.sh
#
# Each step has its own time limit and a failing step does not stop the others; the exit code is
# the number of failed steps.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" >&2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/$name.txt" >&2
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >>"$OUT/gpu.txt" 2>&1
step build 45 $PY -m qmoe_cli build-kernels
# test_gated_experts.py: only its GPU cases (its emulated ones are CPU tests of the same code).
step tests 250 $PY -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_numerics.py \
  tests/test_pack.py::test_packed_eval_on_the_gpu_equals_quantized_and_the_cpu \
  tests/test_gated_experts.py \
  tests/test_shared_experts.py::test_packed_shared_expert_on_the_device_equals_its_cpu_form \
  tests/test_shared_experts.py::test_packed_shared_expert_eval_on_the_gpu -k "not emulated"
step kernel 75 $PY scripts/bench_kernel.py --formats ternary,4,2 --tokens 1,8,16,32,64 --repeats 100 \
  --out "$OUT/kernel.md"
step block 75 $PY scripts/bench_block.py --tokens 1,8,32 --repeats 100 --out "$OUT/block.md"
step moe_block 80 $PY scripts/bench_moe_block.py --tokens 1,8,32 --repeats 50 --out "$OUT/moe_block.md"

{
  echo "# GPU check"; echo; echo '```'; cat "$OUT/gpu.txt"; echo '```'; echo
  echo "## tests"; echo; echo '```'; tail -n 40 "$OUT/tests.txt"; echo '```'; echo
  for table in kernel block moe_block; do
    [ -f "$OUT/$table.md" ] && { cat "$OUT/$table.md"; echo; }
  done
  echo "failed steps: $failed"
} >"$OUT/summary.md"
exit "$failed"
