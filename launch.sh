#!/usr/bin/env bash
#SBATCH --job-name=mamba_train
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# The #SBATCH lines serve a direct `sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G
# launch.sh <overrides>`; ./launch.sh [options] passes all of them itself (see --help).
set -euo pipefail

usage() {
    cat <<'USAGE'
launch.sh -- train mamba_train on SLURM, one or many nodes, preemption-safe.

  ./launch.sh [options] [--] [Hydra overrides ...]

Submits itself with sbatch; inside the job it sets the rendezvous from the SLURM variables and
runs one rank per GPU with `srun python -m mamba_train <overrides> cluster=slurm ckpt_path=last
trainer.devices=<tasks per node> trainer.num_nodes=<nodes>`. Lightning reads ranks and world
size from SLURM (cluster=slurm).

Options (each also read from the environment variable in brackets):
  -N, --nodes N            nodes [NODES, default 1]
  -g, --gpus-per-node G    GPUs per node = ranks per node [GPUS_PER_NODE, default 8]
      --cpu                train on CPUs instead of GPUs (tests, debugging) [ACCELERATOR=cpu]
      --tasks-per-node T   ranks per node [TASKS_PER_NODE, default: GPUs per node; --cpu: 1]
  -c, --cpus-per-task C    CPU cores per rank (data-loader workers) [CPUS_PER_TASK, default 8; --cpu: 1]
  -t, --time T             wall-time limit, e.g. 24:00:00 [TIME, default 24:00:00]
  -p, --partition P        partition [PARTITION, default: the cluster's default]
  -A, --account A          account to charge [ACCOUNT]
  -q, --qos Q              quality of service [QOS]
  -J, --job-name NAME      job name [JOB_NAME, default mamba_train; not bash/interactive, which
                           Lightning takes for an interactive session]
      --signal-seconds S   SIGUSR1 this many seconds before the time limit [SIGNAL_SECONDS, default 300]
  -o, --output PATH        job log, %x = job name, %j = job id [OUTPUT, default slurm-%x-%j.out]
      --sbatch ARG         any other sbatch option, repeatable (e.g. --sbatch=--exclusive)
      --python EXE         Python of the environment to run [PYTHON, default python]
      --dry-run            print the sbatch command instead of submitting it
  -h, --help               this help

Preemption and the time limit: SLURM sends SIGUSR1 to the batch shell S seconds before --time
(`--signal=B:USR1@S`; test or force it with `scancel --signal=USR1 --batch <jobid>`). launch.sh
forwards it to the ranks; within two optimizer steps all ranks save checkpoints/last.ckpt together,
rank 0 requeues the job (`scontrol requeue`, needs --requeue, set here) and training stops. The
requeued job (SLURM_RESTART_COUNT=1, 2, ...) runs the same command with ckpt_path=last and continues
from that step, data position included. The run directory is <output dir>/<run_name>, so keep
run_name (default: the recipe name) stable and the output dir on a shared filesystem
(MAMBA_TRAIN_OUTPUT_DIR or paths.output_dir=...). Set S above the time one checkpoint takes.

Examples:
  ./launch.sh -N 2 -g 8 -p gpu -A myproj -t 48:00:00 -- recipe=mamba-1.4b run_name=m14b
  ./launch.sh -N 4 -g 8 -- recipe=mamba2-2.7b strategy=fsdp strategy.state_dict_type=sharded
  NODES=2 GPUS_PER_NODE=4 PARTITION=gpu ./launch.sh recipe=mamba-370m
  ./launch.sh --cpu --tasks-per-node 2 -t 00:10:00 -- recipe=debug-mamba2 trainer.max_steps=50
  sbatch -N 2 --ntasks-per-node=8 --gpus-per-node=8 launch.sh recipe=mamba-370m  # plain sbatch
USAGE
}

NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ACCELERATOR=${ACCELERATOR:-gpu}
TASKS_PER_NODE=${TASKS_PER_NODE:-}
CPUS_PER_TASK=${CPUS_PER_TASK:-}
TIME=${TIME:-24:00:00}
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
QOS=${QOS:-}
JOB_NAME=${JOB_NAME:-mamba_train}
SIGNAL_SECONDS=${SIGNAL_SECONDS:-300}
OUTPUT=${OUTPUT:-slurm-%x-%j.out}
PYTHON=${PYTHON:-python}
DRY_RUN=0
EXTRA_SBATCH=()
OVERRIDES=()

die() { echo "launch.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        -N|--nodes) need "$@"; NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        -g|--gpus-per-node) need "$@"; GPUS_PER_NODE=$2; shift 2 ;;
        --gpus-per-node=*) GPUS_PER_NODE=${1#*=}; shift ;;
        --cpu) ACCELERATOR=cpu; shift ;;
        --tasks-per-node) need "$@"; TASKS_PER_NODE=$2; shift 2 ;;
        --tasks-per-node=*) TASKS_PER_NODE=${1#*=}; shift ;;
        -c|--cpus-per-task) need "$@"; CPUS_PER_TASK=$2; shift 2 ;;
        --cpus-per-task=*) CPUS_PER_TASK=${1#*=}; shift ;;
        -t|--time) need "$@"; TIME=$2; shift 2 ;;
        --time=*) TIME=${1#*=}; shift ;;
        -p|--partition) need "$@"; PARTITION=$2; shift 2 ;;
        --partition=*) PARTITION=${1#*=}; shift ;;
        -A|--account) need "$@"; ACCOUNT=$2; shift 2 ;;
        --account=*) ACCOUNT=${1#*=}; shift ;;
        -q|--qos) need "$@"; QOS=$2; shift 2 ;;
        --qos=*) QOS=${1#*=}; shift ;;
        -J|--job-name) need "$@"; JOB_NAME=$2; shift 2 ;;
        --job-name=*) JOB_NAME=${1#*=}; shift ;;
        --signal-seconds) need "$@"; SIGNAL_SECONDS=$2; shift 2 ;;
        --signal-seconds=*) SIGNAL_SECONDS=${1#*=}; shift ;;
        -o|--output) need "$@"; OUTPUT=$2; shift 2 ;;
        --output=*) OUTPUT=${1#*=}; shift ;;
        --sbatch) need "$@"; EXTRA_SBATCH+=("$2"); shift 2 ;;
        --sbatch=*) EXTRA_SBATCH+=("${1#*=}"); shift ;;
        --python) need "$@"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; OVERRIDES+=("$@"); break ;;
        -*) die "unknown option $1 (Hydra overrides have no leading dash; see --help)" ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done

for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    case $o in
        ckpt_path=*|+ckpt_path=*) die "$o: launch.sh always resumes with ckpt_path=last (pick the run with run_name=...)" ;;
        cluster=*|trainer.devices=*|trainer.num_nodes=*|trainer.accelerator=*)
            die "$o is set by launch.sh from the allocation (use --nodes/--gpus-per-node/--cpu)" ;;
    esac
done

# ------------------------------------------------------------------------------ inside the job
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    tasks=${SLURM_NTASKS_PER_NODE:-}
    tasks=${tasks%%(*}    # "8(x2)" -> 8
    if [[ -z $tasks ]]; then
        die "SLURM_NTASKS_PER_NODE is not set: submit with --ntasks-per-node (Lightning needs it)"
    fi
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}" | head -n1)
    export MASTER_ADDR
    # a new port per restart: the previous run's may still be in TIME_WAIT
    export MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 16 + ${SLURM_RESTART_COUNT:-0}) % 20000))}
    echo "launch.sh: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} | ${nodes} node(s) x ${tasks} rank(s) (${ACCELERATOR}) | rendezvous ${MASTER_ADDR}:${MASTER_PORT} | $(date -Is)"

    # srun (SLURM >= 22.05) no longer inherits --cpus-per-task: pass it on (data-loader workers)
    export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
    # One rank per task; each writes its own Hydra log (<run dir>/rank<N>.log), rank 0 the config.
    # shellcheck disable=SC2016
    srun --kill-on-bad-exit=1 --label bash -c '
        extra=("hydra.job.name=rank${SLURM_PROCID}")
        [[ ${SLURM_PROCID} == 0 ]] || extra+=("hydra.output_subdir=null")
        exec "$@" "${extra[@]}"' launch-rank \
        "$PYTHON" -m mamba_train "${OVERRIDES[@]+"${OVERRIDES[@]}"}" cluster=slurm ckpt_path=last \
        "trainer.accelerator=${ACCELERATOR}" "trainer.devices=${tasks}" "trainer.num_nodes=${nodes}" &
    srun_pid=$!
    # SIGUSR1 reaches this shell (--signal=B:USR1@S, scancel --signal=USR1 --batch); srun passes
    # it on to every rank. A trap runs between commands, so wait on srun in the background.
    trap 'echo "launch.sh: SIGUSR1 -> ranks (checkpoint, requeue)"; kill -USR1 "$srun_pid" 2>/dev/null || true' USR1
    status=0
    while true; do
        wait "$srun_pid" && status=0 || status=$?
        kill -0 "$srun_pid" 2>/dev/null || break   # else wait was interrupted by the trap
    done
    echo "launch.sh: job ${SLURM_JOB_ID} ranks exited with ${status} | $(date -Is)"
    exit "$status"
fi

# ------------------------------------------------------------------------------ submit
[[ $ACCELERATOR == gpu || $ACCELERATOR == cpu ]] || die "ACCELERATOR must be gpu or cpu, got $ACCELERATOR"
case ${JOB_NAME} in bash|interactive) die "job name '$JOB_NAME' makes Lightning think this is an interactive session" ;; esac
if [[ $ACCELERATOR == cpu ]]; then
    TASKS_PER_NODE=${TASKS_PER_NODE:-1}
    CPUS_PER_TASK=${CPUS_PER_TASK:-1}
else
    TASKS_PER_NODE=${TASKS_PER_NODE:-$GPUS_PER_NODE}
    CPUS_PER_TASK=${CPUS_PER_TASK:-8}
fi
cmd=(sbatch --parsable --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE"
     --cpus-per-task="$CPUS_PER_TASK" --time="$TIME" --signal="B:USR1@${SIGNAL_SECONDS}"
     --requeue --open-mode=append --output="$OUTPUT"
     --export="ALL,ACCELERATOR=${ACCELERATOR},PYTHON=${PYTHON}")
[[ $ACCELERATOR == gpu ]] && cmd+=(--gpus-per-node="$GPUS_PER_NODE")
[[ -n $PARTITION ]] && cmd+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && cmd+=(--account="$ACCOUNT")
[[ -n $QOS ]] && cmd+=(--qos="$QOS")
cmd+=("${EXTRA_SBATCH[@]+"${EXTRA_SBATCH[@]}"}" "${BASH_SOURCE[0]}" -- "${OVERRIDES[@]+"${OVERRIDES[@]}"}")

if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
jobid=$("${cmd[@]}")
echo "submitted job ${jobid}: ${NODES} node(s) x ${TASKS_PER_NODE} rank(s) (${ACCELERATOR}); log: ${OUTPUT//%j/$jobid}" >&2
echo "$jobid"
