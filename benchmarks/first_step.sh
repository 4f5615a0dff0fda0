#!/usr/bin/env bash
# Time to first optimizer step of a short Mamba-2 GPU run, three times with the same shapes:
#   cold  : empty Triton cache (compile + autotune everything)
#   warm  : same TRITON_CACHE_DIR, TRITON_CACHE_AUTOTUNING=1 (mamba-train's default)
#   warm-noautotune-cache : same cache dir, TRITON_CACHE_AUTOTUNING=0 (compiled kernels reused,
#           autotune re-benchmarked: what a run gets without the autotune cache)
# Each run: recipe=debug-mamba2 with model=mamba2-130m's mixer (d_model 768, mamba_ssm's Mamba2
# defaults: d_state 128, headdim 64, chunk 256) in 4 layers, vocab 4096 (the bundled corpus), seq 2048, 6 steps,
# one validation at the end (so the text samples' GPU cost shows in the log). Results: one
# "first_step" line per run, and $OUT/<name>/{summary.json,mamba-train.log,stdout.txt}.
set -u
OUT=${OUT:-/tmp/first_step_out}
CACHE=$(mktemp -d /tmp/mt-triton.XXXX)   # fresh: the first run is cold
mkdir -p "$OUT"
run() {
  local name=$1; shift
  local t0=$(date +%s.%N)
  local limit=$1; shift
  env TRITON_CACHE_DIR="$CACHE" "$@" timeout "$limit" python3 -m mamba_train recipe=debug-mamba2 \
    model=mamba2-130m model.n_layer=4 model.vocab_size=4096 data.seq_len=2048 data.micro_batch_size=4 \
    train.global_batch_tokens=8192 trainer.max_steps=6 trainer.log_every_n_steps=2 \
    train.val_every_n_steps=6 trainer.limit_val_batches=2 logger=csv \
    hydra.run.dir="$OUT/$name" > "$OUT/$name.stdout.txt" 2>&1
  local rc=$? t1=$(date +%s.%N)
  local ttfs=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1])).get('time_to_first_step_s'))" "$OUT/$name/summary.json" 2>/dev/null)
  echo "first_step $name rc=$rc time_to_first_step_s=$ttfs process_wall_s=$(python3 -c "print(round($t1-$t0,1))") triton_cache_mb=$(du -sm "$CACHE" | cut -f1)"
  grep -E "step [0-9]+/|val  step|samples at|compiling|first optimizer step" "$OUT/$name.stdout.txt" | head -8
}
run cold 140
run warm 60
if (( SECONDS < 120 )); then run warm-noautotune-cache 50 TRITON_CACHE_AUTOTUNING=0
else echo "first_step warm-noautotune-cache SKIPPED (time budget)"; fi
echo "--- tail of the cold run's stdout:"; tail -25 "$OUT/cold.stdout.txt"
rm -rf "$CACHE"
