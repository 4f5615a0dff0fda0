#!/usr/bin/env bash
# Mamba-3 on the device in one call: install the carried wheels, the Mamba-3 GPU tests, then
# (part "learn") the Mamba-3 vs Mamba-2 learning check and (part "bench") the throughput arm.
#   device run: carry .whl, command: bash tests/gpu/run_mamba3.sh [tests] [learn] [bench]
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline GPU_RESULTS="$OUT/gpu_results.txt"
python3 -m pip install -q --no-index --no-deps --no-compile ${WHL:-.whl}/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, mamba_ssm; print('torch', torch.__version__, 'mamba_ssm', mamba_ssm.__version__, torch.cuda.get_device_name())"
parts=${*:-tests}
if [[ " $parts " == *" tests "* ]]; then
  # IEEE fp32 in Triton dots for the "fp32" cases (tl.dot defaults to TF32)
  TRITON_F32_DEFAULT=ieee python3 -m pytest -q tests/gpu/test_mamba3_gpu.py -p no:cacheprovider -rfE \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/mamba3_gpu_tests.log" | tail -n 40
  echo "--- recorded:"; cat "$GPU_RESULTS" 2>/dev/null
fi
if [[ " $parts " == *" learn "* ]]; then
  python3 benchmarks/mamba3_vs_mamba2.py --json "$OUT/mamba3_vs_mamba2.json" 2>&1 | tee "$OUT/mamba3_vs_mamba2.log" | tail -n 40
fi
if [[ " $parts " == *" bench "* ]]; then
  python3 benchmarks/train_throughput.py --models mamba3-180m mamba3-440m --peak-flops 989e12 --json "$OUT/throughput_mamba3.json" 2>&1 | tee "$OUT/throughput_mamba3.log" | grep -E "PLAIN|THROUGHPUT|BEST|Error|error"
fi
