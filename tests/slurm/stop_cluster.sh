#!/usr/bin/env bash
# Stop a cluster started by start_cluster.sh: tests/slurm/stop_cluster.sh <cluster dir> [--keep]
# Cancels its jobs, stops slurmd, slurmctld and munged by the PIDs that start_cluster.sh started
# (never by name), then removes the directory unless --keep.
set -uo pipefail
W=${1:?usage: stop_cluster.sh <cluster dir> [--keep]}
[[ -f $W/slurm.conf ]] || { echo "stop_cluster: $W is not a cluster dir" >&2; exit 1; }
export SLURM_CONF=$W/slurm.conf
scancel --full --quiet --partition=debug 2>/dev/null || true

pids=()
for f in slurmd.launcher.pid slurmctld.launcher.pid munge/munged.pid; do
    [[ -f $W/$f ]] && pids+=("$(cat "$W/$f")")
done
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done   # all at once,
for _ in $(seq 1 50); do                                                  # up to 5 s,
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
done
for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done   # then KILL
[[ ${2:-} == --keep ]] || rm -rf "$W"
exit 0
