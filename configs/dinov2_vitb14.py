"""DINOv2 default recipe at ViT-B/14 on ImageNet-1k (see dinov2_vits14.py for the recipe).

  python -m dino_jax.main --config=configs/dinov2_vitb14.py --workdir=gs://BUCKET/dinov2_b14

Expected: no official from-scratch number for B/14; the released ViT-B/14 (distilled from
ViT-g/14 on LVD-142M) scores 82.1 k-NN / 84.5 linear, iBOT's ViT-B/16 on ImageNet-1k 77.1 k-NN.
"""
import pathlib

from dino_jax import config_file


def get_config():
  c = config_file.load(pathlib.Path(__file__).with_name('dinov2_vits14.py'))
  c.model.arch = 'vit_base'
  return c
