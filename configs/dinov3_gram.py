"""DINOv3 Gram-anchoring phase for the ViT-L/16 recipe: continue a finished
configs/dinov3_vitl16.py run with the Gram loss (official dinov3_vit7b16_gram_anchor.yaml,
scaled from the 7B schedule to ours).

  python -m dino_jax.main --config=configs/dinov3_gram.py --workdir=gs://BUCKET/dinov3_l16_gram \
      --config.init_from=gs://BUCKET/dinov3_l16 --config.data.source=tfds:imagenet2012

`init_from` (required: the main phase's workdir or one of its checkpoints/<step>) copies that
run's student and teacher in at step 0 (fresh Adam state). The Gram teacher is a frozen copy of
that EMA teacher (gram.init_from ''; official gram.ckpt), seen at twice the student's global
resolution (448 for 224, official 512 for 256) without colour distortions, and refreshed from
the EMA teacher every 10,000 steps from step 10,000, 3 times (official update_frequency 10000,
max_updates 3, it_first_update 1,010,000: the start of its Gram stage, our step 0 + 10,000).
Over the first epoch the Gram weight ramps 0 -> 2 and the local-crop DINO weight 1 -> 0.5 by a
half cosine (official: the same ramps over one 1000-step epoch at epoch 1000). Schedules are
DINOv3's constant family as in the official stage: teacher momentum 0.999, weight decay 0.04,
teacher temperature 0.07, lr 3/5 of the main phase's peak (official 3e-5 vs 5e-5 for 7B)
after one epoch of warmup (the official stage inherits the warmed-up run; ours starts a new
optimizer). 30 epochs of 1250 steps (37,500 iterations, room for the 3 refreshes; the
official 7B stage runs 190k iterations after 1M).

Expected: no official number for ViT-L on ImageNet-1k with Gram. The paper's claim is that
dense features (segmentation, the patch-similarity maps) stop degrading over long training,
with global (k-NN / linear) numbers about unchanged; watch gram_loss fall in metrics.jsonl.

Official knobs we lack: gram.tokens_used (ours: all tokens, the official value) and
gram.compute_stats (diagnostics only). The next phase, high-resolution adaptation, is
configs/dinov3_highres.py.
"""
import pathlib

from dino_jax import config_file


def get_config():
  c = config_file.load(pathlib.Path(__file__).with_name('dinov3_vitl16.py'))
  c.init_from = ''  # set on the command line: the main phase's workdir
  c.epochs = 30  # of 1250 steps

  g = c.gram
  g.weight = 2.0  # gram.loss_weight_schedule end
  g.weight_schedule = (0.0, 0.0, 0, 1)  # 0 -> 2 by a half cosine over the first epoch
  g.teacher_size = 2 * c.crops.global_size  # crops.gram_teacher_crops_size 512 for 256
  g.ema_teacher = False
  g.init_from = ''  # the EMA teacher the run starts from
  g.load_ema_at = -1
  g.rep_update = True
  g.update_every = 10000
  g.first_update = 10000
  g.max_updates = 3
  g.normalized = True
  g.img_level = True
  g.remove_neg = False
  g.remove_only_teacher_neg = False
  g.resize = 'bicubic'
  g.antialias = False

  c.loss.dino_local_weight = 0.5  # reweight_dino_local_loss: 1 -> 0.5
  c.loss.dino_local_weight_schedule = (1.0, 1.0, 0, 1)
  c.loss.teacher_temp = 0.07
  c.loss.warmup_teacher_temp = 0.07  # the main phase's warmup is over
  c.loss.warmup_teacher_temp_epochs = 0

  o = c.optim
  o.schedules = 'constant'  # the official stage's schedules: block
  o.lr = 0.6 * 4e-3  # 3/5 of the main phase's peak, sqrt-scaled as there
  o.warmup_epochs = 1
  o.weight_decay = 0.04
  o.momentum_teacher = 0.999
  o.freeze_last_layer = 0  # the heads come trained from the main phase
  return c
