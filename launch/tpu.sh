#!/usr/bin/env bash
# Cloud TPU: create a TPU VM (or a queued resource), set up every worker, train on all of them
# (--worker=all: one process per host; jax.distributed finds the others), follow the log,
# delete. Run from the repository root on a machine with gcloud configured.
#
#   export TPU_NAME=dino ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket
#   bash launch/tpu.sh create      # or: QUEUED=1 bash launch/tpu.sh create (queued resource)
#   bash launch/tpu.sh setup       # copy this repo to every worker, install jax[tpu] + it
#   bash launch/tpu.sh train --config.batch_size=1024    # extra args go to dino_jax.main
#   bash launch/tpu.sh log         # follow worker 0's log (Ctrl-C stops following only)
#   bash launch/tpu.sh delete
#
# Variables: TPU_NAME, ZONE, ACCELERATOR (v4-32, v5p-64, v5litepod-16, ...), BUCKET (gs://
# path for checkpoints and logs), CONFIG (default configs/vit_s16.py), RUNTIME (TPU software
# version, default tpu-ubuntu2204-base), QUEUED=1 (queued resource), SPOT=1 (spot capacity),
# TFDS_DATA_DIR (default $BUCKET/tensorflow_datasets).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/vit_s16.py}
QUEUED=${QUEUED:-0}
SPOT=${SPOT:-0}

ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"; }

cmd=${1:?usage: tpu.sh create|setup|train|log|delete [args]}; shift
case "$cmd" in
  create)
    spot=(); [[ "$SPOT" == 1 ]] && spot=(--spot)
    if [[ "$QUEUED" == 1 ]]; then
      gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
        --zone="$ZONE" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${spot[@]}"
      echo "waiting for the queued resource to become ACTIVE ..."
      until gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" \
          --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done
    else
      gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
    fi ;;
  setup)
    gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
      dino_jax configs launch setup.cfg pyproject.toml README.md "$TPU_NAME":~/dino_jax/
    ssh_all "cd ~/dino_jax && python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e '.[gcs]'" ;;
  train)
    : "${BUCKET:?set BUCKET (gs://...) for checkpoints}"
    data_dir=${TFDS_DATA_DIR:-$BUCKET/tensorflow_datasets}
    # Every worker runs the same command; config.distributed='auto' detects the TPU VM and
    # calls jax.distributed.initialize(); process 0 writes the logs, all write checkpoints.
    ssh_all "cd ~/dino_jax && TFDS_DATA_DIR=$data_dir nohup python3 -m dino_jax.main \
      --config=$CONFIG --workdir=$BUCKET/$TPU_NAME $* > ~/train.log 2>&1 &" ;;
  log)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 \
      --command="tail -n 100 -f ~/train.log" ;;
  delete)
    if [[ "$QUEUED" == 1 ]]; then
      gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --force --quiet
    else
      gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    fi ;;
  *) echo "unknown command $cmd: create|setup|train|log|delete" >&2; exit 2 ;;
esac
