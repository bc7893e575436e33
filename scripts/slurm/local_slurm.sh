#!/usr/bin/env bash
# A single-node Slurm on this machine (Debian slurm-wlm + munge), started by hand as root, for tests and
# trying the Slurm profile without a cluster. No systemd needed; no accounting daemon (use
# `--slurm-status-command squeue`).
#
#   scripts/slurm/local_slurm.sh start  [STATE_DIR]   install if missing, write configs, start the daemons
#   scripts/slurm/local_slurm.sh stop   [STATE_DIR]   stop every daemon by the pid in its pid file
#   scripts/slurm/local_slurm.sh status [STATE_DIR]   daemons alive? node state
#
# STATE_DIR (default: $SPEECHLLM_SLURM_DIR or /tmp/speechllm-slurm) holds every config, pid, log, state and
# spool file. `start` prints `export SLURM_CONF=...` last: the submit side reads its config from there.
# srun inside a job finds it through a link at /run/slurm/conf (where Slurm clients look when SLURM_CONF is
# unset and /etc/slurm has none), because the Snakemake jobstep plugin clears SLURM_* variables, SLURM_CONF too.
#
# Knobs (environment): LOCAL_SLURM_FAKE_GPUS (2; plain files stand in for devices), LOCAL_SLURM_CPUS (all processors),
# LOCAL_SLURM_MEM_MB (90 % of MemTotal), LOCAL_SLURM_CTLD_PORT / LOCAL_SLURM_SLURMD_PORT (free ports),
# LOCAL_SLURM_KILL_WAIT (30: seconds between SIGTERM and SIGKILL at a time limit, Slurm's default),
# LOCAL_SLURM_OVER_TIME_LIMIT (0: minutes a job may run past its limit). slurmctld checks limits (and sends
# `sbatch --signal` warnings) about every 30 s, so a 1-minute job gets SIGTERM 60-90 s after it starts.
# Exit status 2: Slurm cannot be set up here (not root, no apt-get, install failed); the reason is on stderr.
set -euo pipefail

CMD=${1:-}
STATE=${2:-${SPEECHLLM_SLURM_DIR:-/tmp/speechllm-slurm}}
FAKE_GPUS=${LOCAL_SLURM_FAKE_GPUS:-2}
START_TIMEOUT=${LOCAL_SLURM_START_TIMEOUT:-60}   # seconds until the node must be idle
CONF_LINK=/run/slurm/conf                        # clients' fallback when SLURM_CONF is unset and /etc has none

cannot() { echo "local_slurm: cannot set up Slurm here: $*" >&2; exit 2; }
die() { echo "local_slurm: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || cannot "missing ${missing[*]} and no apt-get to install them"
    echo "local_slurm: installing ${missing[*]} (slurm-wlm, munge) with apt-get" >&2
    # The packages' service scripts cannot start anything without systemd; we start the daemons below.
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurm-wlm munge; } >"$STATE/log/apt.log" 2>&1; then
        cannot "apt-get install slurm-wlm munge failed (see $STATE/log/apt.log)"
    fi
}

write_configs() {
    local cpus mem_mb ctld_port slurmd_port gpu_files i
    cpus=${LOCAL_SLURM_CPUS:-$(nproc --all)}  # --all: not limited by OMP_NUM_THREADS, as plain nproc is
    mem_mb=${LOCAL_SLURM_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)}
    ctld_port=${LOCAL_SLURM_CTLD_PORT:-$(free_port)}
    slurmd_port=${LOCAL_SLURM_SLURMD_PORT:-$(free_port)}
    for ((i = 0; i < FAKE_GPUS; i++)); do touch "$STATE/spool/fakegpu$i"; done
    gpu_files="$STATE/spool/fakegpu[0-$((FAKE_GPUS - 1))]"
    cat >"$STATE/etc/slurm.conf" <<EOF
# Written by scripts/slurm/local_slurm.sh: one node (this machine, as "localhost"), partition "debug".
ClusterName=speechllmlocal
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
KillWait=${LOCAL_SLURM_KILL_WAIT:-30}
OverTimeLimit=${LOCAL_SLURM_OVER_TIME_LIMIT:-0}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
PlugStackConfig=$STATE/etc/plugstack.conf
GresTypes=gpu
NodeName=localhost NodeHostname=localhost CPUs=$cpus RealMemory=$mem_mb Gres=gpu:$FAKE_GPUS State=UNKNOWN
# Without DefMemPerCPU a job without --mem takes the whole node's memory and jobs run one at a time.
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000
EOF
    cat >"$STATE/etc/gres.conf" <<EOF
# Fake GPUs: plain files; a count-only gres.conf would mark the node INVAL.
AutoDetect=off
NodeName=localhost Name=gpu File=$gpu_files
EOF
    : >"$STATE/etc/plugstack.conf"
}

start_munge() {
    # munged runs as the munge user, which may not traverse STATE's parents (pytest's are 0700): its files live
    # in a directory of their own, linked as STATE/munge.
    local dir
    dir=$(mktemp -d /tmp/local_slurm_munge.XXXXXX)
    chown munge:munge "$dir" && chmod 0700 "$dir"
    [ -L "$STATE/munge" ] || rm -rf "$STATE/munge"
    ln -sfn "$dir" "$STATE/munge"
    head -c 1024 /dev/urandom >"$dir/munge.key"
    chown munge:munge "$dir/munge.key" && chmod 0400 "$dir/munge.key"
    runuser -u munge -- /usr/sbin/munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" \
        || die "munged did not start (see $dir/munged.log)"
}

# The pid a daemon wrote into its pid file, if that process still runs.
live_pid() {
    local file=$1 pid
    [ -s "$file" ] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

pid_files() {
    echo "$STATE/run/slurmd.pid" "$STATE/run/slurmctld.pid" "$STATE/munge/munged.pid"
}

wait_for_node() {
    local waited=0 state=""
    while [ "$waited" -lt "$START_TIMEOUT" ]; do
        for daemon in slurmctld slurmd; do
            # A daemon that died (e.g. a fatal config error) will not come back: say why at once.
            if [ -s "$STATE/run/$daemon.pid" ] || [ "$waited" -ge 5 ]; then
                live_pid "$STATE/run/$daemon.pid" >/dev/null \
                    || die "$daemon exited: $(grep -h 'fatal\|error' "$STATE/log/$daemon.log" 2>/dev/null | tail -n 3)"
            fi
        done
        state=$(sinfo -h -N -n localhost -o %t 2>/dev/null || true)
        case "$state" in idle*|mix*|alloc*) return 0 ;; esac
        sleep 1; waited=$((waited + 1))
    done
    die "node not idle after ${START_TIMEOUT}s (state '${state}'); see $STATE/log/slurmctld.log and slurmd.log"
}

start() {
    [ "$(id -u)" = 0 ] || cannot "needs root (slurmd runs jobs as root here); run as root or in CI"
    command -v runuser >/dev/null 2>&1 || cannot "runuser (util-linux) not found"
    [ -e /etc/slurm/slurm.conf ] && cannot "/etc/slurm/slurm.conf exists (a Slurm is configured here): not touching it"
    if [ -e "$CONF_LINK" ] && [ ! -L "$CONF_LINK" ]; then cannot "$CONF_LINK exists and is not our link"; fi
    for pidfile in $(pid_files); do
        if pid=$(live_pid "$pidfile"); then die "already running (pid $pid from $pidfile); stop it first"; fi
    done
    install -d -m 0755 "$STATE" "$STATE/etc" "$STATE/run" "$STATE/log" "$STATE/state" "$STATE/spool"
    rm -f $(pid_files)
    trap stop EXIT  # a failed start leaves nothing running
    install_packages
    id munge >/dev/null 2>&1 || cannot "the munge user does not exist (is the munge package installed?)"
    write_configs
    export SLURM_CONF="$STATE/etc/slurm.conf"
    start_munge
    mkdir -p "$(dirname "$CONF_LINK")"
    ln -sfn "$STATE/etc" "$CONF_LINK"
    /usr/sbin/slurmctld -f "$SLURM_CONF" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
    # The machine's hostname is not "localhost": name the node explicitly.
    /usr/sbin/slurmd -f "$SLURM_CONF" -N localhost || die "slurmd did not start (see $STATE/log/slurmd.log)"
    wait_for_node
    trap - EXIT
    echo "local_slurm: up (state in $STATE; partition debug; $FAKE_GPUS fake GPUs)" >&2
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    local pidfile pid waited
    # Jobs still running (a test that failed half-way) are cancelled first, so no job step outlives slurmd.
    if live_pid "$STATE/run/slurmctld.pid" >/dev/null; then
        export SLURM_CONF="$STATE/etc/slurm.conf"
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
        waited=0
        while [ -n "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && [ "$waited" -lt 20 ]; do
            sleep 0.5; waited=$((waited + 1))
        done
    fi
    for pidfile in $(pid_files); do
        pid=$(live_pid "$pidfile") || continue
        kill "$pid" 2>/dev/null || true
        waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 100 ]; do sleep 0.1; waited=$((waited + 1)); done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        echo "local_slurm: stopped pid $pid ($(basename "$pidfile" .pid))" >&2
    done
    if [ -L "$CONF_LINK" ] && [ "$(readlink "$CONF_LINK")" = "$STATE/etc" ]; then rm -f "$CONF_LINK"; fi
    if [ -L "$STATE/munge" ]; then
        local munge_dir
        munge_dir=$(readlink "$STATE/munge")
        [[ "$munge_dir" == /tmp/local_slurm_munge.* ]] && rm -rf "$munge_dir"
        rm -f "$STATE/munge"
    fi
}

status() {
    local pidfile pid rc=0
    for pidfile in $(pid_files); do
        if pid=$(live_pid "$pidfile"); then echo "$(basename "$pidfile" .pid): running (pid $pid)"
        else echo "$(basename "$pidfile" .pid): not running"; rc=3; fi
    done
    [ "$rc" = 0 ] && SLURM_CONF="$STATE/etc/slurm.conf" sinfo -N -o "%N %t %c %m %G"
    return "$rc"
}

case "$CMD" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 64 ;;
esac
