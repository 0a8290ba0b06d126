"""The `bench-cpu` case: ViT-Tiny/16 on a CPU, one device, float32 (a speed benchmark, not a
training recipe).

  python -m dino_jax.bench train --config=configs/bench_cpu.py

ViT-Tiny/16, out_dim 4096, batch 16, 2 x 128 px global + 6 x 64 px local crops, the official
DINO augmentation; the README compares its step time with the official PyTorch step measured
on the same machine.
"""
from dino_jax import defaults


def get_config():
  c = defaults.get_config()  # the package defaults: the ViT-S/16 recipe
  c.batch_size = 16
  c.dtype = 'float32'  # CPUs gain nothing from bfloat16

  c.data.source = 'digits'  # offline; the step time does not depend on the pixels
  c.data.canvas_size = 128  # images are resized into 128 x 128 canvases
  c.data.worker_count = 0

  c.model.arch = 'vit_tiny'
  c.model.patch_size = 16
  c.model.out_dim = 4096

  c.crops.global_size = 128
  c.crops.n_local = 6
  c.crops.local_size = 64

  c.mesh.data = 1  # one device
  c.mesh.fsdp = 1
  return c
