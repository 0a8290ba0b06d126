"""Small DINO recipe for a laptop / 2-core CPU: ViT-pico/8 on 32x32 images.

Quickstart (offline, scikit-learn's digits, about 5 minutes on 2 cores):

  python -m dino_jax.main --config=configs/cpu.py --workdir=/tmp/dino_cpu

Expected on digits (README, "Training on small data"): teacher 20-NN top-1 32.3% at
initialisation, about 67-69% at step 600 and 70-71% at the end (920 steps); the teacher
entropy falls from ~8 to ~4.6-4.7 nats (ln 4096 = 8.3) and the collapse watchdog stays silent.

The CIFAR recipe (configs/cifar.py) builds on this one. What makes it cheap: patch 8 at 32 px
(17 tokens; patch 4 learned no faster per step at 4x the cost), width 96, depth 4, out_dim 4096,
2 x 32 px global and 4 x 16 px local crops, batch 64, 40 epochs, no blur (it erases 32 px
images), and a faster teacher EMA (0.99) that suits a short run. What makes it learn: KoLeo
on the CLS token (without it the digits run drifts to the uniform collapse) and prototypes
kept at their random init (unfreezing them sent every short run to the uniform collapse).
The README's "Training on small data" gives the measurements behind both.
"""
from dino_jax import defaults


def get_config():
  c = defaults.get_config()  # the package defaults: the ViT-S/16 recipe
  c.epochs = 40
  c.batch_size = 64
  c.dtype = 'float32'  # CPUs gain nothing from bfloat16

  c.data.source = 'digits'  # ships with scikit-learn: works offline
  c.data.canvas_size = 32
  c.data.worker_count = 0

  c.model.arch = 'vit_pico'
  c.model.patch_size = 8
  c.model.drop_path_rate = 0.0
  c.model.out_dim = 4096
  c.model.norm_last_layer = True
  c.model.head_hidden_dim = 512
  c.model.head_bottleneck_dim = 128

  c.crops.global_size = 32
  c.crops.global_scale = (0.3, 1.0)
  c.crops.n_local = 4
  c.crops.local_size = 16
  c.crops.local_scale = (0.1, 0.3)
  c.crops.global1_blur_p = 0.0  # at 32 px blur costs k-NN accuracy (README notes)
  c.crops.global2_blur_p = 0.0
  c.crops.local_blur_p = 0.0
  c.crops.eval_crop_fraction = 1.0

  c.loss.warmup_teacher_temp = 0.04
  c.loss.teacher_temp = 0.04
  # KoLeo (DINOv2's regulariser) spreads the CLS tokens of a batch apart. On small data the
  # bottleneck outputs sit in a narrow cone, the teacher's logits barely depend on the image
  # and its targets drift to uniform; KoLeo keeps them apart (digits: H_t 8.31 -> 4.71 at the
  # end, 20-NN 47.1% -> 71.4%; README "Training on small data").
  c.loss.koleo_weight = 0.1

  c.optim.lr = 2e-3  # peak 5e-4 at batch 64: a short run wants a fast start
  c.optim.min_lr = 1e-5
  c.optim.warmup_epochs = 1
  # The prototypes stay at their random init for the whole run (any value >= epochs). In
  # short CPU runs, unfreezing them after one epoch (the official 1) sent the teacher to the
  # uniform collapse within ~150 steps in every variant measured: lr / 4, EMA 0.996,
  # norm_last_layer=False, out_dim 512, KoLeo, teacher temperature 0.02, Sinkhorn-Knopp
  # (README, "Training on small data").
  c.optim.freeze_last_layer = 1000
  c.optim.momentum_teacher = 0.99

  c.log_every = 100
  c.checkpoint_every = 1000
  c.eval_every = 600
  c.knn.max_train = 0
  c.knn.batch_size = 500
  return c
