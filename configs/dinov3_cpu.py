"""Small DINOv3 recipe for a 2-core CPU: the DINOv2 CPU recipe (dinov2_cpu.py) with DINOv3's
backbone and schedules, and a small Gram-anchoring term.

  python -m dino_jax.main --config=configs/dinov3_cpu.py --workdir=/tmp/dinov3_cpu

(digits, offline; the CIFAR-10 subset: add --config.data.source=npz:../shared/data/cifar10_subset.npz)

Same model, crops and batch as cpu.py / dinov2_cpu.py (ViT-pico/8, 2 x 32 px + 4 x 16 px, batch
64, no blur, teacher temperature 0.04, EMA 0.99, frozen prototypes, KoLeo 0.1, iBOT with a
learned mask token, layer-wise decay 0.9, patch-embed lr x 0.2, per-module clipping at 3; the
README's "Training on small data" says why these keep a small run healthy). DINOv3 on top:
axial RoPE (base 100, coordinates per axis) instead of the learned pos-embed, 4 storage tokens
(init std 0.02), the masked key bias, the constant schedules family (lr 5e-4 after one warmup
epoch, then lr, weight decay 0.04 and momentum 0.99 constant), and Gram anchoring with weight
0.5 against a Gram teacher that is the starting EMA teacher, refreshed from the EMA teacher
every 50 steps (at 32 px, same size as the global crops: no 2x teacher resolution here).
20 epochs of digits = 460 steps.

Measured alone on the 2 cores (this command, 2026-12-02: 6 min of wall time, compile and three
k-NN evaluations included, ~110 img/s): loss 11.86 (step 20) -> 8.26 (step 460); teacher
entropy 8.00 (step 20) -> 8.10 (step 80) -> 7.55 (260) -> 6.04 (400) -> 5.23 at the end
(0.63 x ln 4096 = 8.32: healthy, below 0.7 ln K); teacher 20-NN top-1 56.23% at step 230 and
72.05% at the end (cpu.py: 69.70% after its 920 steps). The collapse watchdog warns once early
(steps 40-80, entropy still at ~97% of ln K before the features spread) and then stays silent.
A first 8-epoch version of this recipe (184 steps) ended at entropy 7.91 and 48.5%: too short.

Mask token and RoPE: with RoPE a masked patch enters the first LayerNorm as the zero-init
mask token, whose gradient is scaled by 1/sqrt(eps) (README). Per-module clipping (a global
norm over the backbone) would let that one tensor shrink every other backbone gradient. In
the run above the logged pre-clip gradient norm stayed at 3-16 from step 20 on, with the
loss falling, so no separate setting was needed; per-tensor clipping (optim.clip_mode=
'per_param', DINO v1) is the alternative that confines any spike to the mask token.
"""
import pathlib

from dino_jax import config_file


def get_config():
  c = config_file.load(pathlib.Path(__file__).with_name('dinov2_cpu.py'))
  c.epochs = 20
  m = c.model
  m.pos_embed = 'rope'  # axial RoPE, base 100, coordinates per axis, as DINOv3
  m.rope_rescale = 0.0
  m.n_registers = 4  # storage tokens
  m.register_init_std = 0.02  # DINOv3's storage-token init
  m.mask_k_bias = True
  m.untie_cls_and_patch_norms = False
  c.optim.schedules = 'constant'  # DINOv3's v2 schedules: warmup then constant lr, wd, EMA
  c.gram.weight = 0.5
  c.gram.update_every = 50
  c.log_every = 20
  return c
