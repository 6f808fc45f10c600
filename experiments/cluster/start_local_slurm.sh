#!/usr/bin/env bash
# A one-machine SLURM cluster for trying `mmcl launch --launcher slurm` and for the SLURM tests:
# munge, a controller and two simulated nodes (n1, n2) on this host, no systemd needed.
#
#   sudo bash experiments/cluster/start_local_slurm.sh     # installs slurm-wlm + munge (apt) if missing
#   srun -N 2 hostname; sinfo
#   sudo bash experiments/cluster/stop_local_slurm.sh      # stops the daemons by their PID files
#
# Root is needed (apt, munge's key, /etc/slurm/slurm.conf). Daemons keep their state, logs and PID
# files under $MMCL_SLURM_DIR (default /tmp/mmcl-slurm). Starting again when the cluster answers is
# a no-op. An existing /etc/slurm/slurm.conf not written by this script is never replaced.
set -euo pipefail

STATE=${MMCL_SLURM_DIR:-/tmp/mmcl-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by mmcl experiments/cluster/start_local_slurm.sh"

if [[ $(id -u) != 0 ]]; then
  echo "start_local_slurm.sh: error: needs root (apt-get, munge key, $CONF)" >&2
  exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  echo "installing slurm-wlm and munge (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
  echo "start_local_slurm.sh: error: $CONF exists and was not written by this script; not replacing it" >&2
  exit 2
fi

# Already running and answering? Then nothing to do.
if [[ -f $STATE/slurmctld.pid ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null \
   && timeout 20 srun -N 2 -t 1 true >/dev/null 2>&1; then
  echo "local SLURM cluster already running (state in $STATE)"
  exit 0
fi
bash "$(dirname "$0")/stop_local_slurm.sh" >/dev/null 2>&1 || true

mkdir -p "$STATE"/ctld "$STATE"/spool
HOST=$(hostname -s)
# Each simulated node offers this machine's CPUs; RealMemory must not exceed what slurmd -C reports.
CPUS=$(nproc)
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$(( ${MEM:-2048} / 2 ))

mkdir -p /etc/slurm
cat > "$CONF" <<CONFEOF
$MARKER
ClusterName=mmcl-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmctldPort=16817
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
# No cgroup freezer here (containers): track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONFEOF

# munge: Debian's package creates the key; make one if it is missing.
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge: /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge: /run/munge /var/log/munge /var/lib/munge
if ! pgrep -u munge -x munged >/dev/null; then
  runuser -u munge -- munged --pid-file="/run/munge/munged.pid"
  cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || true
fi

slurmctld -i   # -i: ignore state from an earlier cluster in $STATE (fresh job ids, no stale jobs)
slurmd -N n1
slurmd -N n2

# Ready when a job step runs on both nodes (sinfo may show nodes idle that cannot run tasks).
for _ in $(seq 1 60); do
  if timeout 20 srun -N 2 -t 1 true >/dev/null 2>&1; then
    echo "local SLURM cluster up: nodes n1, n2 on $HOST (state, logs and PID files in $STATE)"
    exit 0
  fi
  scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
  sleep 0.5
done
echo "start_local_slurm.sh: error: the cluster did not run a test job within 30 s; see $STATE/*.log" >&2
exit 1
