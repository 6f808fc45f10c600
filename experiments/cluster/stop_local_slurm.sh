#!/usr/bin/env bash
# Stops what start_local_slurm.sh started, by the PID files it keeps in $MMCL_SLURM_DIR.
set -uo pipefail
STATE=${MMCL_SLURM_DIR:-/tmp/mmcl-slurm}
stop() {  # stop PIDFILE: TERM, then KILL after 10 s
  local f=$1 pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}
scancel --user="$(id -un)" >/dev/null 2>&1 || true
for f in "$STATE"/slurmd-*.pid; do stop "$f"; done
stop "$STATE/slurmctld.pid"
stop "$STATE/munged.pid"
echo "local SLURM cluster stopped"
