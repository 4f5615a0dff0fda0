#!/usr/bin/env bash
# Stop a cluster started by start_cluster.sh: tests/slurm/stop_cluster.sh <cluster dir> [--keep]
# Cancels its jobs, stops slurmd, slurmctld and munged by the PIDs that start_cluster.sh started
# (never by name), then removes the directory unless --keep.
set -uo pipefail
W=${1:?usage: stop_cluster.sh <cluster dir> [--keep]}
[[ -f $W/slurm.conf ]] || { echo "stop_cluster: $W is not a cluster dir" >&2; exit 1; }
export SLURM_CONF=$W/slurm.conf
scancel --full --quiet --partition=debug 2>/dev/null || true

stop_pid() {  # TERM, wait up to 5 s, then KILL
    local pid=$1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}
for f in slurmd.launcher.pid slurmctld.launcher.pid munge/munged.pid; do
    [[ -f $W/$f ]] && stop_pid "$(cat "$W/$f")"
done
[[ ${2:-} == --keep ]] || rm -rf "$W"
exit 0
