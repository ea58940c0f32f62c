#!/usr/bin/env bash
# Stop the local test cluster started by start.sh.
#
#   bash slurm/testcluster/stop.sh           # cancel queued/running jobs, stop all daemons
#   bash slurm/testcluster/stop.sh --purge   # ... and delete the state folder (DB, job history)
#
# Daemons are stopped by the PID in their pid file, after checking /proc/PID/comm, and
# waited for until that PID has gone; nothing is killed by name. Safe to run when stopped.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"

purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) tc_die "unknown option '$1'. Valid options: --purge" ;;
esac

tc_validate_dir
if [[ ! -d "$TC_DIR" ]]; then
    tc_log "nothing to stop: no state folder $TC_DIR"
    exit 0
fi
tc_lock
if tc_any_running; then
    tc_stop_all
    tc_log "stopped (state folder $TC_DIR kept)"
else
    tc_log "not running (state folder $TC_DIR)"
fi

if ((purge)); then
    # Only delete a folder that start.sh made.
    [[ -f "$TC_DIR/.lock" && -d "$TC_DIR/etc" ]] ||
        tc_die "refusing to delete $TC_DIR: it does not look like a test-cluster state folder."
    rm -rf -- "$TC_DIR"
    tc_log "deleted $TC_DIR"
fi
