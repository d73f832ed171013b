#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and CI (run as root).
#
#   bash slurm/local_cluster.sh up       install slurm-wlm + munge if needed, start munged,
#                                        slurmctld and slurmd, wait until the node is idle
#   bash slurm/local_cluster.sh status   sinfo / squeue, or "down"
#   bash slurm/local_cluster.sh down     stop the daemons, remove the state and the config
#
# State, logs and spool live under $HPCPS_SLURM_DIR (default: $TMPDIR/hpcps-slurm). The
# config is written to /etc/slurm/slurm.conf (where every Slurm command looks for it), marked
# as ours; `down` removes it only if it still carries that mark.
set -euo pipefail

STATE_DIR="${HPCPS_SLURM_DIR:-${TMPDIR:-/tmp}/hpcps-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by hpcps slurm/local_cluster.sh"
MUNGE_PID=/run/munge/munged.pid

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "run as root (the daemons and /etc/slurm need it)"
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munged missing and no apt-get to install them"
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  if [ -f "$MUNGE_PID" ] && kill -0 "$(cat "$MUNGE_PID")" 2>/dev/null; then
    return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chmod 400 /etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  # run as the munge user when it exists (munged refuses root without --force)
  if id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c "munged" || munged --force
  else
    munged --force
  fi
  for _ in $(seq 50); do
    munge -n </dev/null >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged did not start"
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and is not ours: not overwriting a real cluster's config"
  fi
  local node host cpus mem
  node="$(slurmd -C | head -n 1)"   # NodeName=<host> CPUs=... RealMemory=... of this machine
  host="$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$node")"
  cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")"
  mem="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")"
  # small CI machines: offer at least HPCPS_SLURM_CPUS (default 4) slots, so a job can run
  # a server and a few workers on 2 cores (config_overrides: slurmd trusts this number)
  local min_cpus="${HPCPS_SLURM_CPUS:-4}"
  [ "$cpus" -ge "$min_cpus" ] || cpus="$min_cpus"
  mkdir -p "$STATE_DIR"/{state,spool} /etc/slurm
  cat >"$CONF" <<EOF
$MARK (state in $STATE_DIR)
ClusterName=hpcpslocal
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120: too slow for tests)
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
KillWait=10
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
  for _ in $(seq 120); do
    state="$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)"
    case "$state" in
      idle|mixed|allocated) say "node is $state"; sinfo; return ;;
    esac
    sleep 0.5
  done
  say "slurmctld log:"; tail -n 20 "$STATE_DIR/slurmctld.log" >&2 || true
  say "slurmd log:"; tail -n 20 "$STATE_DIR/slurmd.log" >&2 || true
  die "the node did not become idle (state '${state:-none}')"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  need_root
  install_packages
  start_munge
  write_config
  pid_alive "$STATE_DIR/slurmctld.pid" || slurmctld
  pid_alive "$STATE_DIR/slurmd.pid" || slurmd
  wait_idle
}

stop_pidfile() {
  local file="$1"
  pid_alive "$file" || return 0
  local pid
  pid="$(cat "$file")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  need_root
  if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
    scancel --full --quiet --user=root 2>/dev/null || true
    stop_pidfile "$STATE_DIR/slurmd.pid"
    stop_pidfile "$STATE_DIR/slurmctld.pid"
    rm -f "$CONF"
  fi
  stop_pidfile "$MUNGE_PID"
  rm -rf "$STATE_DIR"
  say "down"
}

status() {
  if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF" && pid_alive "$STATE_DIR/slurmctld.pid"; then
    sinfo
    squeue
  else
    echo "down"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
