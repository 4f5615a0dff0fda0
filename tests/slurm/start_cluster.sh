#!/usr/bin/env bash
# Start a real one-machine SLURM (slurmctld + slurmd + munged) in a fresh directory, for tests.
#
#   W=$(tests/slurm/start_cluster.sh)            # prints the cluster dir on the last line
#   export SLURM_CONF=$W/slurm.conf              # (also in $W/env.sh) for sbatch/squeue/scancel
#   ... sbatch launch.sh ...
#   tests/slurm/stop_cluster.sh "$W"
#
# Installs slurm-wlm and munge with apt if they are missing (needs root; idempotent). Everything
# (config, state, spool, logs, munge key and socket, pid files) lives under one `mktemp -d`
# directory, so no old jobs come back and two clusters (other test sessions) do not meet: the
# ports are picked free. Settings (found by trial with Debian's slurm-wlm 22.05, no systemd or
# cgroups): linuxproc process tracking, no task plugin or cgroups, cons_tres/CR_CPU, no
# accounting, root as SlurmUser/SlurmdUser, munge with a private key, cred_expire=5 and 1-second
# scheduler passes (a requeued job restarts ~6 s later instead of ~2 min), JobRequeue=1.
# Exit codes: 0 up; 3 cannot install (not root / no apt); 4 started but the node never got idle.
set -euo pipefail

log() { echo "start_cluster: $*" >&2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "slurm-wlm/munge are not installed and cannot be installed here (needs root and apt-get)"
        exit 3
    fi
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || true
    apt-get install -y -qq slurm-wlm munge >&2 || { log "apt-get install slurm-wlm munge failed"; exit 3; }
fi
if [[ $(id -u) -ne 0 ]]; then
    log "slurmd must run as root here (SlurmdUser=root, no cgroups)"
    exit 3
fi

W=${1:-$(mktemp -d "${TMPDIR:-/tmp}/mamba-slurm.XXXXXX")}
mkdir -p "$W"/{state,spool,log,munge}
chmod 755 "$W" "$W/munge"              # munge's socket folder and its parents must be 755
HOST=$(hostname -s)
NCPU=$(nproc)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
CTLD_PORT=$(free_port); SLURMD_PORT=$(free_port)
while [[ $SLURMD_PORT == "$CTLD_PORT" ]]; do SLURMD_PORT=$(free_port); done

# munge: private key and socket
rm -f "$W/munge/munge.key"
mungekey --create --keyfile="$W/munge/munge.key" >&2 2>/dev/null \
    || dd if=/dev/urandom of="$W/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$W/munge/munge.key"
munged --force --socket="$W/munge/munge.socket" --key-file="$W/munge/munge.key" \
    --pid-file="$W/munge/munged.pid" --log-file="$W/munge/munged.log" \
    --seed-file="$W/munge/munged.seed" >&2

cat > "$W/slurm.conf" <<CONF
ClusterName=mambatest
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${W}/munge/munge.socket,cred_expire=5
StateSaveLocation=${W}/state
SlurmdSpoolDir=${W}/spool
SlurmctldPidFile=${W}/slurmctld.pid
SlurmdPidFile=${W}/slurmd.pid
SlurmctldLogFile=${W}/log/slurmctld.log
SlurmdLogFile=${W}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
SchedulerParameters=bf_interval=1,sched_interval=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${NCPU} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$W/slurm.conf"
echo "export SLURM_CONF=$W/slurm.conf" > "$W/env.sh"

slurmctld -D -f "$SLURM_CONF" >"$W/log/slurmctld.out" 2>&1 &
echo $! > "$W/slurmctld.launcher.pid"
slurmd -D -f "$SLURM_CONF" >"$W/log/slurmd.out" 2>&1 &
echo $! > "$W/slurmd.launcher.pid"

for _ in $(seq 1 150); do   # up to 30 s
    state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
    if [[ $state == idle ]]; then
        log "up: $W (node $HOST, $NCPU CPUs, slurmctld port $CTLD_PORT)"
        echo "$W"
        exit 0
    fi
    sleep 0.2
done
log "the node did not become idle (state: ${state:-none}); logs in $W/log"
tail -n 20 "$W/log/slurmctld.log" "$W/log/slurmd.log" >&2 || true
echo "$W"
exit 4
