"""Benchmarks that print their numbers (never timed tests).

  python -m dino_jax.bench augment [--config configs/vit_s16.py] [--batch 32] [--canvas 256]
      [--n-local 10]
      DINO multi-crop (2 x 224 + n_local x 96) images/s: the jitted on-device pipeline beside
      a PIL pipeline with the same ops run in this process on one core.
  python -m dino_jax.bench step --config=configs/cpu.py [--steps 10]
      compile time, step time, images/s and FLOPs (XLA cost analysis) of the train step.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

import jax
import numpy as np


def _real_canvases(n: int, canvas: int) -> tuple[np.ndarray, np.ndarray]:
  """Real photos resized into canvases: ../shared/data Imagenette when present, else
  scikit-learn's two sample photos."""
  from dino_jax import data  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                      'imagenette_96_subset.npz')
  if os.path.exists(path):
    with np.load(path) as f:
      images = list(f['x_train'][:n])
  else:
    from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
    photos = load_sample_images().images
    images = [photos[i % len(photos)] for i in range(n)]
  out = [data.to_canvas(im, canvas) for im in images]
  return np.stack([c for c, _ in out]), np.stack([hw for _, hw in out])


def pil_dino_views(image, rng: random.Random, n_local: int, global_size=224, local_size=96):
  """The official DINO per-image pipeline, written with PIL and numpy only."""
  from PIL import Image, ImageEnhance, ImageFilter, ImageOps  # pylint: disable=import-outside-toplevel

  def rrc(img, size, scale):
    w, h = img.size
    for _ in range(10):
      area = w * h * rng.uniform(*scale)
      ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
      cw, ch = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
      if 0 < cw <= w and 0 < ch <= h:
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return img.resize((size, size), Image.BICUBIC)

  def hue(img, shift):
    hsv = np.array(img.convert('HSV'))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(shift * 255)) % 256
    return Image.fromarray(hsv, 'HSV').convert('RGB')

  def jitter(img):
    ops = [lambda x: ImageEnhance.Brightness(x).enhance(rng.uniform(0.6, 1.4)),
           lambda x: ImageEnhance.Contrast(x).enhance(rng.uniform(0.6, 1.4)),
           lambda x: ImageEnhance.Color(x).enhance(rng.uniform(0.8, 1.2)),
           lambda x: hue(x, rng.uniform(-0.1, 0.1))]
    rng.shuffle(ops)
    for op in ops:
      img = op(img)
    return img

  def view(size, scale, blur_p, sol_p):
    img = rrc(image, size, scale)
    if rng.random() < 0.5:
      img = ImageOps.mirror(img)
    if rng.random() < 0.8:
      img = jitter(img)
    if rng.random() < 0.2:
      img = img.convert('L').convert('RGB')
    if rng.random() < blur_p:
      img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < sol_p:
      img = ImageOps.solarize(img, 128)
    x = np.asarray(img, np.float32) / 255.0
    return (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])

  return ([view(global_size, (0.4, 1.0), 1.0, 0.0), view(global_size, (0.4, 1.0), 0.1, 0.2)] +
          [view(local_size, (0.05, 0.4), 0.5, 0.0) for _ in range(n_local)])


def bench_augment(args) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from dino_jax import augment, config_file  # pylint: disable=import-outside-toplevel
  canvases, hw = _real_canvases(args.batch, args.canvas)
  config = config_file.load(args.config)  # default: the official DINO crop settings
  config.crops.n_local = args.n_local
  cfg = augment.AugmentConfig.from_config(config)
  fn = jax.jit(lambda k, c, s: augment.multicrop(k, c, s, cfg))
  c_dev, hw_dev = jax.device_put(canvases), jax.device_put(hw)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(jax.random.PRNGKey(0), c_dev, hw_dev))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(args.iters):
    out = fn(jax.random.PRNGKey(i + 1), c_dev, hw_dev)
  jax.block_until_ready(out)
  jax_ips = args.batch * args.iters / (time.perf_counter() - t0)

  rng = random.Random(0)
  pil_images = [Image.fromarray(c[:s[0], :s[1]]) for c, s in zip(canvases, hw)]
  n_pil = min(len(pil_images), args.pil_images)
  t0 = time.perf_counter()
  for im in pil_images[:n_pil]:
    pil_dino_views(im, rng, args.n_local)
  pil_ips = n_pil / (time.perf_counter() - t0)
  device = jax.devices()[0]
  cores = os.cpu_count() if device.platform == 'cpu' else None
  print(f'augment: 2x224 + {args.n_local}x96 crops from {args.canvas}px canvases, '
        f'batch {args.batch}, device {device.device_kind} ({device.platform})')
  print(f'  jax (jit, on device): {jax_ips:8.1f} images/s  (compile {compile_s:.1f} s)')
  print(f'  PIL (this process, 1 core): {pil_ips:8.1f} images/s')
  if cores:
    print(f'  jax per core ({cores} cores): {jax_ips / cores:8.1f} images/s = '
          f'{jax_ips / cores / pil_ips:.2f}x PIL per core')


def _parse_override(config, text: str):
  """'data.source=digits' -> ('data.source', value cast to the field's current type)."""
  key, value = text.split('=', 1)
  current = config
  for part in key.split('.'):
    current = current[part]
  if isinstance(current, bool):
    return key, value == 'True'
  return key, type(current)(value)


def bench_step(args) -> None:
  from dino_jax import config_file, data, sharding, train  # pylint: disable=import-outside-toplevel
  config = config_file.load(args.config)
  config_file.override(config, dict(_parse_override(config, o) for o in args.set))
  run = train.build(config)
  state = train.init_state(run)
  ds = data.train_dataset(run.train_source, canvas_size=config.data.canvas_size,
                          global_batch=config.batch_size, seed=0)
  batch = sharding.to_global(ds[0], run.mesh)
  t0 = time.perf_counter()
  compiled = run.step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t0) / args.steps
  flops = float(cost.get('flops', 0.0))
  print(f'step: {config.model.arch}/{config.model.patch_size}, batch {config.batch_size}, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}, dtype {config.dtype}')
  print(f'  compile {compile_s:.1f} s, step {step_s * 1e3:.1f} ms, '
        f'{config.batch_size / step_s:.1f} images/s, {flops / 1e9:.1f} GFLOP/step, '
        f'{flops / step_s / 1e12:.3f} TFLOP/s achieved')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='what', required=True)
  a = sub.add_parser('augment')
  a.add_argument('--config', default='configs/vit_s16.py',
                 help='crop settings from this config (sizes, scales, probabilities)')
  a.add_argument('--batch', type=int, default=32)
  a.add_argument('--canvas', type=int, default=256)
  a.add_argument('--n-local', type=int, default=10)
  a.add_argument('--iters', type=int, default=3)
  a.add_argument('--pil-images', type=int, default=32)
  s = sub.add_parser('step')
  s.add_argument('--config', required=True)
  s.add_argument('--steps', type=int, default=5)
  s.add_argument('--set', nargs='*', default=[], metavar='FIELD=VALUE',
                 help='config overrides, e.g. batch_size=16 data.source=digits')
  args = parser.parse_args()
  {'augment': bench_augment, 'step': bench_step}[args.what](args)


if __name__ == '__main__':
  main()
