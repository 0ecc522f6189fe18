#!/usr/bin/env bash
# The GPU figures of issue 3 in one call of a lent machine (README, "On a
# GPU"): the committed step as `lro.donating_jit` compiles it there, the
# stacked layout and the rank/width sweep, per-precision timing, the
# train step, and where the step time goes. Each part has its own time
# limit, so one that overruns leaves the others' outputs. optimizer_step.py
# prints each ratio under one wrapper on both sides (adam and lora_rite
# both under donating_jit, both under jax.jit) and beside it the ratio net
# of a do-nothing "floor" step timed in the same rounds. For those rows
# (and the 7B compile of the whole donating step) the limits below are
# 5-15 s longer than the 2026-12-04 leases ran under (210/70/70 s): an
# estimate of the added compiles, not yet measured on a GPU.
#
#   OUT=/some/dir COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh
#
# The machine's own python3 with jax, flax and optax; grain (the train
# step's data) can come as wheels in .whl/ (git-ignored: name it in the
# device call's carry; README of docs/results/h200_*). COMMIT is the
# tree's commit, given from the host: a device copy's git metadata can be
# stale.
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used \
    --format=csv
  python3 -c 'import sys, jax, flax, optax; print(sys.version.split()[0],
    "jax", jax.__version__, "flax", flax.__version__, "optax",
    optax.__version__, jax.devices())'
  echo "commit ${COMMIT:-unknown}"
} 2>&1 | tee "$OUT/machine.txt"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$OUT/session.log"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}  # timeout's: 124 when stopped at the limit
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" |
    tee -a "$OUT/session.log"
}
part optimizer_step_full 225 python3 benchmarks/optimizer_step.py \
  --repeats 30 --sweep_repeats 20
part train_step_f32 140 python3 benchmarks/train_step.py \
  --model gemma3-270m-random --dtype float32 --steps 20
part optimizer_step_default 80 python3 benchmarks/optimizer_step.py \
  --quick --repeats 30 --precision default
part breakdown 75 python3 benchmarks/optimizer_step.py --breakdown --repeats 30
