#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one launch.train process per GPU.
#
#   bash launch/slurm_gpu.sh --nodes 2 --gpus-per-node 8 \
#       --config configs/demo.py:stage=base --workdir /shared/runs/base \
#       [--partition P] [--account A] [--time 04:00:00] [--port 12345] \
#       [--repo DIR] [--python PY] [--job-name NAME] [--dry-run] [--config.KEY=VALUE ...]
#
# Writes an sbatch script to WORKDIR/slurm_job.sbatch and submits it with
# sbatch; --dry-run prints that script and the sbatch command instead and
# submits nothing. In the job, srun starts NODES x GPUS_PER_NODE tasks; each
# exports the variables launch.train's multi-process path reads (the same
# path as the 2-process local test):
#   JAX_COORDINATOR_ADDRESS  first node of the allocation (scontrol show hostnames):PORT
#   JAX_NUM_PROCESSES        $SLURM_NTASKS
#   JAX_PROCESS_ID           $SLURM_PROCID
#   JAX_LOCAL_DEVICE_IDS     $SLURM_LOCALID (this task's GPU among the node's; what
#                            jax's own SLURM detection would pick)
# and runs `python -m launch.train --config ... --workdir ...`, which calls
# jax.distributed.initialize(). WORKDIR must be on a file system every node
# sees (checkpoints are written collectively). Requeue/preemption: SLURM's
# SIGTERM makes launch.train checkpoint and exit 0; resubmitting resumes.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

nodes="" gpus="" config="" workdir="" partition="" account="" time_limit="" port=12345
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" python=python job_name=persvid_train
dry_run=0
extra=()
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) need "$@"; nodes=$2; shift 2 ;;
    --gpus-per-node) need "$@"; gpus=$2; shift 2 ;;
    --config) need "$@"; config=$2; shift 2 ;;
    --workdir) need "$@"; workdir=$2; shift 2 ;;
    --partition) need "$@"; partition=$2; shift 2 ;;
    --account) need "$@"; account=$2; shift 2 ;;
    --time) need "$@"; time_limit=$2; shift 2 ;;
    --port) need "$@"; port=$2; shift 2 ;;
    --repo) need "$@"; repo=$2; shift 2 ;;
    --python) need "$@"; python=$2; shift 2 ;;
    --job-name) need "$@"; job_name=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --config.*=*) extra+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
done
[[ -n "$config" ]] || die "--config is required (configs/NAME.py[:variant])"
[[ -n "$workdir" ]] || die "--workdir is required (on a file system every node sees)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '${nodes}'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '${gpus}'"
[[ "$port" =~ ^[1-9][0-9]*$ ]] || die "--port must be a port number, got '${port}'"
# The workdir is read on other machines: make it absolute here.
[[ "$workdir" = /* ]] || workdir="$PWD/$workdir"

# The training command, each word quoted for the shell that srun's bash runs.
train=("$python" -m launch.train --config "$config" --workdir "$workdir" --no-progress "${extra[@]}")
train_q=$(printf '%q ' "${train[@]}")

script="#!/usr/bin/env bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-node=$gpus
#SBATCH --output=$workdir/slurm-%j.out
${partition:+#SBATCH --partition=$partition
}${account:+#SBATCH --account=$account
}${time_limit:+#SBATCH --time=$time_limit
}set -euo pipefail
cd $(printf '%q' "$repo")
export JAX_COORDINATOR_ADDRESS=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1):$port\"
srun --nodes=$nodes --ntasks-per-node=$gpus --kill-on-bad-exit=1 bash -c 'export JAX_NUM_PROCESSES=\$SLURM_NTASKS JAX_PROCESS_ID=\$SLURM_PROCID JAX_LOCAL_DEVICE_IDS=\$SLURM_LOCALID; exec \"\$@\"' launch_train ${train_q% }
"

job="$workdir/slurm_job.sbatch"
submit=(sbatch "$job")
if [[ $dry_run == 1 ]]; then
  printf '# %s\n' "$job:"
  printf '%s' "$script"
  submit_q=$(printf '%q ' "${submit[@]}")
  printf '# submit with:\n%s\n' "${submit_q% }"
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
mkdir -p "$workdir"
printf '%s' "$script" > "$job"
"${submit[@]}"
