#!/usr/bin/env bash
# Issue 18's accelerator measurements in one go on one GPU (H100/H200): each case through
# `python -m dino_jax.bench train`, the step as it was ("before": one backbone pass per crop
# size, all prototypes at once) and as it is ("after": packed crops, prototypes in chunks),
# side by side in one run. Every case has a timeout and the whole script a budget (default 8
# minutes); a case that no longer fits is skipped and named at the end, so a rerun can take
# just those (CASES=...). Compiled programs go to a persistent cache: a rerun on the same
# machine skips the compiles that finished.
#
#   bash launch/bench_accelerator.sh                          # every case, ~8 minutes
#   CASES="vitl_after vitl_before" bash launch/bench_accelerator.sh   # some of them
#   TINY=1 JAX_PLATFORMS=cpu bash launch/bench_accelerator.sh         # tiny models: test on CPU
#
# Cases (in this order):
#   vits_after, vits_before   ViT-S/16 DINO, 2 x 224 + 10 x 96 crops, 128 images, bf16,
#                             out_dim 65536 (the issue's first case; the README's H100 row)
#   vits_mem64                the same (after) at 64 images per device: peak memory (<= 8 GB?)
#   vitl_after, vitl_before   ViT-L/16, DINOv2 objective (iBOT + KoLeo, separate heads, SK
#                             targets, out_dim 65536 both), 2 x 224 + 8 x 96 crops, 64 images
#   vits_mem64_dots           the same with model.remat=dots, should 64 not fit in 8 GB
#   vits_after_b256, vits_remat_dots, vits_remat_block   if time is left: a fuller chip, and
#                             the memory/time of the remat policies
#
# Variables: CASES, BUDGET_S (seconds for the whole script, default 480), STEPS (timed steps,
# default 5; WARMUP untimed, default 2), OUT (logs and the summary; default $OUT if set, else
# /tmp/bench_accelerator),
# CHUNK (prototypes per chunk for "after", default 8192), PROFILE=1 (a jax.profiler trace of the
# first case under $OUT/profile), TINY=1 (tiny models and out_dim, for a CPU check).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/bench_accelerator}
BUDGET_S=${BUDGET_S:-480}
STEPS=${STEPS:-5}
CHUNK=${CHUNK:-8192}
TINY=${TINY:-0}
PROFILE=${PROFILE:-0}
CASES=${CASES:-vits_after vits_before vits_mem64 vitl_after vitl_before vits_mem64_dots
  vits_after_b256 vits_remat_dots vits_remat_block}
WARMUP=${WARMUP:-2}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache/accelerator}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}

BEFORE="model.pack_crops=False loss.prototype_chunk=0 model.remat=none"
AFTER="model.pack_crops=True loss.prototype_chunk=$CHUNK model.remat=none"
DATA="data.source=digits data.worker_count=0"
VITS="--config=configs/vit_s16.py"
VITS_SET="dtype=bfloat16 crops.n_local=10 model.out_dim=65536 $DATA"
VITL="--config=configs/dinov2_vitl14.py"
VITL_SET="dtype=bfloat16 model.patch_size=16 crops.global_size=224 crops.local_size=96
  crops.n_local=8 model.out_dim=65536 model.ibot_out_dim=65536 mesh.fsdp=1 batch_size=64 $DATA"
TINY_SET=""
if [[ "$TINY" == 1 ]]; then  # same commands, tiny sizes (the `after` chunk divides 512)
  TINY_SET="model.arch=vit_pico model.patch_size=8 crops.global_size=32 crops.local_size=16
    data.canvas_size=32 model.out_dim=512 model.ibot_out_dim=512 model.head_hidden_dim=64
    model.head_bottleneck_dim=32 model.ibot_bottleneck_dim=32 batch_size=16"
  AFTER="model.pack_crops=True loss.prototype_chunk=128 model.remat=none"
  STEPS=1 WARMUP=1
fi

# name -> timeout (s) and the bench arguments
declare -A TIMEOUT=( [vits_after]=150 [vits_before]=150 [vits_mem64]=120 [vitl_after]=210
  [vitl_before]=210 [vits_mem64_dots]=120 [vits_after_b256]=150 [vits_remat_dots]=150
  [vits_remat_block]=150 )
args_of() {
  case "$1" in
    vits_after) echo "$VITS --set $VITS_SET batch_size=128 $AFTER" ;;
    vits_before) echo "$VITS --set $VITS_SET batch_size=128 $BEFORE" ;;
    vits_mem64) echo "$VITS --set $VITS_SET batch_size=64 $AFTER" ;;
    vitl_after) echo "$VITL --set $VITL_SET $AFTER" ;;
    vitl_before) echo "$VITL --set $VITL_SET $BEFORE" ;;
    vits_mem64_dots) echo "$VITS --set $VITS_SET batch_size=64 $AFTER model.remat=dots" ;;
    vits_after_b256) echo "$VITS --set $VITS_SET batch_size=256 $AFTER" ;;
    vits_remat_dots) echo "$VITS --set $VITS_SET batch_size=128 $AFTER model.remat=dots" ;;
    vits_remat_block) echo "$VITS --set $VITS_SET batch_size=128 $AFTER model.remat=block" ;;
    *) return 1 ;;
  esac
}

{ echo "bench_accelerator $(date -u +%FT%TZ) on $(hostname)"
  git log -1 --format='commit %h %s' 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null;
  python -c 'import jax; print("jax", jax.__version__, jax.devices())'; } | tee "$OUT/summary.txt"

start=$SECONDS
skipped=()
first=1
for name in $CASES; do
  if ! args=$(args_of "$name"); then echo "unknown case $name" | tee -a "$OUT/summary.txt"; continue; fi
  left=$(( BUDGET_S - (SECONDS - start) ))
  if (( left < 45 )); then skipped+=("$name"); continue; fi
  limit=$(( ${TIMEOUT[$name]} < left ? ${TIMEOUT[$name]} : left ))
  extra=()
  if [[ "$PROFILE" == 1 && $first == 1 ]]; then extra=(--profile "$OUT/profile"); fi
  first=0
  # word splitting of $args and $TINY_SET is intended: they are lists of FIELD=VALUE
  # shellcheck disable=SC2086
  cmd=(python -m dino_jax.bench train $args $TINY_SET --steps "$STEPS" --warmup "$WARMUP" "${extra[@]}")
  echo "== $name (timeout ${limit}s): ${cmd[*]}" | tee -a "$OUT/summary.txt"
  t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "${cmd[@]}" > "$OUT/$name.log" 2>&1
  rc=$?
  grep -E '^train:|^  (compile|step|[0-9.]+ GFLOP|[0-9.]+ TFLOP|peak device)' "$OUT/$name.log" \
    | tee -a "$OUT/summary.txt"
  if (( rc != 0 )); then
    echo "  exit $rc after $(( SECONDS - t0 )) s$( (( rc == 124 )) && echo ' (timeout)'); last lines:" \
      | tee -a "$OUT/summary.txt"
    grep -v 'Warning' "$OUT/$name.log" | tail -n 4 | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  fi
done
echo "total $(( SECONDS - start )) s of a ${BUDGET_S} s budget" | tee -a "$OUT/summary.txt"
if (( ${#skipped[@]} )); then
  echo "skipped (no time left): ${skipped[*]}; rerun with CASES=\"${skipped[*]}\"" \
    | tee -a "$OUT/summary.txt"
fi
