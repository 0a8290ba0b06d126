"""DINOv3 high-resolution adaptation for the ViT-L/16 recipe: continue a finished
configs/dinov3_gram.py (or dinov3_vitl16.py) run on mixed crop-size sets, the official
dinov3_vit7b16_high_res_adapt.yaml in our fields.

  python -m dino_jax.main --config=configs/dinov3_highres.py --workdir=gs://BUCKET/dinov3_l16_hr \
      --config.init_from=gs://BUCKET/dinov3_l16_gram --config.gram.init_from=gs://BUCKET/dinov3_l16_gram \
      --config.data.source=tfds:imagenet2012

`init_from` (required: the previous phase's workdir or one of its checkpoints/<step>) copies its
student and teacher in at step 0 (fresh Adam state); `gram.init_from` names the frozen Gram
teacher (official gram.ckpt; left empty it is the EMA teacher the run starts from). Each step
trains on one of five (global, local, Gram teacher) crop-size sets drawn with ratios
0.3 / 0.3 / 0.3 / 0.05 / 0.05 (official crops.global_crops_size, local_crops_size,
gram_teacher_crops_size, global_local_crop_pairs_ratios): (512, 112, 768), (768, 112, 1152),
(768, 160, 1152), (768, 224, 1152), (768, 336, 1152) (official 168 for our 160: a crop
size must be a multiple of the patch; PyTorch's strided patch conv drops 168's last 8 px
instead). There is one compiled step per set
(five compilations at the first step), chosen per step by a pure function of the seed and the
step, so a resumed run draws the same sets (dino_jax/resolution.py). Host canvases are 1152 px
so no crop is upsampled from a smaller canvas. The Gram teacher stays fixed (rep_update off),
Gram weight 1.5 and local-crop DINO weight 0.5 from the first step, teacher temperature 0.07,
teacher momentum 0.999, weight decay 0.04, no flips, global crop scale (0.32, 1), local
(0.05, 0.32), AdamW beta2 0.99, as the official stage. Evaluation (k-NN) stays at
crops.global_size = 224, the model's nominal size.

Our choices where the official stage does not carry over: its lr is a half cosine 0 -> 1.25e-5
over 10 epochs, then constant; ours is DINOv3's constant family with a linear warmup 0 -> 1.25e-5
over 10 epochs (lr_scaling sqrt: 1.25e-5 at batch 1024). Batch 256 (official: 8 per GPU); 30
epochs of 1000 steps (official OFFICIAL_EPOCH_LENGTH 1000, 30 epochs). The official KoLeo runs
over groups of 16 images; ours over the whole batch.

Expected: no official number for ViT-L/16 on ImageNet-1k; the paper reports that this stage
keeps global numbers and improves dense tasks at high resolution. Watch gram_loss and the
k-NN in metrics.jsonl; every set's step compiles once, so the first steps take minutes.
"""
import pathlib

from dino_jax import config_file


def get_config():
  c = config_file.load(pathlib.Path(__file__).with_name('dinov3_gram.py'))
  c.init_from = ''  # set on the command line: the previous phase's workdir
  c.epochs = 30
  c.data.epoch_length = 1000
  c.batch_size = 256
  c.data.canvas_size = 1152

  cr = c.crops
  cr.size_sets = ((512, 112, 768), (768, 112, 1152), (768, 160, 1152), (768, 224, 1152),
                  (768, 336, 1152))
  cr.size_set_ratios = (0.3, 0.3, 0.3, 0.05, 0.05)
  cr.global_scale = (0.32, 1.0)
  cr.local_scale = (0.05, 0.32)
  cr.flip_p = 0.0  # horizontal_flips false

  g = c.gram
  g.weight = 1.5
  g.weight_schedule = ()  # constant 1.5
  g.teacher_size = 0  # per set, above
  g.rep_update = False  # the Gram teacher stays fixed
  g.load_ema_at = -1
  g.init_from = ''  # set on the command line (official gram.ckpt), or the starting EMA teacher

  c.loss.dino_local_weight = 0.5
  c.loss.dino_local_weight_schedule = ()
  c.loss.teacher_temp = 0.07
  c.loss.warmup_teacher_temp = 0.07
  c.loss.warmup_teacher_temp_epochs = 0

  o = c.optim
  o.schedules = 'constant'
  o.lr = 1.25e-5
  o.warmup_epochs = 10
  o.weight_decay = 0.04
  o.momentum_teacher = 0.999
  o.b2 = 0.99
  o.freeze_last_layer = 0
  return c
