#!/usr/bin/env bash
# Start a real single-node SLURM cluster on localhost for the tests (no systemd needed).
#
#   bash slurm/testcluster/start.sh                # prints: export SLURM_CONF=...
#   eval "$(bash slurm/testcluster/start.sh)"      # start and set SLURM_CONF in this shell
#
# Installs Debian's packages when absent, writes the config under the state folder
# (FADA_SLURM_DIR, default /tmp/fada-slurm), then starts munged, MariaDB, slurmdbd,
# slurmctld and slurmd in that order and waits until slurmd has registered and the node
# is idle. Running it while the cluster is up does nothing. Progress goes to stderr; the
# only line on stdout is the export line. See README.md beside this file.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
T_START=$EPOCHREALTIME

elapsed() { awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

print_export() { echo "export SLURM_CONF=$TC_SLURM_CONF"; }

# --- packages ---------------------------------------------------------------------------

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
            missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $EUID -eq 0 ]] || tc_die "packages missing (${missing[*]}) and not root: install them with apt-get as root."
    tc_log "installing ${missing[*]} (apt-get, --no-install-recommends)"
    local apt=(apt-get install -y -q --no-install-recommends "${missing[@]}")
    # The image's package lists may be stale or absent: update once, only if install fails.
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2; then
        tc_log "apt-get install failed; running apt-get update once and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2 ||
            tc_die "apt-get install ${missing[*]} failed (see the apt output above)."
    fi
}

# --- configuration ----------------------------------------------------------------------

# Node hardware line from `slurmd -C`, e.g. "CPUs=2 Boards=1 ... RealMemory=23000".
# A RealMemory above what slurmd detects would drain the node, so take it as reported.
node_hardware() {
    local line
    line="$(slurmd -C 2>/dev/null | head -n 1)" || true
    [[ "$line" == NodeName=* ]] || tc_die "'slurmd -C' did not print a node line: '$line'"
    local out="" f
    for f in CPUs Boards SocketsPerBoard CoresPerSocket ThreadsPerCore RealMemory; do
        local v
        v="$(tr ' ' '\n' <<<"$line" | sed -n "s/^$f=//p")"
        [[ -n "$v" ]] || tc_die "'slurmd -C' printed no $f: '$line'"
        out+=" $f=$v"
    done
    echo "${out# }"
}

field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

write_configs() {
    mkdir -p "$TC_ETC" "$TC_RUN" "$TC_LOG" "$TC_DIR/spool/ctld" "$TC_DIR/spool/slurmd"
    local hw cpus mem
    hw="$(node_hardware)"
    cpus="$(field "$hw" CPUs)"
    mem="$(field "$hw" RealMemory)"
    # Without a default, a job that asks for no memory gets the whole node's and no second
    # job fits; this lets one job per CPU share the node.
    local def_mem=$((mem / cpus))

    cat >"$TC_SLURM_CONF.tmp" <<EOF
# Written by slurm/testcluster/start.sh; rewritten at every start. Do not edit.
ClusterName=$TC_CLUSTER
SlurmctldHost=$TC_NODE
SlurmctldPort=$TC_CTLD_PORT
SlurmdPort=$TC_SLURMD_PORT
SlurmUser=root
SlurmdUser=root
# munged runs with its own socket; cred_expire=5 lets a requeued job restart after ~6 s
# instead of 121 s.
AuthType=auth/munge
AuthInfo=socket=$TC_MUNGE_SOCKET,cred_expire=5
StateSaveLocation=$TC_DIR/spool/ctld
SlurmdSpoolDir=$TC_DIR/spool/slurmd
SlurmctldPidFile=$(tc_pidfile slurmctld)
SlurmdPidFile=$(tc_pidfile slurmd)
SlurmctldLogFile=$(tc_logfile slurmctld)
SlurmdLogFile=$(tc_logfile slurmd)
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: the cgroup plugins need set-up this machine does not have.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
# Default scheduling waits 3 s per batch job and runs passes every 60 s.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$def_mem
KillWait=5
MinJobAge=30
MaxArraySize=1001
JobRequeue=1
# Real accounting: without it sacct fails and submitit cannot see job states.
# slurmctld/sacct ignore AuthInfo's socket for slurmdbd; AccountingStoragePass sets it.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$TC_NODE
AccountingStoragePort=$TC_DBD_PORT
AccountingStoragePass=socket=$TC_MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$TC_NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=$TC_PARTITION Nodes=$TC_NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$TC_SLURM_CONF.tmp" "$TC_SLURM_CONF"

    # Database password: random, made once, readable by root only.
    local pass_file="$TC_ETC/db.pass"
    if [[ ! -s "$pass_file" ]]; then
        (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$pass_file")
    fi
    # slurmdbd refuses a slurmdbd.conf that others can read; it is read from $SLURM_CONF's folder.
    (
        umask 077
        cat >"$TC_ETC/slurmdbd.conf" <<EOF
# Written by slurm/testcluster/start.sh; rewritten at every start. Do not edit.
AuthType=auth/munge
AuthInfo=socket=$TC_MUNGE_SOCKET
DbdHost=$TC_NODE
DbdPort=$TC_DBD_PORT
SlurmUser=root
PidFile=$(tc_pidfile slurmdbd)
LogFile=$(tc_logfile slurmdbd)
DebugLevel=info
# TCP, not "localhost": that name makes the plugin use /run/mysqld/mysqld.sock.
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$TC_DB_PORT
StorageUser=slurm
StoragePass=$(cat "$pass_file")
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$TC_ETC/slurmdbd.conf"
}

# --- waiting ----------------------------------------------------------------------------

# wait_for NAME DESCRIPTION COMMAND...: retry COMMAND until it succeeds; fail with the
# daemon's log tail after TC_TIMEOUT seconds or as soon as the daemon has died.
wait_for() {
    local name="$1" what="$2"
    shift 2
    local t0=$SECONDS
    while ! "$@" >/dev/null 2>&1; do
        # A daemon has written its pid file well within 5 s of starting.
        if ((SECONDS - t0 >= 5)) && ! tc_running "$name"; then
            tc_log_tail "$name"
            if grep -q 'Address already in use' "$(tc_logfile "$name")" 2>/dev/null; then
                tc_log "a port in $TC_PORT_BASE-$((TC_PORT_BASE + 3)) is taken (another cluster?);" \
                    "choose others with FADA_SLURM_PORT_BASE=<port>"
            fi
            tc_die "$name is not running (waiting for $what). Its log: $(tc_logfile "$name")"
        fi
        if ((SECONDS - t0 >= TC_TIMEOUT)); then
            tc_log_tail "$name"
            tc_die "timed out after $TC_TIMEOUT s waiting for $what. Log: $(tc_logfile "$name")"
        fi
        sleep 0.2
    done
}

# --- daemons ----------------------------------------------------------------------------

start_munged() {
    # munged wants the socket's folder open to all (x) but the key's folder private.
    local keydir="$TC_MUNGE/key"
    mkdir -p "$keydir"
    chmod 755 "$TC_MUNGE"
    chmod 700 "$keydir"
    local key="$keydir/munge.key"
    if [[ ! -s "$key" ]]; then
        (umask 077 && dd if=/dev/urandom of="$key" bs=1024 count=1 status=none)
    fi
    chmod 600 "$key"
    rm -f "$TC_MUNGE_SOCKET" "$TC_MUNGE_SOCKET.lock"   # stale from a killed munged
    munged --socket="$TC_MUNGE_SOCKET" --key-file="$key" \
        --pid-file="$(tc_pidfile munged)" --log-file="$(tc_logfile munged)" \
        --seed-file="$keydir/munged.seed" </dev/null >>"$(tc_logfile munged)" 2>&1 9>&- ||
        { tc_log_tail munged; tc_die "munged failed to start."; }
    # shellcheck disable=SC2016  # $1 is expanded by the inner bash
    wait_for munged "a munge credential round trip" \
        bash -c 'munge -n --socket="$1" | unmunge --socket="$1"' _ "$TC_MUNGE_SOCKET"
}

db_ping() { mariadb-admin --no-defaults --socket="$TC_DB_SOCKET" -uroot ping; }

start_mariadb() {
    local data="$TC_DB/data"
    mkdir -p "$TC_DB"
    if [[ ! -d "$data/mysql" ]]; then
        tc_log "creating the MariaDB data folder $data"
        rm -rf "$data"
        mariadb-install-db --no-defaults --user=root --datadir="$data" --skip-test-db \
            --auth-root-authentication-method=socket >>"$(tc_logfile mariadbd)" 2>&1 9>&- ||
            { tc_log_tail mariadbd; tc_die "mariadb-install-db failed."; }
    fi
    rm -f "$TC_DB_SOCKET"
    # mariadbd stays in the foreground: run it detached; it writes its own pid file.
    # --no-defaults must come first. slurmdbd warns below half of Slurm's recommended InnoDB
    # settings (1 GiB pool); the pool is committed lazily, so 512M costs little memory.
    setsid mariadbd --no-defaults --user=root --datadir="$data" \
        --bind-address=127.0.0.1 --port="$TC_DB_PORT" --socket="$TC_DB_SOCKET" \
        --pid-file="$(tc_pidfile mariadbd)" --log-error="$(tc_logfile mariadbd)" \
        --skip-name-resolve --innodb-buffer-pool-size=512M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 </dev/null >>"$(tc_logfile mariadbd)" 2>&1 9>&- &
    wait_for mariadbd "MariaDB to answer on $TC_DB_SOCKET" db_ping
    # root logs in over the socket (unix_socket auth); slurmdbd uses TCP with a password.
    local pass
    pass="$(cat "$TC_ETC/db.pass")"
    mariadb --no-defaults --socket="$TC_DB_SOCKET" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
        ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" 9>&- ||
        { tc_log_tail mariadbd; tc_die "could not create the MariaDB user for slurmdbd."; }
}

start_slurmdbd() {
    slurmdbd </dev/null >>"$(tc_logfile slurmdbd)" 2>&1 9>&- ||
        { tc_log_tail slurmdbd; tc_die "slurmdbd failed to start."; }
    # slurmctld exits ("no TRES") on a first start if slurmdbd does not answer yet.
    wait_for slurmdbd "'sacctmgr list cluster' to answer" timeout 10 sacctmgr -n list cluster
}

start_slurmctld() {
    slurmctld </dev/null >>"$(tc_logfile slurmctld)" 2>&1 9>&- ||
        { tc_log_tail slurmctld; tc_die "slurmctld failed to start."; }
    wait_for slurmctld "'scontrol ping' to report the controller UP" \
        bash -c 'timeout 5 scontrol ping | grep -q UP'
}

# Registered = slurmd's start time as slurmctld knows it is not older than this start.
# The node's state alone proves nothing: slurmctld restores it from StateSaveLocation.
slurmd_registered() {
    local t0="$1" started
    started="$(tc_node_field SlurmdStartTime)"
    [[ -n "$started" && "$started" != None ]] || return 1
    (($(date -d "$started" +%s) >= t0)) && tc_node_healthy
}

start_slurmd() {
    local t0
    t0="$(date +%s)"
    slurmd -N "$TC_NODE" </dev/null >>"$(tc_logfile slurmd)" 2>&1 9>&- ||
        { tc_log_tail slurmd; tc_die "slurmd failed to start."; }
    if ! (
        wait_for slurmd "slurmd to register and node '$TC_NODE' to be idle" slurmd_registered "$t0"
    ); then
        echo "node: $(SLURM_CONF="$TC_SLURM_CONF" scontrol -o show node "$TC_NODE" 2>&1 |
            tr ' ' '\n' | grep -E '^(State|Reason|SlurmdStartTime|RealMemory|CPUTot)=' | tr '\n' ' ')" >&2
        tc_log_tail slurmctld 15
        exit 1
    fi
}

# --- main -------------------------------------------------------------------------------

main() {
    tc_validate_dir
    tc_lock
    export SLURM_CONF="$TC_SLURM_CONF"

    if command -v slurmctld >/dev/null && tc_all_running && tc_node_healthy; then
        tc_log "already running (state folder $TC_DIR)"
        print_export
        return 0
    fi

    install_packages
    if tc_any_running; then
        tc_log "some daemons are running but the cluster is not healthy: restarting all"
        tc_stop_all
    fi
    local d
    for d in "${TC_DAEMONS[@]}"; do rm -f "$(tc_pidfile "$d")"; done   # stale after a reboot
    write_configs

    tc_log "starting munged";    start_munged
    tc_log "starting MariaDB on 127.0.0.1:$TC_DB_PORT"; start_mariadb
    tc_log "starting slurmdbd";  start_slurmdbd
    tc_log "starting slurmctld"; start_slurmctld
    tc_log "starting slurmd";    start_slurmd

    tc_log "up in $(elapsed) s: node $TC_NODE idle, partition $TC_PARTITION, state folder $TC_DIR"
    print_export
}

main "$@"
