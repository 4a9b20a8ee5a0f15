#!/usr/bin/env bash
# The ModelScope-size benchmark on one GPU, within about 9 minutes:
#
#   bash launch/bench_gpu.sh [OUT_DIR]        (default: $OUT, else ./bench_out)
#
# Installs nothing but the wheels in .whl, if there (launch/gpu_wheels.sh).
# 1. checks the imports and the GPU (jax and torch must both see it);
# 2. attention alone at the generator's widest level: XLA's kernel against
# cuDNN's fused one (time, TFLOP/s, forward + backward, their difference);
# 3. our train step, then (a phase of its own, so that a slow torch.compile
# cannot starve the train row) our denoise steps, each against diffusers'
# UNet3DConditionModel at the reference shapes (configs/modelscope.py: train
# 4 x 16 x 32x32x4 latents, 77 x 1024 text; denoise 2 x 16 x 32x32 and
# 2 x 16 x 64x64), eager and torch.compile, bf16 (attention 'auto': cuDNN's);
# ours first in each row, so that a phase cut by its limit keeps our number;
# 4. end to end: adding a concept from one photo and the cascade (25 DDIM steps
# at 256 px + 10 at 512 px, 16 frames, CFG), our side only; 5. the train and
# 256 px denoise steps again in a new process, compiled from the persistent
# cache the first phases filled (the "second process" compile time); 6. the
# 256 px denoise step with XLA's GroupNorm instead of the Triton kernel
# (`modelscope:norm=xla`): the A/B that decides the kernel's default.
# Each phase has its own time limit and writes its JSON after every row, so a
# phase cut by its limit still leaves the rows it finished.
#
# Output: OUT/bench.md (the tables), OUT/{attention,bench_train,bench,bench_e2e,
# bench_warm,bench_norm_xla}.json, OUT/*.log (stderr), OUT/env.txt. Environment:
# STEPS (timed calls per row, default 10), ATT_S / TRAIN_S / STEPS_S / E2E_S /
# WARM_S / NORM_S (phase limits in seconds, default 30 / 150 / 160 / 80 / 70 /
# 40), WHL (the wheel folder, default .whl beside launch/), CACHE (the
# compilation cache, emptied first; default /tmp/persvid_bench_cache).
set -uo pipefail

OUT_DIR=${1:-${OUT:-bench_out}}
STEPS=${STEPS:-10}
ATT_S=${ATT_S:-30}
TRAIN_S=${TRAIN_S:-150}
STEPS_S=${STEPS_S:-160}
E2E_S=${E2E_S:-80}
WARM_S=${WARM_S:-70}
NORM_S=${NORM_S:-40}
CACHE=${CACHE:-/tmp/persvid_bench_cache}
mkdir -p "$OUT_DIR"
# A cold persistent cache: the first phases measure first-call compiles and fill
# it (XLA's kernel and autotuning caches included); the last phase reads it.
rm -rf "$CACHE"
export JAX_COMPILATION_CACHE_DIR=$CACHE JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=all
# The wheels a bare GPU image lacks (launch/gpu_wheels.sh writes them to .whl;
# ship that folder with the working tree): installed into /tmp/site, no index.
WHL=${WHL:-$(dirname "$0")/../.whl}
if compgen -G "$WHL/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHL"/*.whl || { echo "error: installing $WHL failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# torch and jax share the GPU: jax allocates on demand instead of 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

python3 - <<'EOF' 2>&1 | tee "$OUT_DIR/env.txt"
import importlib, platform, sys
missing = []
for name in ("jax", "flax", "optax", "orbax.checkpoint", "chex", "ml_collections", "einops",
             "transformers", "torch", "diffusers"):
  try:
    importlib.import_module(name)
  except ImportError as e:
    missing.append(f"{name} ({e})")
if missing:
  sys.exit("error: missing on this machine: " + "; ".join(missing) + ". Fetch the wheels "
           "with `bash launch/gpu_wheels.sh` where PyPI is reachable and ship .whl along")
import jax, flax, torch, diffusers
print("python", platform.python_version(), "jax", jax.__version__, "flax", flax.__version__,
      "torch", torch.__version__, "diffusers", diffusers.__version__)
print("jax devices", jax.devices())
print("torch cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if jax.devices()[0].platform != "gpu" or not torch.cuda.is_available():
  sys.exit("error: jax and torch must both see the GPU (pip install -U 'jax[cuda12]' and "
           "a CUDA build of torch)")
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || exit 1

phase() {   # phase NAME LIMIT_S ARGS...: run launch.bench, keep what it finished
  local name=$1 limit=$2
  shift 2
  echo "## $name" >>"$OUT_DIR/bench.md"
  timeout -k 10 "$limit" python3 -m launch.bench --config modelscope --steps "$STEPS" \
      --json "$OUT_DIR/$name.json" "$@" >"$OUT_DIR/$name.table" 2>"$OUT_DIR/$name.log"
  local rc=$?
  if [[ $rc -eq 0 ]]; then
    cat "$OUT_DIR/$name.table" >>"$OUT_DIR/bench.md"
  else
    echo "(exit status $rc; rows finished before it:)" >>"$OUT_DIR/bench.md"
    [[ -f "$OUT_DIR/$name.json" ]] && python3 -c "import json, sys; from persvid_jax import bench
print(bench.markdown(json.load(open(sys.argv[1]))))" "$OUT_DIR/$name.json" >>"$OUT_DIR/bench.md"
    tail -n 5 "$OUT_DIR/$name.log" >>"$OUT_DIR/bench.md"
  fi
  echo >>"$OUT_DIR/bench.md"
}

: >"$OUT_DIR/bench.md"
phase attention "$ATT_S" --which attention
phase bench_train "$TRAIN_S" --peer --which train
phase bench "$STEPS_S" --peer --which denoise256,denoise512
phase bench_e2e "$E2E_S" --which concept,cascade
phase bench_warm "$WARM_S" --which denoise256,train --steps 3
phase bench_norm_xla "$NORM_S" --which denoise256 --config modelscope:norm=xla
cat "$OUT_DIR/bench.md"
