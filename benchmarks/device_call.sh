#!/usr/bin/env bash
# One device call: install the carried wheels and the project, then run the named parts in order,
# each under what is left of BUDGET_S seconds (default 540; PART_CAP_S caps each part); a part
# that would start with < 25 s left is skipped and says so. Each part's full output is in
# $OUT/<part>.log; its key lines are printed. The wheels come from .whl, or the folder WHL names (benchmarks/README.md lists the set),
# fla's only for the parts that use it, DeepSpeed's (a wheel built here with DS_BUILD_OPS=0, plus
# pydantic, pydantic-core, annotated-types, typing-inspection, hjson) only for `reliab`.
#   device run: carry .whl, command: BUDGET_S=540 bash benchmarks/device_call.sh <parts...>
# parts:
#   m3tests   Mamba-3 GPU tests (fused vs mamba_ssm.Mamba3 vs reference, packing, captured step)
#   m3bench   Mamba-3 throughput: plain mamba_ssm Mamba3 loop vs mamba_train (M3BENCH_MODELS)
#   reliab    tests/gpu/test_reliability_gpu.py (captured-step NaN skip/stop, 1-GPU FSDP/DeepSpeed;
#             RELIAB_K selects tests by -k)
#   first     time to first step, cold vs warm Triton cache (benchmarks/first_step.sh)
#   prof2 prof1 prof3  per-kernel-family budget of the captured mamba2-370m / mamba-370m /
#             mamba3-180m steps
#   ops3      mamba3-180m: the eager step's aten operators by GPU time, and the captured budget
#   tp1       mamba-370m throughput with the fla peer arm (needs fla's wheels)
#   tp2       mamba2-370m with the fla peer arm and the fla SSD arm (refused on Hopper + Triton < 3.7.1)
#   normtests tests/gpu/test_norm_backward_gpu.py (mamba_train's norm backward vs mamba_ssm's)
#   prof2ab   mamba2-370m captured step with kernels.norm_backward=mamba_train vs =mamba_ssm, one process
#   tp2only tp1only  mamba2-370m / mamba-370m throughput, plain loop vs mamba_train (no peer arm)
#   refusal flatests   the fla SSD kernel refusal tests, parity tests
#   ac graph  activation-checkpointing GPU tests; captured-vs-eager GPU tests
#   ssdbwd    kernels.ssd=mamba_train (SSD backward without recomputation): tests/gpu/test_ssd_gpu.py
#             (bit-identical to mamba_ssm's Functions), then benchmarks/ssd_backward.py (per layer)
#   ssdsweep  benchmarks/ssd_backward.py --arms kernel --sweep (the fused kernels' block sizes)
#   ssdbwdt ssdbwdb  ssdbwd's tests alone, its timing alone (likewise ssdfwdt, ssdfwdb)
#   ssdfwd    the fused SSD forward (MAMBA_TRAIN_SSD_FORWARD=fused, models/ssd_fwd_kernel.py):
#             tests/gpu/test_ssd_fwd_gpu.py, then benchmarks/ssd_backward.py --arms fwd (the
#             forward alone; ssdbwd's scan arm times it with the backward; SSDFWD_SWEEP=1: --sweep)
#   tp2ssd    mamba2-370m throughput, plain loop vs mamba_train with kernels.ssd=mamba_train
#             (SSD_FUSED=none|dcb_ddA|all picks ssd.fused_kernels, SSD_FORWARD=mamba_ssm|fused
#             ssd.forward_kernels)
#   prof2ssd  mamba2-370m captured step, kernels.ssd=mamba_train as a variant column
#   prof2ssdf prof2ssda  the same with MAMBA_TRAIN_SSD_FUSED=dcb_ddA / =all (models/ssd.py)
#   longctx3  the Mamba-3 arm of benchmarks/long_context.py
#   x2k       mamba2-370m with kernels.ssd=mamba_train (SSD_FUSED, SSD_FORWARD as for tp2ssd) and
#             without, against transformerpp-370m at 2k
#             (benchmarks/long_context.py, the crossover target of the SSD kernel work)
#   hyb64k    hybrid-370m on packed documents (~4k tokens each, document boundaries on) at 2k and
#             64k per window: tok/s and peak memory, attention through varlen flash attention
#   m3mb      mamba3-180m throughput at micro-batch 8 and 16 (the SISO grid's SM fill)
#   cp        context parallelism on the fused backend: two ranks as two processes on one GPU vs one
#   hm        the hybrid-family, MoE and init_from GPU tests (fused vs transformers, grouped experts)
#   gputests  every other file under tests/gpu (test_ssd_gpu.py is ssdbwd's, test_ssd_fwd_gpu.py
#             ssdfwd's)
#   seedband  the SSD kernel's seed band: mamba2-130m, 200 steps on standard-library text, arms
#             base= and ssd=kernels.ssd=mamba_train (SEEDBAND_SSD replaces the ssd arm's overrides,
#             SSD_FUSED picks ssd.fused_kernels), seeds 1234 1235 1236 (SEEDBAND_SEEDS) seed by
#             seed until the budget; benchmarks/seed_band.py --from-log combines several calls' logs
#   moeband   the MoE learning check: hybrid-moe-1b-a200m, 200 steps of 4 x 1024 (MOEBAND_MB,
#             MOEBAND_LEN), the grouped experts inside the per-expert loop's seed band
#   hybpeer   hybrid-370m: mamba_train against transformers' NemotronHForCausalLM in the plain loop
#   moetp     hybrid-moe-1b-a200m: grouped experts (captured, eager) vs the per-expert loop vs
#             transformers' NemotronHForCausalLM with its MoE layers, MFU on active FLOPs
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline GPU_RESULTS="$OUT/gpu_results.txt"
# Triton's autotune results cached on disk too (what the mamba-train CLI sets), for every part
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
BUDGET_S=${BUDGET_S:-540}
PEAK=989e12  # H200 dense bf16 (Lightning's table may not know "NVIDIA H200")
SHOW='CP case|SEEDBAND|MOE |LONGCTX|SSDBWD|kernels.ssd=mamba_train|ssd_bwd|OPS|THROUGHPUT|PLAIN|PEER|GRAPH|BEST|SSD |BUDGET|PROFILE|OTHER|fla-ssd|ARM|LONGCTX|first_step|passed|failed|FAILED|Error|error|captured after|capture failed|eager training step'

python3 -m pip install -q --no-index --no-deps --no-compile ${WHL:-.whl}/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1

run_part() {  # name, command...
  local name=$1; shift
  local left=$(( BUDGET_S - SECONDS ))
  (( ${PART_CAP_S:-0} > 0 && PART_CAP_S < left )) && left=$PART_CAP_S
  if (( left < 25 )); then echo "== $name SKIPPED (${left}s left of ${BUDGET_S})"; return; fi
  echo "== $name (limit ${left}s): $*"
  timeout -k 5 "$left" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? at ${SECONDS}s"
  grep -E "$SHOW" "$OUT/$name.log" | grep -v "^KERNEL" | cut -c1-240
  grep -E "^KERNEL" "$OUT/$name.log" | head -n 16 | cut -c1-200
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "
from importlib.metadata import version, PackageNotFoundError
for p in ('torch', 'triton', 'mamba_ssm', 'causal_conv1d', 'flash-linear-attention', 'lightning', 'deepspeed'):
    try: print(p, version(p))
    except PackageNotFoundError: print(p, 'MISSING')
" | tee -a "$OUT/device.txt"
TIMING=(--warmup 4 --windows 2 --window 6 --peak-flops "$PEAK")
PROF=(--warmup 6 --steps 4 --cuda-graph auto --top 8 --peak-flops "$PEAK")
PYTEST=(python3 -m pytest -q -p no:cacheprovider -rfE)
part() {  # one named part (the parts listed above)
  case $1 in
    # IEEE fp32 in Triton dots for the "fp32" parity cases (tl.dot defaults to TF32)
    m3tests) run_part m3tests env TRITON_F32_DEFAULT=ieee "${PYTEST[@]}" tests/gpu/test_mamba3_gpu.py \
           ${PYTEST_K:+-k "$PYTEST_K"} ;;
    m3bench) run_part m3bench python3 benchmarks/train_throughput.py --models ${M3BENCH_MODELS:-mamba3-180m mamba3-440m} \
           "${TIMING[@]}" --json "$OUT/throughput_mamba3.json" ;;
    reliab) run_part reliab "${PYTEST[@]}" tests/gpu/test_reliability_gpu.py ${RELIAB_K:+-k "$RELIAB_K"} ;;
    first) run_part first bash benchmarks/first_step.sh ;;
    prof2) run_part prof_mamba2 python3 benchmarks/profile_step.py --model mamba2-370m "${PROF[@]}" ;;
    prof1) run_part prof_mamba1 python3 benchmarks/profile_step.py --model mamba-370m "${PROF[@]}" ;;
    prof3) run_part prof_mamba3 python3 benchmarks/profile_step.py --model mamba3-180m "${PROF[@]}" ;;
    # the eager step's operators by GPU time (names the elementwise kernels), then the captured step
    ops3) run_part ops_mamba3 python3 benchmarks/profile_step.py --model mamba3-180m --skip-plain \
           --warmup 6 --steps 4 --cuda-graph off auto --ops 40 --top 8 --peak-flops "$PEAK" ;;
    tp1) run_part tp_mamba1 python3 benchmarks/train_throughput.py --models mamba-370m --fla-peer \
           "${TIMING[@]}" --json "$OUT/tp_mamba1.json" ;;
    tp2) run_part tp_mamba2 python3 benchmarks/train_throughput.py --models mamba2-370m --fla-peer \
           --ssd-kernel-fla "${TIMING[@]}" --json "$OUT/tp_mamba2.json" ;;
    refusal) run_part fla_refusal "${PYTEST[@]}" tests/gpu/test_fla_ssd.py -k "refused or boundaries" ;;
    normtests) run_part norm_tests "${PYTEST[@]}" tests/gpu/test_norm_backward_gpu.py ;;
    prof2ab) run_part prof2ab python3 benchmarks/profile_step.py --model mamba2-370m --skip-plain \
           "${PROF[@]}" --variant norm_backward=mamba_ssm:kernels.norm_backward=mamba_ssm ;;
    tp2only) run_part tp_mamba2 python3 benchmarks/train_throughput.py --models mamba2-370m \
           "${TIMING[@]}" --json "$OUT/tp_mamba2.json" ;;
    tp1only) run_part tp_mamba1 python3 benchmarks/train_throughput.py --models mamba-370m \
           "${TIMING[@]}" --json "$OUT/tp_mamba1.json" ;;
    flatests) run_part fla_tests env TRITON_F32_DEFAULT=ieee "${PYTEST[@]}" tests/gpu/test_fla_ssd.py ;;
    ssdbwd) part ssdbwdt; part ssdbwdb ;;
    ssdbwdt) run_part ssd_tests env TRITON_F32_DEFAULT=ieee "${PYTEST[@]}" -m "not slow" tests/gpu/test_ssd_gpu.py \
           ${PYTEST_K:+-k "$PYTEST_K"} ;;
    ssdbwdb) run_part ssd_backward python3 benchmarks/ssd_backward.py ;;
    ssdsweep) run_part ssd_sweep python3 benchmarks/ssd_backward.py --arms kernel --sweep ;;
    ssdfwd) part ssdfwdt; part ssdfwdb ;;
    ssdfwdt) run_part ssd_fwd_tests env TRITON_F32_DEFAULT=ieee "${PYTEST[@]}" tests/gpu/test_ssd_fwd_gpu.py \
           ${PYTEST_K:+-k "$PYTEST_K"} ;;
    ssdfwdb) run_part ssd_forward python3 benchmarks/ssd_backward.py --arms fwd ${SSDFWD_SWEEP:+--sweep} ;;
    tp2ssd) run_part tp_mamba2_ssd env MAMBA_TRAIN_SSD_FUSED=${SSD_FUSED:-none} \
           MAMBA_TRAIN_SSD_FORWARD=${SSD_FORWARD:-mamba_ssm} python3 benchmarks/train_throughput.py \
           --models mamba2-370m --override kernels.ssd=mamba_train "${TIMING[@]}" \
           --json "$OUT/tp_mamba2_ssd.json" ;;
    prof2ssd) run_part prof2ssd python3 benchmarks/profile_step.py --model mamba2-370m --skip-plain \
           "${PROF[@]}" --variant ssd=mamba_train:kernels.ssd=mamba_train ;;
    prof2ssdf) run_part prof2ssdf env MAMBA_TRAIN_SSD_FUSED=dcb_ddA python3 benchmarks/profile_step.py \
           --model mamba2-370m --skip-plain "${PROF[@]}" \
           --variant ssd_dcb_ddA=mamba_train:kernels.ssd=mamba_train ;;
    prof2ssda) run_part prof2ssda env MAMBA_TRAIN_SSD_FUSED=all python3 benchmarks/profile_step.py \
           --model mamba2-370m --skip-plain "${PROF[@]}" \
           --variant ssd_all=mamba_train:kernels.ssd=mamba_train ;;
    ac) run_part ac_tests "${PYTEST[@]}" tests/gpu/test_activation_checkpointing_gpu.py ${PYTEST_K:+-k "$PYTEST_K"} ;;
    # captured vs eager bit for bit under the deterministic mode: a process of its own
    graph) run_part graph_tests "${PYTEST[@]}" tests/gpu/test_cuda_graph_step.py ;;
    longctx3) run_part longctx3 python3 benchmarks/long_context.py --arms mamba3-370m --probe \
           --out "$OUT" --budget-s $(( BUDGET_S - SECONDS - 10 )) ;;
    x2k) run_part x2k python3 benchmarks/long_context.py --arms mamba2-370m transformerpp-370m \
           --seq-lens 2048 --probe --out "$OUT/x2k_base" --peak-flops "$PEAK" \
           --budget-s $(( (BUDGET_S - SECONDS) / 2 - 10 ))
         run_part x2k_ssd env MAMBA_TRAIN_SSD_FUSED=${SSD_FUSED:-none} \
           MAMBA_TRAIN_SSD_FORWARD=${SSD_FORWARD:-mamba_ssm} python3 benchmarks/long_context.py --arms mamba2-370m --seq-lens 2048 --probe \
           --ssm-override kernels.ssd=mamba_train --out "$OUT/x2k_ssd" --peak-flops "$PEAK" \
           --budget-s $(( BUDGET_S - SECONDS - 10 )) ;;
    hyb64k) run_part hyb64k python3 benchmarks/long_context.py --arms hybrid-370m --seq-lens 2048 65536 \
           --probe --doc-len 4096 --out "$OUT/hyb64k" --peak-flops "$PEAK" --budget-s $(( BUDGET_S - SECONDS - 10 )) ;;
    m3mb) run_part m3mb python3 benchmarks/train_throughput.py --models mamba3-180m --micro-batches 8 16 \
           "${TIMING[@]}" --json "$OUT/tp_mamba3_mb.json" ;;
    cp) run_part cp_tests "${PYTEST[@]}" -s tests/gpu/test_context_parallel_gpu.py
        run_part cp_glue "${PYTEST[@]}" --tb=line tests/test_fused_carried.py ;;
    hm) run_part hm_tests env TRITON_F32_DEFAULT=ieee "${PYTEST[@]}" --tb=line tests/gpu/test_hybrids_gpu.py \
           tests/gpu/test_moe_gpu.py tests/gpu/test_jamba_gpu.py tests/gpu/test_init_from_gpu.py ${PYTEST_K:+-k "$PYTEST_K"} ;;
    gputests) run_part gputests env TRITON_F32_DEFAULT=ieee "${PYTEST[@]}" tests/gpu \
           --deselect tests/gpu/test_cuda_graph_step.py --deselect tests/gpu/test_activation_checkpointing_gpu.py \
           --deselect tests/gpu/test_mamba3_gpu.py --deselect tests/gpu/test_reliability_gpu.py \
           --deselect tests/gpu/test_fla_ssd.py --deselect tests/gpu/test_ssd_gpu.py \
           --deselect tests/gpu/test_ssd_fwd_gpu.py ;;
    seedband) run_part seedband env MAMBA_TRAIN_SSD_FUSED=${SSD_FUSED:-none} python3 benchmarks/seed_band.py \
           --recipe mamba2-130m --arm base= --arm "ssd=${SEEDBAND_SSD:-kernels.ssd=mamba_train}" \
           --seeds ${SEEDBAND_SEEDS:-1234 1235 1236} --json "$OUT/seedband.json" \
           --budget-s $(( BUDGET_S - SECONDS - 30 )) ;;
    moeband) run_part moeband python3 benchmarks/seed_band.py --recipe hybrid-moe-1b-a200m \
           --micro-batch ${MOEBAND_MB:-4} --seq-len ${MOEBAND_LEN:-1024} --arm loop=++model.moe_cfg.impl=loop \
           --arm grouped=++model.moe_cfg.impl=grouped --baseline loop --seeds ${SEEDBAND_SEEDS:-1234 1235 1236} \
           --json "$OUT/moeband.json" --budget-s $(( BUDGET_S - SECONDS - 30 )) ;;
    hybpeer) run_part hybpeer python3 benchmarks/train_throughput.py --models hybrid-370m --hf-peer \
           "${TIMING[@]}" --json "$OUT/tp_hybrid.json" ;;
    moetp) run_part moetp python3 benchmarks/train_throughput.py --models hybrid-moe-1b-a200m --hf-peer \
           --moe-arms "${TIMING[@]}" --json "$OUT/tp_moe.json" ;;
    *) echo "unknown part $1" ;;
  esac
}
for p in "$@"; do part "$p"; done
echo "== done at ${SECONDS}s"; ls "$OUT"
