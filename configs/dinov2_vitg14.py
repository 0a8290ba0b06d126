"""DINOv2 ViT-g/14 recipe (the official vitg14 config): the 1.1B-parameter model.

  python -m dino_jax.main --config=configs/dinov2_vitg14.py --workdir=gs://BUCKET/dinov2_g14

The ViT-L/14 recipe (dinov2_vitl14.py) with the giant2 backbone (width 1536, depth 40, 24
heads) and a SwiGLU FFN (hidden 4096), 12 images per GPU (batch 1152 on 96 GPUs).

Expected (official, LVD-142M pretraining, ~22,000 A100-hours): the released ViT-g/14 scores
83.5 k-NN / 86.5 linear on ImageNet-1k.
"""
import pathlib

from dino_jax import config_file


def get_config():
  c = config_file.load(pathlib.Path(__file__).with_name('dinov2_vitl14.py'))
  c.batch_size = 1152
  c.model.arch = 'vit_giant2'
  c.model.ffn = 'swiglu'
  c.mesh.fsdp = 16
  return c
