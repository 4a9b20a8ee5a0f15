#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that a bare GPU image lacks, so
# that a GPU slot that cannot reach the internet can run the benchmark and the
# training scripts:
#
#   bash launch/gpu_wheels.sh [DIR]          (default: .whl, ignored by git)
#
# The lent GPU images hold python 3.12 with jax, flax, optax, orbax, chex,
# einops, transformers, torch, opencv and protobuf, but not these pure-Python
# packages: ml-collections (configs/), diffusers (the --peer side of
# launch.bench) and tensorboardX (training's event files). bench_gpu.sh and
# continue_demo.sh install DIR's wheels into /tmp/site themselves when DIR
# exists; ship DIR along with the working tree (about 7 MB).
#
# The versions are the ones this repo is tested with; none of them pulls a
# dependency the image lacks (checked against its package list, 2026-11).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
WHEELS=(
  "ml-collections==1.1.0"   # needs absl-py, PyYAML: in the image
  "diffusers==0.42.1"       # the peer of issue 8's table; huggingface-hub>=1.32: image has 1.33
  "tensorboardX==2.6.5"     # needs numpy, packaging, protobuf: in the image
)
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$DIR" "${WHEELS[@]}"
ls -l "$DIR"
