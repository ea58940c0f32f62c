#!/usr/bin/env bash
# Show whether the local test cluster is up: daemons, node, recent jobs.
#
#   bash slurm/testcluster/status.sh          # human-readable report
#   bash slurm/testcluster/status.sh --quiet  # no output; exit 0 if up and healthy, else 1
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"
export SLURM_CONF="$TC_SLURM_CONF"

if [[ "${1:-}" == --quiet ]]; then
    tc_all_running && tc_node_healthy
    exit
fi

echo "state folder: $TC_DIR"
echo "export SLURM_CONF=$TC_SLURM_CONF"
up=1
for d in "${TC_DAEMONS[@]}"; do
    if pid="$(tc_pid "$d")"; then
        printf '  %-10s running (pid %s)\n' "$d" "$pid"
    else
        printf '  %-10s not running\n' "$d"
        up=0
    fi
done
if tc_running slurmctld; then
    echo "--- sinfo"
    sinfo
    echo "--- node"
    scontrol -o show node "$TC_NODE" | tr ' ' '\n' |
        grep -E '^(State|Reason|CPUTot|RealMemory|SlurmdStartTime)=' | tr '\n' ' '
    echo
    echo "--- squeue"
    squeue
fi
if tc_running slurmdbd; then
    echo "--- sacct (last hour)"
    sacct -a -X -S now-1hour -o JobID,JobName%20,State,ExitCode,Elapsed
fi
if ((up)) && tc_node_healthy; then
    echo "UP"
else
    echo "DOWN (start with: bash $HERE/start.sh)"
    exit 1
fi
