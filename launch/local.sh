#!/usr/bin/env bash
# One machine, one process, all its devices (CPU, one or more GPUs, or a single TPU host).
#
#   bash launch/local.sh                                    # the CPU quickstart
#   CONFIG=configs/vit_s16.py WORKDIR=/data/runs/vits16 bash launch/local.sh --config.batch_size=256
set -euo pipefail
CONFIG=${CONFIG:-configs/cpu.py}
WORKDIR=${WORKDIR:-/tmp/dino_jax}
exec python -m dino_jax.main --config="$CONFIG" --workdir="$WORKDIR" --config.distributed=none "$@"
