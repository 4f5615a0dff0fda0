#!/usr/bin/env bash
# The GPU-bound step, one device call: kernel budgets of the captured steps, throughput with the fla
# peer arm, the fla SSD kernel check and micro-benchmark, the fla SSD GPU tests. Each part runs
# under what is left of BUDGET_S seconds (default 290; the wheel install comes before it), in
# priority order; a part that would start with < 25 s left is skipped and says so. Logs: $OUT.
#   after the wheels (fla's included) and the project are installed:
#   bash benchmarks/gpu_perf.sh [parts...]   parts: prof2 prof1 tp1 refusal ssd tests tp2
#   (default: all but tp2, whose fla SSD arm is refused on Hopper + Triton < 3.7.1)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline GPU_RESULTS="$OUT/gpu_results.txt"
BUDGET_S=${BUDGET_S:-290}
PEAK=989e12  # H200 dense bf16 (Lightning's table may not know "NVIDIA H200")
SHOW='SSDKERNEL|THROUGHPUT|PLAIN|PEER|SSD |BUDGET|PROFILE|OTHER|KERNEL|fla-ssd|passed|failed|FAILED|Error|error|captured after|capture failed|eager training step'
parts=${*:-prof2 prof1 tp1 refusal ssd tests}

run_part() {  # name, command...
  local name=$1; shift
  local left=$(( BUDGET_S - SECONDS ))
  if (( left < 25 )); then echo "== $name SKIPPED (${left}s left of ${BUDGET_S})"; return; fi
  echo "== $name (limit ${left}s): $*"
  timeout -k 5 "$left" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? at ${SECONDS}s"
  grep -E "$SHOW" "$OUT/$name.log" | grep -v "^KERNEL" | cut -c1-230
  grep -E "^KERNEL" "$OUT/$name.log" | head -n 16 | cut -c1-200
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "
from importlib.metadata import version, PackageNotFoundError
for p in ('torch', 'triton', 'mamba_ssm', 'causal_conv1d', 'flash-linear-attention', 'lightning'):
    try: print(p, version(p))
    except PackageNotFoundError: print(p, 'MISSING')
" | tee -a "$OUT/device.txt"
TIMING=(--warmup 4 --windows 2 --window 6 --peak-flops "$PEAK")
PROF=(--warmup 6 --steps 4 --cuda-graph auto --top 8 --peak-flops "$PEAK")
for p in $parts; do
  case $p in
    tp2) run_part tp_mamba2 python3 benchmarks/train_throughput.py --models mamba2-370m --fla-peer \
           --ssd-kernel-fla "${TIMING[@]}" --json "$OUT/tp_mamba2.json" ;;
    refusal) run_part gpu_tests_refusal python3 -m pytest -q -p no:cacheprovider \
           tests/gpu/test_fla_ssd.py -k "refused or boundaries" ;;
    tests) run_part gpu_tests env TRITON_F32_DEFAULT=ieee python3 -m pytest -q -p no:cacheprovider \
           tests/gpu/test_fla_ssd.py ;;
    prof2) run_part prof_mamba2 python3 benchmarks/profile_step.py --model mamba2-370m "${PROF[@]}" ;;
    tp1) run_part tp_mamba1 python3 benchmarks/train_throughput.py --models mamba-370m --fla-peer \
           "${TIMING[@]}" --json "$OUT/tp_mamba1.json" ;;
    prof1) run_part prof_mamba1 python3 benchmarks/profile_step.py --model mamba-370m "${PROF[@]}" ;;
    ssd) run_part ssd_kernels python3 benchmarks/ssd_kernels.py --lift-fla-guard ;;
    *) echo "unknown part $p" ;;
  esac
done
echo "== done at ${SECONDS}s"; ls "$OUT"
