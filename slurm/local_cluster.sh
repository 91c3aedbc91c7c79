#!/usr/bin/env bash
# A real SLURM cluster on one machine, for the tests (tests/test_slurm.py) and for trying the sbatch
# scripts: munged, slurmctld and two slurmd (node1, node2) with one partition.
#
#   slurm/local_cluster.sh start | stop | status | env | --help
#
# Everything it writes (slurm.conf, munge key and socket, state, spool, logs, pid files) lives under
# $SEEDLM_SLURM_DIR (default /tmp/seedlm-slurm), so it never touches a system SLURM or munge. The only
# things outside that folder: Debian's packages (installed when missing) and two /etc/hosts lines
# (127.0.0.2 node1, 127.0.0.3 node2), added once and left in place.
#
# Clients (sbatch, squeue, scontrol, ...) find this cluster through SLURM_CONF:
#   eval "$(slurm/local_cluster.sh env)"
set -euo pipefail

DIR="${SEEDLM_SLURM_DIR:-/tmp/seedlm-slurm}"
CTLD_PORT="${SEEDLM_SLURMCTLD_PORT:-16817}"    # not 6817, so a system slurmctld on this host is not disturbed
NODE_PORTS=("${SEEDLM_SLURMD_PORT1:-17001}" "${SEEDLM_SLURMD_PORT2:-17002}")  # one port per slurmd
NODES=(node1 node2)
NODE_ADDRS=(127.0.0.2 127.0.0.3)
CONF="$DIR/etc/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket"
PACKAGES=(slurmctld slurmd slurm-client munge)

usage() {
    cat <<EOF
Usage: $(basename "$0") start|stop|status|env

  start   install Debian's ${PACKAGES[*]} if missing (needs root), add /etc/hosts entries
          for ${NODES[*]} (${NODE_ADDRS[*]}), write $CONF and start munged, slurmctld
          and one slurmd per node. Idempotent: running daemons are left alone. Each start begins
          with an empty queue (slurmctld -c): this cluster is for tests and trials.
  stop    cancel this cluster's jobs, then end the daemons it started, by the pids in its pid files.
  status  show the daemons and sinfo; exit 0 when all are running, 3 otherwise.
  env     print 'export SLURM_CONF=...' for eval, so sbatch/squeue/scontrol talk to this cluster.

Environment: SEEDLM_SLURM_DIR (default /tmp/seedlm-slurm), SEEDLM_SLURMCTLD_PORT (16817),
SEEDLM_SLURMD_PORT1/2 (17001/17002).
EOF
}

log() { echo "[local_cluster] $*" >&2; }

# pid file -> expected process name, so that stop/status never act on a recycled pid
pid_files() {
    echo "$DIR/run/munged.pid munged"
    echo "$DIR/run/slurmctld.pid slurmctld"
    local n
    for n in "${NODES[@]}"; do echo "$DIR/run/slurmd-$n.pid slurmd"; done
}

# Prints the pid recorded in $1 if that process is alive and is the program $2.
live_pid() {
    local file=$1 name=$2 pid
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] && [[ -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]] || return 1
    echo "$pid"
}

ensure_packages() {
    local missing=0 cmd
    for cmd in munged slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || missing=1; done
    ((missing)) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        log "SLURM is not installed and installing it needs root: apt-get install ${PACKAGES[*]}"
        exit 4
    fi
    command -v apt-get >/dev/null || { log "no apt-get: install ${PACKAGES[*]} by other means"; exit 4; }
    log "installing ${PACKAGES[*]} (apt-get)"
    # no service may be started by the package scripts: this script runs its own daemons
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
}

# The node names must resolve (MASTER_ADDR is the first host of the job's node list). Only our own
# lines are appended; nothing else in /etc/hosts is changed. Append in place (>>), never replace the
# file: in containers /etc/hosts is often a bind mount.
ensure_hosts() {
    local i
    for i in "${!NODES[@]}"; do
        if ! grep -Eq "^[[:space:]]*${NODE_ADDRS[i]//./\\.}[[:space:]]+(.*[[:space:]])?${NODES[i]}([[:space:]]|$)" /etc/hosts; then
            if [[ -w /etc/hosts ]]; then
                # a last line without its newline would otherwise be joined with ours
                if [[ -s /etc/hosts && -n $(tail -c 1 /etc/hosts) ]]; then echo >>/etc/hosts; fi
                echo "${NODE_ADDRS[i]} ${NODES[i]}" >>/etc/hosts
                log "added '${NODE_ADDRS[i]} ${NODES[i]}' to /etc/hosts"
            else
                log "cannot write /etc/hosts: add '${NODE_ADDRS[i]} ${NODES[i]}' as root"
                exit 4
            fi
        fi
    done
}

write_config() {
    local host cpus mem tmp
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)  # MiB per node: the two share the machine
    mkdir -p "$DIR"/{etc,munge,run,log,state,spool}
    tmp=$(mktemp "$DIR/etc/slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
# Written by slurm/local_cluster.sh: two nodes on one machine for tests. Do not edit; re-run start.
ClusterName=seedlm-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
# our own munged, so a system munge (or none) does not matter. cred_expire is also how long a
# requeued job waits before it may start again (default 120 s): short, so the requeue test is quick.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
# %n: each slurmd gets its own pid file, spool and log (two daemons on one host)
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool/%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
# no cgroups in containers: track processes through /proc, no task binding, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
# schedule every 2 s instead of every 30-60 s: a requeued job only becomes eligible after cred_expire and
# would otherwise wait for the next periodic pass
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# finished jobs stay visible to scontrol for 10 minutes (there is no accounting database)
MinJobAge=600
KillWait=30
InactiveLimit=0
Waittime=0
EOF
    local i
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[i]} NodeHostname=$host NodeAddr=${NODE_ADDRS[i]} Port=${NODE_PORTS[i]} CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$tmp"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$tmp"
    CONF_CHANGED=0
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        [[ -f $CONF ]] && CONF_CHANGED=1
        mv "$tmp" "$CONF"
    fi
    chmod 0644 "$CONF"
}

start_munge() {
    if live_pid "$DIR/run/munged.pid" munged >/dev/null; then return 0; fi
    # munged is strict about permissions: key readable only by its owner, socket dir not world-writable
    chmod 0700 "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        (umask 077; head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
    fi
    chmod 0400 "$DIR/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: we run it as root and under /tmp (sticky, world-writable parent), which munged
    # otherwise refuses; the files themselves are private to root.
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    wait_for "munged" "[[ -S $MUNGE_SOCKET ]] && live_pid $DIR/run/munged.pid munged >/dev/null"
}

start_slurmctld() {
    if live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then return 0; fi
    rm -f "$DIR/run/slurmctld.pid"
    # -c: an empty queue on each start (no jobs from a previous session come back to life)
    slurmctld -c -f "$CONF"
    wait_for "slurmctld" "SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q UP"
}

start_slurmd() {
    local n
    for n in "${NODES[@]}"; do
        if live_pid "$DIR/run/slurmd-$n.pid" slurmd >/dev/null; then continue; fi
        rm -f "$DIR/run/slurmd-$n.pid"
        mkdir -p "$DIR/spool/$n"
        SLURM_CONF=$CONF slurmd -f "$CONF" -N "$n"
    done
    # idle = registered with slurmctld and ready for jobs
    wait_for "slurmd on ${NODES[*]}" \
        "[[ \$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null | grep -Ec ' (idle|mix|alloc)') -ge ${#NODES[@]} ]]"
    # a node that was down (e.g. after a stop with jobs on it) is brought back explicitly
    SLURM_CONF=$CONF scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
}

wait_for() {
    local what=$1 check=$2 i
    for ((i = 0; i < 60; i++)); do
        if eval "$check"; then return 0; fi
        sleep 0.5
    done
    log "$what did not come up within 30 s; logs in $DIR/log"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
}

cmd_start() {
    ensure_packages
    ensure_hosts
    write_config
    if ((CONF_CHANGED)) && live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
        # running daemons read the old file; a restart is the simple way to apply every setting
        log "slurm.conf changed (ports, CPUs or this script): restarting the daemons"
        cmd_stop
    fi
    start_munge
    start_slurmctld
    start_slurmd
    log "running; export SLURM_CONF=$CONF"
    SLURM_CONF=$CONF sinfo >&2
}

cmd_stop() {
    # jobs first: slurmstepd processes outlive slurmd, so they are ended through SLURM itself
    if live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086  # one word per job id
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            local i
            for ((i = 0; i < 40; i++)); do
                [[ -z $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    # reverse start order; only the pids our pid files name, and only if they are still those programs
    local entries file name pid i
    mapfile -t entries < <(pid_files | tac)
    for entry in "${entries[@]}"; do
        read -r file name <<<"$entry"
        if pid=$(live_pid "$file" "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            for ((i = 0; i < 40; i++)); do
                [[ -d /proc/$pid ]] || break
                sleep 0.25
            done
            if [[ -d /proc/$pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
            log "stopped $name (pid $pid)"
        fi
        rm -f "$file"
    done
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
}

cmd_status() {
    local ok=0 entry file name pid
    while read -r file name; do
        if pid=$(live_pid "$file" "$name"); then
            echo "$(basename "$file" .pid): running (pid $pid)"
        else
            echo "$(basename "$file" .pid): not running"
            ok=3
        fi
    done < <(pid_files)
    if ((ok == 0)); then SLURM_CONF=$CONF sinfo -N -l || ok=3; fi
    echo "SLURM_CONF=$CONF"
    return $ok
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
