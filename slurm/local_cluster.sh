#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for tests (Debian's slurm-wlm), isolated from any system SLURM/munge:
# its own munge key and socket, slurm.conf, spool, logs and ports, all under one state directory.
#
#   slurm/local_cluster.sh start    # installs slurm-wlm if missing (root + apt), starts munged, slurmctld, slurmd
#   slurm/local_cluster.sh stop     # cancels the cluster's jobs, stops exactly the daemons `start` started
#                                   # (by the PIDs it recorded), removes the state directory
#   slurm/local_cluster.sh status   # sinfo + squeue of the cluster
#   eval "$(slurm/local_cluster.sh env)"   # export SLURM_CONF so that sbatch/squeue/submitit talk to it
#
# Environment: MSD_SLURM_STATE (state directory, default /tmp/msd-local-slurm), MSD_SLURM_PORT (slurmctld
# port, default 6817; slurmd uses the next one). The node declares this machine's CPUs (nproc) and 90% of
# its memory; its one partition is `local` (the default partition).
set -euo pipefail

STATE_DIR=${MSD_SLURM_STATE:-/tmp/msd-local-slurm}
CTLD_PORT=${MSD_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))
CONF=$STATE_DIR/slurm.conf
PIDS=$STATE_DIR/pids          # "<daemon name> <pid>" per line, one line per daemon this script started
MUNGE_SOCKET=$STATE_DIR/munge/munge.socket
PARTITION=local

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

alive() {  # alive NAME PID: PID is running and is still the daemon NAME (guards against PID reuse)
    [[ -r /proc/$2/comm ]] && [[ $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]]
}

install_if_missing() {
    local missing=()
    for cmd in munged slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
    [[ ${#missing[@]} -eq 0 ]] && return
    command -v apt-get >/dev/null || die "${missing[*]} missing and no apt-get: install slurm-wlm (slurmctld, slurmd, munge) yourself"
    echo "local_cluster.sh: installing slurm-wlm (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s
    local limit=$1 what=$2
    local deadline=$((SECONDS + limit))
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out after ${limit}s waiting for $what (logs: $STATE_DIR/*.log)"
        sleep 0.2
    done
}

record() {  # record NAME PIDFILE: wait for the daemon's pidfile, check the process, append it to $PIDS
    wait_for 20 "$1 to write $2" test -s "$2"
    local pid
    pid=$(tr -d '[:space:]' < "$2")
    alive "$1" "$pid" || die "$1 (pid $pid from $2) is not running (log: $STATE_DIR/$1.log)"
    echo "$1 $pid" >> "$PIDS"
}

port_free() { ! ss -Hltn "sport = :$1" | grep -q .; }

node_idle() { [[ $(sinfo -h -p "$PARTITION" -o %T 2>/dev/null) == idle ]]; }

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$CONF" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster on localhost.
ClusterName=msdlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [[ $(id -u) -eq 0 ]] || die "start needs root (it installs packages and runs slurmd as root)"
    if [[ -d $STATE_DIR && -n $(ls -A "$STATE_DIR") ]]; then
        [[ -f $PIDS ]] || die "$STATE_DIR is not empty and not a local_cluster.sh state directory: set MSD_SLURM_STATE"
        while read -r name pid; do
            alive "$name" "$pid" && die "already running ($name pid $pid, state $STATE_DIR): run 'slurm/local_cluster.sh stop' first"
        done < "$PIDS"
        rm -rf "$STATE_DIR"  # a previous cluster died without stop: its daemons are gone
    fi
    install_if_missing
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        port_free "$port" || die "port $port is in use (another slurmctld/slurmd?): set MSD_SLURM_PORT to a free port"
    done
    mkdir -p "$STATE_DIR/munge" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
    chmod 755 "$STATE_DIR"
    : > "$PIDS"
    # on any failure from here on, stop what this start started
    trap 'rc=$?; if ((rc != 0)); then echo "local_cluster.sh: start failed, stopping what it started" >&2; stop; fi' EXIT

    # munge: a fresh key, socket and pidfile of our own, run as the munge user like the packaged service
    dd if=/dev/urandom of="$STATE_DIR/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$STATE_DIR/munge"
    chmod 755 "$STATE_DIR/munge"
    chmod 400 "$STATE_DIR/munge/munge.key"
    runuser -u munge -- munged --key-file="$STATE_DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$STATE_DIR/munge/munged.pid" --log-file="$STATE_DIR/munge/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed"
    record munged "$STATE_DIR/munge/munged.pid"
    munge --socket="$MUNGE_SOCKET" -n | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
        || die "munge round trip failed (log: $STATE_DIR/munge/munged.log)"

    write_conf
    slurmctld -f "$CONF"
    record slurmctld "$STATE_DIR/slurmctld.pid"
    slurmd -f "$CONF"
    record slurmd "$STATE_DIR/slurmd.pid"
    export SLURM_CONF=$CONF
    wait_for 30 "node to be idle in partition $PARTITION" node_idle
    trap - EXIT
    echo "local_cluster.sh: up ($(nproc) CPUs, partition $PARTITION, state $STATE_DIR); clients: export SLURM_CONF=$CONF"
}

stop() {
    [[ -f $PIDS ]] || { echo "local_cluster.sh: nothing to stop (no $PIDS)"; return; }
    local name pid
    if grep -q '^slurmctld ' "$PIDS"; then  # cancel leftover jobs so that no slurmstepd outlives slurmd
        export SLURM_CONF=$CONF
        scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
        local deadline=$((SECONDS + 15))
        while [[ -n $(squeue -h -p "$PARTITION" 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
    fi
    for daemon in slurmd slurmctld munged; do  # reverse start order
        read -r name pid < <(grep "^$daemon " "$PIDS") || continue
        alive "$name" "$pid" || continue
        kill -TERM "$pid"
        local deadline=$((SECONDS + 15))
        while alive "$name" "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        if alive "$name" "$pid"; then kill -KILL "$pid"; fi
        echo "local_cluster.sh: stopped $name (pid $pid)"
    done
    rm -rf "$STATE_DIR"
}

status() {
    [[ -f $PIDS ]] || die "not running (no $PIDS)"
    export SLURM_CONF=$CONF
    sinfo
    squeue
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 start|stop|status|env (got '${1:-}')" ;;
esac
