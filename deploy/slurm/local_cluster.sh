#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests, CI and trying the sweep/multi-node scripts.
#
#   deploy/slurm/local_cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge (root)
#   deploy/slurm/local_cluster.sh start     # install if needed, write slurm.conf, start munged/slurmctld/slurmd
#   deploy/slurm/local_cluster.sh status    # sinfo; exit 0 only when the node is up
#   deploy/slurm/local_cluster.sh stop      # scontrol shutdown, stop the munged we started
#   deploy/slurm/local_cluster.sh env       # print `export SLURM_CONF=...` for the client commands
#
# Why this shape: CI machines and containers have no systemd, so the daemons are started directly
# (munged as the munge user, slurmctld and slurmd as root). A policy-rc.d that exits 101 stops the Debian
# package scripts from trying to start services during the install. Every step is idempotent: running
# `start` twice leaves one set of daemons; `stop` on a stopped cluster is a no-op.
#
# Environment: HIERSEG_SLURM_DIR (state, spool, logs; default /tmp/hierseg-slurm),
#              HIERSEG_SLURM_PARTITION (default "debug"), HIERSEG_SLURM_TIMEOUT (seconds to wait, default 60),
#              HIERSEG_SLURM_CRED_EXPIRE (AuthInfo cred_expire, default 20 s; a requeued job waits this + 1 s
#              before it may start again, 121 s with Slurm's default of 120; 20 s still leaves a loaded
#              machine ample time to launch a step). A changed slurm.conf applies on the next stop + start.
set -euo pipefail

STATE_DIR=${HIERSEG_SLURM_DIR:-/tmp/hierseg-slurm}
CONF=$STATE_DIR/slurm.conf
CRED_EXPIRE=${HIERSEG_SLURM_CRED_EXPIRE:-20}
PARTITION=${HIERSEG_SLURM_PARTITION:-debug}
TIMEOUT=${HIERSEG_SLURM_TIMEOUT:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)
export SLURM_CONF=$CONF

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts slurmd); try: sudo $0 $*"
}

installed() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null
}

do_install() {
  need_root install
  if installed; then echo "slurm and munge already installed"; return 0; fi
  command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} with your package manager"
  # Keep the package scripts from starting services (no systemd here); restore any existing policy after.
  local policy=/usr/sbin/policy-rc.d backup="" rc=0
  if [[ -e $policy ]]; then backup=$(mktemp) && cp -p "$policy" "$backup"; fi
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get update -qq; then rc=1
  elif ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null; then rc=2; fi
  if [[ -n $backup ]]; then mv -f "$backup" "$policy"; else rm -f "$policy"; fi
  ((rc != 1)) || die "apt-get update failed (no network or no Debian mirror?)"
  ((rc != 2)) || die "apt-get install ${PACKAGES[*]} failed"
  installed || die "packages installed but slurmctld/slurmd/sbatch/munged are not on PATH"
  echo "installed ${PACKAGES[*]}"
}

write_conf() {
  # The node line comes from the hardware slurmd sees (minus RealMemory, which would drain the node
  # when free memory varies); NodeAddr 127.0.0.1 keeps everything on loopback.
  local node_line host
  host=$(hostname -s)
  node_line=$(slurmd -C | head -n1 | sed -E 's/ RealMemory=[0-9]+//')
  mkdir -p "$STATE_DIR"/{ctld,spool,log}
  cat >"$CONF.tmp" <<CONF
# Written by deploy/slurm/local_cluster.sh: one-node cluster, no accounting, no cgroups.
ClusterName=hierseg
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
# The main scheduler also runs every sched_interval (default 60 s): a requeued job whose begin time has
# passed waits for that pass (16 s more in the requeue test, measured); one node and a handful of jobs make
# 2 s cheap.
SchedulerParameters=sched_interval=2
MaxArraySize=10001
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  mv -f "$CONF.tmp" "$CONF"
  # Client commands read /etc/slurm/slurm.conf unless SLURM_CONF is set: link it there when that is free.
  mkdir -p /etc/slurm
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then ln -sfn "$CONF" /etc/slurm/slurm.conf; fi
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- munged
  wait_for "munge" bash -c 'munge -n </dev/null | unmunge >/dev/null'
  touch "$STATE_DIR/started-munged"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what; logs: $STATE_DIR/log"
    sleep 0.5
  done
}

node_ready() { sinfo -h -o '%t' | grep -Eq '^(idle|mix|alloc)'; }

do_start() {
  need_root start
  installed || do_install
  mkdir -p "$STATE_DIR"
  write_conf
  start_munge
  pid_alive "$STATE_DIR/slurmctld.pid" || slurmctld
  wait_for "slurmctld" scontrol ping
  pid_alive "$STATE_DIR/slurmd.pid" || slurmd
  wait_for "node $(hostname -s) to become idle (sinfo)" node_ready
  sinfo
  echo "Slurm is up; client commands use SLURM_CONF=$CONF (also linked from /etc/slurm/slurm.conf)"
}

do_stop() {
  if [[ -f $CONF ]] && { pid_alive "$STATE_DIR/slurmctld.pid" || pid_alive "$STATE_DIR/slurmd.pid"; }; then
    scontrol shutdown >/dev/null 2>&1 || true
    local deadline=$((SECONDS + TIMEOUT))
    while pid_alive "$STATE_DIR/slurmctld.pid" || pid_alive "$STATE_DIR/slurmd.pid"; do
      ((SECONDS < deadline)) || die "slurm daemons still running after ${TIMEOUT}s"
      sleep 0.5
    done
  fi
  if [[ -f $STATE_DIR/started-munged && -s /run/munge/munged.pid ]]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    rm -f "$STATE_DIR/started-munged"
  fi
  echo "Slurm stopped"
}

do_status() {
  if [[ ! -f $CONF ]]; then echo "not configured (run: $0 start)"; return 1; fi
  sinfo 2>&1 || return 1
  node_ready
}

case ${1:-} in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 {install|start|stop|status|env}" >&2; exit 2 ;;
esac
