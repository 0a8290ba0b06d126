"""DINOv3 distillation on a 2-core CPU: a frozen ViT-pico/8 teacher (configs/dinov3_cpu.py)
trains a ViT-nano/8 student (width 48, 4 blocks, 3 heads: a quarter of the teacher's
parameters) with the DINOv3 distillation objective.

  python -m dino_jax.main --config=configs/dinov3_cpu.py --workdir=/tmp/dinov3_cpu
  python -m dino_jax.main --config=configs/dinov3_distill.py --workdir=/tmp/dinov3_distill \
      --config.distill.teacher=/tmp/dinov3_cpu

(digits, offline; the first command trains the teacher; distill.teacher also takes
WORKDIR/checkpoints/<step> or a dino_jax .safetensors model file with its run config and
heads.) The teacher's architecture is read from the run config saved with it; it must have
this patch size (8) and these prototype counts (DINO 4096, iBOT on the shared head, as
dinov3_cpu.py), else the run stops with one line before anything is written.

What the run does (the official distillation, dinov3_vitl16_lvd1689m_distilled.yaml over
ssl_meta_arch.py): the teacher is the frozen network (backbone, DINO head, iBOT head) in eval
mode; its targets on the two global crops are its softmaxes at the teacher temperature; the
student, with fresh heads, sees the global crops unmasked, and the iBOT term still compares
its patch tokens at the sampled mask positions with the teacher's; DINO on global and local
crops and KoLeo 0.1 as in dinov3_cpu.py. No Gram anchoring (refused with distillation). The
model kept, evaluated by k-NN and exported, is the EMA of the student (momentum 0.99).
Everything else is dinov3_cpu.py's (RoPE, 4 storage tokens, masked k bias, constant
schedules, 20 epochs = 460 steps), except the prototypes of the student's heads, frozen in
cpu.py against the self-distillation collapse: a frozen teacher cannot collapse, so they
train after the first epoch (the official distilled config: from the start).

Targets: the official distillation centres the teacher by Sinkhorn-Knopp; here the teacher's
softmax is centred by the EMA center as in dinov3_cpu.py, because at this size Sinkhorn-Knopp
flattens the targets: 128 global-crop rows per step cannot give each of 4096 prototypes equal
mass while staying peaked (target entropy 7.87 = 0.95 ln K for the whole run, the collapse
watchdog's uniform band, and the worst student). --config.loss.centering=sinkhorn_knopp gives
the official targets.

Measured on digits (2026-12-02, the 2 cores shared with other jobs, so wall times are loose;
the numbers at a step do not depend on load): teacher (the first command) 20-NN 72.05% at step
460; this student 66.67% at step 460 (about 8 min of wall time, compile and two k-NN passes
included), teacher entropy 4.97 (step 20) -> 6.07 (100) -> 5.73 (460), no watchdog warning;
the same ViT-nano trained from scratch with dinov3_cpu.py (--config.model.arch=vit_nano, same
460 steps) 62.96%; this student with Sinkhorn-Knopp targets 61.62%.
"""
import pathlib

from dino_jax import config_file


def get_config():
  c = config_file.load(pathlib.Path(__file__).with_name('dinov3_cpu.py'))
  c.model.arch = 'vit_nano'  # the student: (48, 4, 3); the teacher's size comes from its run
  c.distill.teacher = '/tmp/dinov3_cpu'  # the first command's workdir
  c.gram.weight = 0.0  # no Gram anchoring in distillation
  c.loss.centering = 'centering'  # the official distillation: 'sinkhorn_knopp' (docstring)
  c.optim.freeze_last_layer = 1  # epochs; see the docstring
  return c
