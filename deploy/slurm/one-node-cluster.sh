#!/usr/bin/env bash
# A throwaway Slurm cluster on this one machine, for tests and for trying
# tandem.sbatch without a real cluster. Everything (config, munge key and socket,
# state, spool, logs, pid files) lives in one folder; nothing under /etc is touched
# and no systemd is needed. Run as root (slurmd must be able to start jobs).
#
#   one-node-cluster.sh start [DIR]   start munged, slurmctld and the slurmds; wait until
#                                     every node is idle; print `export SLURM_CONF=...`
#   one-node-cluster.sh stop  [DIR]   cancel every job, stop the daemons
#   one-node-cluster.sh env   [DIR]   print the export line again
#
# DIR defaults to $TANDEM_SLURM_DIR, else /tmp/tandem-slurm. Clients (sbatch, srun,
# squeue, scontrol, ...) need SLURM_CONF=DIR/slurm.conf in their environment.
#
# The machine shows up as TANDEM_SLURM_NODES nodes (tandem1, tandem2, ...: one slurmd
# each, all on 127.0.0.1 with their own port). Two by default, because Slurm's backfill
# scheduler, the only one that starts heterogeneous jobs, needs each component of such
# a job on its own node before it starts it (a documented limitation): tandem.sbatch's
# trainer and generator components cannot both start on a one-node cluster.
#
# Settings (environment):
#   TANDEM_SLURM_NODES      nodes (slurmd daemons) to start (default 2)
#   TANDEM_SLURM_CPUS       CPUs each node claims, whatever the hardware has (default 4)
#   TANDEM_SLURM_PORT_BASE  slurmctld listens on BASE, node i's slurmd on BASE+i
#                           (default 16817)
#   TANDEM_SLURM_TIMEOUT    seconds to wait for the nodes to become idle (default 60)
#
# Packages (Debian 12): slurmctld slurmd slurm-client munge
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# (or the metapackage slurm-wlm, which pulls the same plus optional plugins).
set -euo pipefail

cmd=${1:-}
dir=${2:-${TANDEM_SLURM_DIR:-/tmp/tandem-slurm}}
nodes=${TANDEM_SLURM_NODES:-2}
cpus=${TANDEM_SLURM_CPUS:-4}
port=${TANDEM_SLURM_PORT_BASE:-16817}
timeout=${TANDEM_SLURM_TIMEOUT:-60}
export PATH=$PATH:/usr/sbin:/sbin

die() { echo "one-node-cluster: $*" >&2; exit 1; }
# A failed start stops what it had started (the logs stay in DIR).
fail() { stop >/dev/null 2>&1 || true; die "$@"; }

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# The pid in FILE if that process is alive.
alive_pid() {
    local f=$1 pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Sends TERM to the daemon whose pid is in FILE, waits up to 10 s, then KILL.
stop_daemon() {
    local f=$1 pid i
    pid=$(alive_pid "$f") || { rm -f "$f"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
}

write_conf() {
    {
        cat <<EOF
# Written by one-node-cluster.sh: a throwaway cluster on loopback.
ClusterName=tandemtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes are tracked by process group, tasks are not bound.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Heterogeneous jobs start only from the backfill scheduler: run it every second.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,bf_hetjob_immediate
# The nodes claim the CPUs below even where the hardware has fewer.
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to scontrol for 10 minutes.
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
EOF
        local i
        for ((i = 1; i <= nodes; i++)); do
            echo "NodeName=tandem$i NodeHostname=tandem$i NodeAddr=127.0.0.1 Port=$((port + i)) CPUs=$cpus State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$dir/slurm.conf"
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts jobs as their users)"
    local b
    for b in munged slurmctld slurmd sinfo sbatch; do
        command -v "$b" >/dev/null ||
            die "$b not found; apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
    done
    if alive_pid "$dir/run/slurmctld.pid" >/dev/null; then
        die "a cluster already runs in $dir (stop it first)"
    fi
    mkdir -p "$dir"/{munge,state,spool,log,run}
    chmod 0755 "$dir" "$dir/munge"
    write_conf
    export SLURM_CONF=$dir/slurm.conf

    # munge with its own key, socket, pid, seed and log: a system munged, if any, is
    # left alone.
    if [[ ! -s $dir/munge/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 0600 "$dir/munge/munge.key"
    munged --force \
        --key-file="$dir/munge/munge.key" \
        --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/run/munged.pid" \
        --seed-file="$dir/munge/munged.seed" \
        --log-file="$dir/log/munged.log" ||
        fail "munged did not start; see $dir/log/munged.log"

    # -c (and -i): start clean, whatever an earlier cluster left in the state folder.
    slurmctld -c -i -f "$dir/slurm.conf" ||
        fail "slurmctld did not start; see $dir/log/slurmctld.log"
    local i
    for ((i = 1; i <= nodes; i++)); do
        mkdir -p "$dir/spool/tandem$i"
        slurmd -c -N "tandem$i" -f "$dir/slurm.conf" ||
            fail "slurmd tandem$i did not start; see $dir/log/slurmd-tandem$i.log"
    done

    local t0=$SECONDS states=""
    while ((SECONDS - t0 < timeout)); do
        states=$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ $states == "idle " ]] && (($(sinfo -h -N -t idle -o %N | wc -l) == nodes)); then
            echo "export SLURM_CONF=$dir/slurm.conf"
            return 0
        fi
        sleep 0.5
    done
    local f
    for f in "$dir"/log/slurm*.log; do
        echo "== $f" >&2
        tail -n 20 "$f" >&2 || true
    done
    fail "the nodes are not idle after ${timeout}s (states: ${states:-none})"
}

stop() {
    export SLURM_CONF=$dir/slurm.conf
    if alive_pid "$dir/run/slurmctld.pid" >/dev/null; then
        # Cancel every job and give the steps a moment to go before the daemons do.
        scancel --quiet --user=root 2>/dev/null || true
        local i
        for ((i = 0; i < 30; i++)); do
            [[ -z $(squeue -h 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    # All at once: each takes a second or two to go.
    local f
    for f in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
        [[ -e $f ]] && stop_daemon "$f" &
    done
    wait
}

case $cmd in
start) start ;;
stop) stop ;;
env) echo "export SLURM_CONF=$dir/slurm.conf" ;;
*) usage ;;
esac
