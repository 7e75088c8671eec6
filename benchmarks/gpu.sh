#!/usr/bin/env bash
# Every accelerator row in one run, for a machine that is lent briefly: the step benchmark (DenseNet-121
# 3D at the paper's 1,024 crops of 32^3, with XLA and model FLOPs and MFU), the end-to-end loop of
# the paper preset on the real grain pipeline (device waits for input?), the input pipeline on
# this host's cores, and a jax.profiler trace of paper-preset steps. Writes one log per part and
# the trace under OUT; compiled programs are shared through one compilation cache.
#
#   pip install -e '.[cuda12]'        # or '.[tpu]'
#   bash benchmarks/gpu.sh [OUT]      # OUT: workdirs/accelerator_rows
#
# PRESET=test CROPS=16 PARTS="train_loop profile" bash benchmarks/gpu.sh /tmp/rows   runs a part of it
# small (a CPU check).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-workdirs/accelerator_rows}
PY=${PY:-python}
PRESET=${PRESET:-paper}
CROPS=${CROPS:-1024}
PARTS=${PARTS:-train_step train_loop pipeline profile}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
export PYTHONUNBUFFERED=1

run() {  # run NAME CMD...: the command's output to the terminal and to OUT/NAME.log.
  local name=$1
  shift
  [[ " $PARTS " == *" $name "* ]] || return 0
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
}

{
  date -u
  "$PY" -c 'import jax; print(jax.__version__, jax.default_backend(), jax.devices())'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  nproc
} 2>&1 | tee "$OUT/machine.log"

run train_step "$PY" -m benchmarks.train_step --densenet_crops="$CROPS" --methods=isimed,simclr
run train_loop "$PY" -m benchmarks.train_loop --presets="$PRESET" --steps=20 --tfds_dir="$OUT/tfds"
run pipeline "$PY" -m benchmarks.pipeline --data_dir="$OUT/tfds"
# Steps 10-14 of the paper preset, after compilation and the first input: the trace TensorBoard's
# profile plugin reads (workdir/plugins/profile).
run profile "$PY" main.py --config="configs/isimed_chest.py:$PRESET" --workdir="$OUT/profile_run" \
  --config.data.tfds_dir="$OUT/tfds" --config.total_steps=16 --config.profile_steps='(10, 14)' \
  --config.checkpoint_every=1000 --config.eval_every=1000 --config.log_every=5
echo "logs and the trace are in $OUT"
