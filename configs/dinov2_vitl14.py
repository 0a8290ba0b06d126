"""DINOv2 ViT-L/14 recipe (the official vitl14 config): ImageNet-22k in the paper.

  python -m dino_jax.main --config=configs/dinov2_vitl14.py --workdir=gs://BUCKET/dinov2_l14 \
      --config.data.source=tfds:imagenet2012

On top of the default recipe (dinov2_vits14.py): separate DINO and iBOT heads with 131072
prototypes each (DINO bottleneck 384), Sinkhorn-Knopp targets, teacher momentum 0.994, drop
path 0.4, no layer-wise decay, lr 2e-4 * sqrt(batch/1024) after 80 warmup epochs, weight decay
to 0.2, 500 epochs of 1250 steps, batch 3072 (32 per GPU on 96 GPUs).

Expected (official, ImageNet-22k pretraining, ~3.3 days on 96 A100): 82.0 k-NN / 84.5 linear on
ImageNet-1k. The released (distilled) ViT-L/14 scores 83.5 / 86.3.
"""
import pathlib

from dino_jax import config_file


def get_config():
  c = config_file.load(pathlib.Path(__file__).with_name('dinov2_vits14.py'))
  c.epochs = 500
  c.batch_size = 3072
  c.model.arch = 'vit_large'
  c.model.drop_path_rate = 0.4
  c.model.out_dim = 131072
  c.model.head_bottleneck_dim = 384
  c.model.ibot_separate_head = True
  c.model.ibot_out_dim = 131072
  c.model.ibot_bottleneck_dim = 256
  c.loss.centering = 'sinkhorn_knopp'
  c.optim.lr = 2e-4
  c.optim.warmup_epochs = 80
  c.optim.weight_decay_end = 0.2
  c.optim.layer_decay = 1.0
  c.optim.momentum_teacher = 0.994
  c.mesh.fsdp = 8  # shard the 300M-parameter student/teacher/Adam state over 8 devices
  return c
