# shellcheck shell=bash disable=SC2034  # variables are used by the scripts that source this
# Shared settings and helpers for the local test cluster; sourced by start.sh, stop.sh
# and status.sh (env.sh repeats the one rule it needs). Not meant to be run on its own.
#
# Environment knobs (all optional):
#   FADA_SLURM_DIR        state folder (default /tmp/fada-slurm); no whitespace, short path
#   FADA_SLURM_PORT_BASE  first of four TCP ports on 127.0.0.1 (default 6817):
#                         slurmctld=BASE, slurmd=BASE+1, slurmdbd=BASE+2, MariaDB=BASE+3
#   FADA_SLURM_TIMEOUT    seconds to wait for each daemon to come up (default 60)

TC_DIR="${FADA_SLURM_DIR:-/tmp/fada-slurm}"
TC_PORT_BASE="${FADA_SLURM_PORT_BASE:-6817}"
TC_TIMEOUT="${FADA_SLURM_TIMEOUT:-60}"

TC_NODE=localhost
TC_CLUSTER=fada
TC_PARTITION=debug

TC_ETC="$TC_DIR/etc"
TC_RUN="$TC_DIR/run"
TC_LOG="$TC_DIR/log"
TC_MUNGE="$TC_DIR/munge"
TC_DB="$TC_DIR/mysql"
TC_SLURM_CONF="$TC_ETC/slurm.conf"
TC_MUNGE_SOCKET="$TC_MUNGE/munge.socket"
TC_DB_SOCKET="$TC_DB/mysqld.sock"

TC_CTLD_PORT=$((TC_PORT_BASE))
TC_SLURMD_PORT=$((TC_PORT_BASE + 1))
TC_DBD_PORT=$((TC_PORT_BASE + 2))
TC_DB_PORT=$((TC_PORT_BASE + 3))

# Daemons in start order: name (= /proc/PID/comm), pid file, log file.
TC_DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

tc_pidfile() { echo "$TC_RUN/$1.pid"; }
tc_logfile() { echo "$TC_LOG/$1.log"; }

tc_die() {
    echo "testcluster: ERROR: $*" >&2
    exit 1
}

tc_log() { echo "testcluster: $*" >&2; }

# Print the last lines of a daemon's log to stderr (for error reports).
tc_log_tail() {
    local f
    f="$(tc_logfile "$1")"
    if [[ -s "$f" ]]; then
        echo "---- last lines of $f ----" >&2
        tail -n "${2:-25}" "$f" >&2
        echo "----" >&2
    else
        echo "(no log at $f)" >&2
    fi
}

# True while PID is the daemon NAME (guards against PID reuse) and has not exited: a killed
# daemon stays a zombie, with its comm, until PID 1 reaps it, which can take seconds here.
tc_alive() {
    [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]] || return 1
    local state
    state="$(sed -n 's/^.*) \(.\).*$/\1/p' "/proc/$1/stat" 2>/dev/null)"
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# PID of a daemon if its pid file names a live process whose comm matches, else nothing.
# Slurm daemons delete their pid file before they finish exiting, so stop.sh keeps the PID
# it read and waits on the process itself.
tc_pid() {
    local name="$1" pf pid
    pf="$(tc_pidfile "$name")"
    [[ -r "$pf" ]] || return 1
    pid="$(tr -dc '0-9' <"$pf")"
    [[ -n "$pid" ]] || return 1
    tc_alive "$pid" "$name" || return 1
    echo "$pid"
}

tc_running() { tc_pid "$1" >/dev/null; }

tc_all_running() {
    local d
    for d in "${TC_DAEMONS[@]}"; do
        tc_running "$d" || return 1
    done
}

tc_any_running() {
    local d
    for d in "${TC_DAEMONS[@]}"; do
        tc_running "$d" && return 0
    done
    return 1
}

# "State=IDLE" and friends for our node, from scontrol; empty if the controller is down.
tc_node_field() {
    SLURM_CONF="$TC_SLURM_CONF" timeout 10 scontrol -o show node "$TC_NODE" 2>/dev/null |
        tr ' ' '\n' | sed -n "s/^$1=//p"
}

tc_validate_dir() {
    [[ "$TC_DIR" == /* ]] || tc_die "FADA_SLURM_DIR must be an absolute path, got '$TC_DIR'."
    [[ "$TC_DIR" != *[[:space:]]* ]] ||
        tc_die "FADA_SLURM_DIR must not contain whitespace (slurm.conf cannot quote it), got '$TC_DIR'."
    # Unix socket paths are limited to 107 bytes.
    ((${#TC_MUNGE_SOCKET} < 100)) ||
        tc_die "FADA_SLURM_DIR is too long for a unix socket path ('$TC_MUNGE_SOCKET'); use a shorter folder."
}

# True if the node answers and is usable (not down, drained or unresponsive).
tc_node_healthy() {
    local state
    state="$(tc_node_field State)"
    [[ -n "$state" ]] || return 1
    [[ "$state" =~ ^(IDLE|MIXED|ALLOCATED|COMPLETING) ]] || return 1
    [[ "$state" != *DRAIN* && "$state" != *NOT_RESPONDING* && "$state" != *FAIL* ]]
}

# Cancel every job still queued or running, so stopping slurmd leaves no slurmstepd
# or job processes behind. All jobs on this private cluster are ours.
tc_cancel_jobs() {
    tc_running slurmctld || return 0
    local ids deadline
    ids="$(SLURM_CONF="$TC_SLURM_CONF" timeout 10 squeue -h -o %A 2>/dev/null | sort -u)" || return 0
    [[ -n "$ids" ]] || return 0
    tc_log "cancelling $(wc -w <<<"$ids") job(s) still in the queue"
    # shellcheck disable=SC2086
    SLURM_CONF="$TC_SLURM_CONF" timeout 10 scancel $ids 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        [[ -z "$(SLURM_CONF="$TC_SLURM_CONF" timeout 10 squeue -h -o %A 2>/dev/null)" ]] && return 0
        sleep 0.5
    done
    tc_log "WARNING: jobs still in the queue after 30 s; stopping anyway"
}

# Stop daemons by the PIDs in their pid files: SIGTERM to all named at once, wait for each
# PID to go (pid files vanish before the process does), SIGKILL after 30 s.
tc_stop_daemons() {
    local name pid i pids=() names=()
    for name in "$@"; do
        pid="$(tc_pid "$name")" || continue
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
        names+=("$name")
    done
    for i in "${!pids[@]}"; do
        pid="${pids[i]}"
        name="${names[i]}"
        local t0=$SECONDS
        while tc_alive "$pid" "$name" && ((SECONDS - t0 < 30)); do sleep 0.1; done
        if tc_alive "$pid" "$name"; then
            tc_log "WARNING: $name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            t0=$SECONDS
            while tc_alive "$pid" "$name" && ((SECONDS - t0 < 5)); do sleep 0.1; done
        fi
        rm -f "$(tc_pidfile "$name")"
        tc_log "stopped $name (pid $pid)"
    done
}

# Stop all daemons in reverse start order. slurmctld reports to slurmdbd (over munge) as it
# exits, and slurmdbd needs MariaDB, so: slurmd+slurmctld, then slurmdbd, then the rest.
tc_stop_all() {
    tc_cancel_jobs
    tc_stop_daemons slurmd slurmctld
    tc_stop_daemons slurmdbd
    tc_stop_daemons mariadbd munged
}

# Take the state folder's lock (fd 9) so two start/stop runs never interleave.
# Daemons are started with 9>&- so they do not inherit (and hold) the lock.
tc_lock() {
    mkdir -p "$TC_DIR"
    exec 9>"$TC_DIR/.lock"
    flock -w 600 9 || tc_die "could not lock $TC_DIR/.lock within 600 s (another start.sh/stop.sh running?)"
}
