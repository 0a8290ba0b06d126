"""DINOv2 recipe (the official default config, ssl_default_config) at ViT-S/14 on ImageNet-1k.

  python -m dino_jax.main --config=configs/dinov2_vits14.py --workdir=gs://BUCKET/dinov2_s14

DINO + iBOT masked-patch loss (shared head, 65536 prototypes) + KoLeo 0.1, softmax centering,
LayerScale 1e-5, drop path 0.3 in every block, 2 x 224 (0.32, 1) + 8 x 98 (0.05, 0.32) crops
with DINOv2's effective blur probabilities, AdamW with layer-wise lr decay 0.9 and a 0.2 lr
factor on the patch embedding, per-module gradient clipping at 3, lr 4e-3 * sqrt(batch/1024),
teacher temperature 0.04 -> 0.07 over 30 "epochs" of 1250 steps, 100 such epochs, batch 2048.

Expected: no official from-scratch number exists for S/14; the released ViT-S/14 (distilled
from ViT-g/14 on LVD-142M) scores 79.0 k-NN / 81.1 linear on ImageNet, and iBOT's ViT-S/16
recipe on ImageNet-1k reaches 75.2 k-NN. This config is the reference recipe of dinov2_vitl14
with the default config's choices for a small model.
"""
from dino_jax import defaults


def get_config():
  c = defaults.get_config()  # the package defaults: the ViT-S/16 recipe
  c.epochs = 100  # of data.epoch_length steps
  c.batch_size = 2048  # 64 per GPU on 32 GPUs in the official setup
  c.data.epoch_length = 1250  # DINOv2's fixed "epoch"

  c.model.arch = 'vit_small'
  c.model.patch_size = 14
  c.model.drop_path_rate = 0.3
  c.model.drop_path_uniform = True
  c.model.layerscale = 1e-5
  c.model.mask_token = True
  c.model.interpolate_offset = 0.1
  c.model.norm_last_layer = False  # DINOv2's weight_g is trainable
  c.model.out_dim = 65536

  c.crops.update(defaults.CROP_PRESETS['dinov2'])
  c.crops.global_size = 224
  c.crops.n_local = 8
  c.crops.local_size = 98  # a multiple of the patch size 14

  c.loss.teacher_temp = 0.07
  c.loss.warmup_teacher_temp = 0.04
  c.loss.warmup_teacher_temp_epochs = 30
  c.loss.teacher_temp_per_step = True
  c.loss.centering = 'centering'
  c.loss.koleo_weight = 0.1
  c.loss.ibot_weight = 1.0
  c.loss.mask_probability = 0.5
  c.loss.mask_ratio = (0.1, 0.5)

  c.optim.lr = 4e-3  # at batch 1024, sqrt scaling
  c.optim.lr_scaling = 'sqrt'
  c.optim.min_lr = 1e-6
  c.optim.warmup_epochs = 10
  c.optim.weight_decay = 0.04
  c.optim.weight_decay_end = 0.4
  c.optim.clip_grad = 3.0
  c.optim.clip_mode = 'per_module'
  c.optim.layer_decay = 0.9
  c.optim.patch_embed_lr_mult = 0.2
  c.optim.freeze_last_layer = 1
  c.optim.momentum_teacher = 0.992

  c.checkpoint_every = 3750
  c.eval_every = 12500
  return c
