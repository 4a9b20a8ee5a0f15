#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: one launch.train process per TPU host.
#
#   bash launch/tpu_pod.sh --tpu NAME --zone ZONE [--project PROJECT] \
#       --config configs/demo.py:stage=base --workdir /mnt/shared/runs/base \
#       [--workers N] [--port 8482] [--repo DIR] [--python PY] [--dry-run] \
#       [--config.KEY=VALUE ...]
#
# Runs `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...`: every
# host of the slice runs the same command, which exports the variables
# launch.train's multi-process path reads (the same path as the 2-process
# local test) from the TPU VM metadata server, as jax's own Cloud TPU
# detection does:
#   JAX_COORDINATOR_ADDRESS  worker 0's address (attribute worker-network-endpoints):PORT
#   JAX_NUM_PROCESSES        --workers, else the number of worker-network-endpoints
#   JAX_PROCESS_ID           this host's agent-worker-number
# then `cd REPO && python -m launch.train --config ... --workdir ...`, which
# calls jax.distributed.initialize(). --dry-run prints the gcloud command and
# runs nothing. The code must already be at REPO on every host (default: the
# same path as here) with its environment installed; WORKDIR must be a file
# system all hosts share (checkpoints are written collectively). One slice
# only (no multislice).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "error: $*" >&2; exit 2; }

tpu="" zone="" project="" config="" workdir="" workers="" port=8482
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" python=python3 dry_run=0
extra=()
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) need "$@"; tpu=$2; shift 2 ;;
    --zone) need "$@"; zone=$2; shift 2 ;;
    --project) need "$@"; project=$2; shift 2 ;;
    --config) need "$@"; config=$2; shift 2 ;;
    --workdir) need "$@"; workdir=$2; shift 2 ;;
    --workers) need "$@"; workers=$2; shift 2 ;;
    --port) need "$@"; port=$2; shift 2 ;;
    --repo) need "$@"; repo=$2; shift 2 ;;
    --python) need "$@"; python=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --config.*=*) extra+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
done
[[ -n "$tpu" ]] || die "--tpu is required (the TPU VM's name)"
[[ -n "$zone" ]] || die "--zone is required (e.g. us-central2-b)"
[[ -n "$config" ]] || die "--config is required (configs/NAME.py[:variant])"
[[ -n "$workdir" ]] || die "--workdir is required (on a file system every host sees)"
[[ -z "$workers" || "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '${workers}'"
[[ "$port" =~ ^[1-9][0-9]*$ ]] || die "--port must be a port number, got '${port}'"
[[ "$workdir" = /* ]] || die "--workdir must be an absolute path on the hosts, got '${workdir}'"

train=("$python" -m launch.train --config "$config" --workdir "$workdir" --no-progress "${extra[@]}")
train_q=$(printf '%q ' "${train[@]}")
md='curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes'
# worker-network-endpoints is 'a,b,...' of hostnames or of name:id:ip triples
# (jax's GceTpuCluster reads both): the address is the last ':' field.
remote="set -euo pipefail; eps=\$($md/worker-network-endpoints); "
remote+="export JAX_COORDINATOR_ADDRESS=\$(echo \"\$eps\" | cut -d, -f1 | awk -F: '{print \$NF}'):$port; "
if [[ -n "$workers" ]]; then
  remote+="export JAX_NUM_PROCESSES=$workers; "
else
  remote+="export JAX_NUM_PROCESSES=\$(echo \"\$eps\" | awk -F, '{print NF}'); "
fi
remote+="export JAX_PROCESS_ID=\$($md/agent-worker-number); "
remote+="cd $(printf '%q' "$repo") && exec ${train_q% }"

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -n "$project" ]] && cmd+=("--project=$project")
cmd+=(--worker=all "--command=$remote")

if [[ $dry_run == 1 ]]; then
  printf '# every host of %s runs:\n# %s\n' "$tpu" "$remote"
  cmd_q=$(printf '%q ' "${cmd[@]}")
  printf '%s\n' "${cmd_q% }"
  exit 0
fi
command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
"${cmd[@]}"
