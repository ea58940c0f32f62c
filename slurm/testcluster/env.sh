# shellcheck shell=sh
# Source me: point SLURM's client commands (sinfo, sbatch, sacct, submitit) at the local
# test cluster. Same state folder rule as start.sh (FADA_SLURM_DIR, default /tmp/fada-slurm).
#
#   source slurm/testcluster/env.sh
export SLURM_CONF="${FADA_SLURM_DIR:-/tmp/fada-slurm}/etc/slurm.conf"
case ":$PATH:" in
    *:/usr/sbin:*) ;;
    *) export PATH="$PATH:/usr/sbin" ;;
esac
