#!/usr/bin/env bash
# Everything GPU-side in one device call: install the carried wheels, run the GPU tests, a short
# fused-path training run of recipe=mamba-130m, and the throughput benchmark. Results go to $OUT.
#   device run: carry .whl, command: bash tests/gpu/run_all.sh [parts...]
# parts: tests graph train bench bench16 determinism (default: tests train bench determinism)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline GPU_RESULTS="$OUT/gpu_results.txt"
python3 -m pip install -q --no-index --no-deps --no-compile ${WHL:-.whl}/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, mamba_ssm, lightning; print('torch', torch.__version__, 'mamba_ssm', mamba_ssm.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/device.txt"
parts=${*:-tests train bench determinism}

if [[ " $parts " == *" tests "* ]]; then
  # IEEE fp32 in Triton dots for the "fp32" parity cases (tl.dot defaults to TF32)
  TRITON_F32_DEFAULT=ieee python3 -m pytest -q tests/gpu --deselect tests/gpu/test_cuda_graph_step.py --deselect tests/gpu/test_activation_checkpointing_gpu.py -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
fi

if [[ " $parts " == *" graph "* ]]; then
  # captured vs eager step, bit for bit under the deterministic mode: a process of its own
  python3 -m pytest -q tests/gpu/test_cuda_graph_step.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_graph_tests.log" | tail -n 25
  python3 -m pytest -q tests/gpu/test_activation_checkpointing_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_ac_tests.log" | tail -n 25
fi

if [[ " $parts " == *" train "* ]]; then
  # recipe=mamba-130m on the fused path, bf16-mixed, fp32 masters; embedded corpus (4096 vocab),
  # one micro-batch of 8 x 2048 per step, 40 steps.
  python3 -m mamba_train recipe=mamba-130m data=default model.vocab_size=4096 backend=fused \
    data.seq_len=2048 data.micro_batch_size=8 train.global_batch_tokens=16384 trainer.max_steps=40 \
    train.val_every_n_steps=20 trainer.limit_val_batches=4 train.checkpoint_every_n_steps=20 \
    trainer.log_every_n_steps=5 paths.output_dir=/tmp/gpu_runs 2>&1 | tee "$OUT/train_mamba130m.log" | grep -E "backend|run dir|error|Error|training done" 
  cp /tmp/gpu_runs/mamba-130m/summary.json "$OUT/train_mamba130m_summary.json" 2>/dev/null
  cp /tmp/gpu_runs/mamba-130m/metrics/metrics.csv "$OUT/train_mamba130m_metrics.csv" 2>/dev/null
  python3 - <<'PY' | tee -a "$GPU_RESULTS"
import torch
ck = torch.load("/tmp/gpu_runs/mamba-130m/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
dtypes = sorted({str(v.dtype) for v in ck["state_dict"].values()})
print(f"train mamba-130m fused bf16-mixed: global_step {ck['global_step']}, checkpoint param dtypes {dtypes}, precision {ck.get('hyper_parameters', {}).get('precision', 'n/a')}")
PY
fi

if [[ " $parts " == *" bench "* ]]; then
  python3 benchmarks/train_throughput.py --ablate-graph --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log" | grep -E "THROUGHPUT|PLAIN|BEST|GRAPH|Error|error"
fi
if [[ " $parts " == *" bench16 "* ]]; then
  python3 benchmarks/train_throughput.py --micro-batches 16 --json "$OUT/throughput16.json" 2>&1 | tee "$OUT/throughput16.log" | grep -E "THROUGHPUT|PLAIN|BEST|Error|error"
fi
if [[ " $parts " == *" determinism "* ]]; then
  # the throughput cost of trainer.deterministic=true (separate processes: the kernels read
  # MAMBA_DETERMINISTIC when they are imported)
  python3 benchmarks/train_throughput.py --models mamba2-130m mamba-130m 2>&1 | tee "$OUT/determinism_off.log" | grep -E "THROUGHPUT|Error"
  MAMBA_DETERMINISTIC=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 benchmarks/train_throughput.py \
    --models mamba2-130m mamba-130m --override trainer.deterministic=true 2>&1 | tee "$OUT/determinism_on.log" | grep -E "THROUGHPUT|Error"
fi
ls -la "$OUT"
