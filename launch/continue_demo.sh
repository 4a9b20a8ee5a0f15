#!/usr/bin/env bash
# Continue training an exported model (default: the shipped demo) on one
# machine within a wall-clock budget, then export the result.
#
#   bash launch/continue_demo.sh OUT_DIR [BUDGET_SECONDS]
#
# The personalize and SR stages run side by side (they share only the frozen
# text encoder), each fine-tuning from the exported model
# (config.train.init_from=MODEL). At BUDGET_SECONDS each trainer gets SIGTERM,
# finishes its step, saves a checkpoint and exits 0; then both are exported to
# OUT_DIR/model. Logs and TensorBoard events land in OUT_DIR too. Made for a
# GPU slot of a few minutes (the data is the numpy renderer: no TensorFlow).
#
# Environment (defaults in brackets):
#   MODEL   exported model to start from [persvid_jax/assets/demo]
#   CONFIG  config file (":stage=..." is appended) [configs/demo.py]
#   BATCH   global batch per stage [32]
#   STEPS   total_steps of each stage's cosine schedule [8000]; the budget
#           usually ends the run first, the schedule then stops early
#   PROCS   renderer worker processes per stage [6]
#   WORK    where the workdirs go [/tmp/continue_demo]; a rerun resumes them
#   STAGES  which stages to continue ["personalize sr"]; the networks of a
#           stage left out are exported as MODEL has them
#   WHL     wheels to install into /tmp/site first, if any [.whl beside launch/]
#           (launch/gpu_wheels.sh: what a GPU image without internet lacks)
set -euo pipefail

OUT=${1:?usage: bash launch/continue_demo.sh OUT_DIR [BUDGET_SECONDS]}
BUDGET=${2:-420}
MODEL=${MODEL:-persvid_jax/assets/demo}
CONFIG=${CONFIG:-configs/demo.py}
BATCH=${BATCH:-32}
STEPS=${STEPS:-8000}
PROCS=${PROCS:-6}
WORK=${WORK:-/tmp/continue_demo}
STAGES=${STAGES:-personalize sr}

case "$CONFIG" in *:*) sep=",";; *) sep=":";; esac
if [[ ! -f "$MODEL/model.safetensors" ]]; then
  echo "error: MODEL=$MODEL is not an exported model (no model.safetensors)" >&2; exit 2
fi
mkdir -p "$OUT" "$WORK"
# The wheels a bare GPU image lacks (launch/gpu_wheels.sh writes them to .whl;
# ship that folder with the working tree): installed into /tmp/site, no index.
WHL=${WHL:-$(dirname "$0")/../.whl}
if compgen -G "$WHL/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHL"/*.whl || { echo "error: installing $WHL failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Two trainers share the accelerator: allocate on demand, not 75% each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

python3 - <<'EOF' | tee "$OUT/env.txt"
import jax, flax, optax, orbax.checkpoint as ocp, platform
print("python", platform.python_version(), "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "orbax", getattr(ocp, "__version__", "?"))
print("devices", jax.devices())
EOF

pids=()
for stage in $STAGES; do
  timeout --preserve-status -s TERM -k 120 "$BUDGET" \
    python3 -m launch.train --config "$CONFIG${sep}stage=$stage" --workdir "$WORK/$stage" \
      --no-progress \
      --config.train.init_from="$(realpath "$MODEL")" \
      --config.train.batch_size="$BATCH" --config.train.total_steps="$STEPS" \
      --config.data.processes="$PROCS" --config.train.sample_every_steps=0 \
      --config.train.checkpoint_every_steps=1000 \
      >"$OUT/$stage.log" 2>&1 &
  pids+=($!)
done

# Fail fast: if one trainer dies, stop the other instead of idling to the budget.
status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then
    status=1
    kill -TERM "${pids[@]}" 2>/dev/null || true
  fi
done
workdirs=()
for stage in $STAGES; do
  workdirs+=(--workdir "$WORK/$stage")
  cp "$WORK/$stage"/tb/events.out.tfevents.* "$OUT/$stage.tfevents" 2>/dev/null || true
  tail -n 2 "$OUT/$stage.log"
done
if [[ $status != 0 ]]; then
  echo "error: a trainer failed; see the logs in $OUT" >&2; exit 1
fi

# Networks no stage here trained come from MODEL (each workdir's init_from).
python3 -m launch.export "${workdirs[@]}" --out "$OUT/model"
