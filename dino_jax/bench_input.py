"""The input side of `python -m dino_jax.bench` (see bench.py for the command lines): the
multi-crop augmentation against a PIL pipeline, and host decoding and the train loop's wait for
data."""
from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
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
  dtype = args.dtype or config.dtype
  c_dev, hw_dev = jax.device_put(canvases), jax.device_put(hw)

  def rate(variant) -> tuple[float, float]:
    """(compile + first call seconds, images/s over args.iters calls with fresh keys)."""
    fn = jax.jit(lambda k, c, s: augment.multicrop(k, c, s, variant, dtype))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(jax.random.PRNGKey(0), c_dev, hw_dev))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.iters):
      out = fn(jax.random.PRNGKey(i + 1), c_dev, hw_dev)
    jax.block_until_ready(out)
    return first, args.batch * args.iters / (time.perf_counter() - t0)

  compile_s, jax_ips = rate(cfg)
  parts = {}
  if args.breakdown:  # the same crops with ops switched off, to see what each costs
    no_blur = lambda specs: tuple(dataclasses.replace(c, blur_p=0.0) for c in specs)
    plain = lambda specs: tuple(dataclasses.replace(c, blur_p=0.0, solarize_p=0.0)
                                for c in specs)
    variants = {
        'crop + resize + flip only': dataclasses.replace(
            cfg, global_crops=plain(cfg.global_crops), local_crops=plain(cfg.local_crops),
            jitter_p=0.0, grayscale_p=0.0),
        'all but blur': dataclasses.replace(cfg, global_crops=no_blur(cfg.global_crops),
                                            local_crops=no_blur(cfg.local_crops))}
    parts = {name: rate(variant)[1] for name, variant in variants.items()}

  rng = random.Random(0)
  pil_images = [Image.fromarray(c[:s[0], :s[1]]) for c, s in zip(canvases, hw)]
  n_pil = min(len(pil_images), args.pil_images)
  t0 = time.perf_counter()
  for im in pil_images[:n_pil]:
    pil_dino_views(im, rng, args.n_local, config.crops.global_size, config.crops.local_size)
  pil_ips = n_pil / (time.perf_counter() - t0)
  device = jax.devices()[0]
  cores = os.cpu_count() if device.platform == 'cpu' else None
  print(f'augment: 2x{config.crops.global_size} + {args.n_local}x{config.crops.local_size} '
        f'crops from {args.canvas}px canvases, '
        f'batch {args.batch}, output {dtype}, device {device.device_kind} ({device.platform})')
  print(f'  jax (jit, on device): {jax_ips:8.1f} images/s  (compile {compile_s:.1f} s)')
  for name, ips in parts.items():
    print(f'    {name}: {ips:8.1f} images/s')
  print(f'  PIL (this process, 1 core): {pil_ips:8.1f} images/s')
  if cores:
    print(f'  jax per core ({cores} cores): {jax_ips / cores:8.1f} images/s = '
          f'{jax_ips / cores / pil_ips:.2f}x PIL per core')


def parse_override(config, text: str):
  """'data.source=digits' -> ('data.source', value cast to the field's current type)."""
  key, value = text.split('=', 1)
  current = config
  for part in key.split('.'):
    current = current[part]
  if isinstance(current, bool):
    return key, value == 'True'
  return key, type(current)(value)


SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))


def _write_jpegs(npz: str, key: str, root: str, n: int) -> str:
  """The first n images of npz[key] as JPEG files (quality 90) in class folders under root."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with np.load(npz) as f:
    images, labels = f[key][:n], f['y' + key[1:]][:n]
  for i, (im, y) in enumerate(zip(images, labels)):
    os.makedirs(os.path.join(root, f'c{y}'), exist_ok=True)
    Image.fromarray(im).save(os.path.join(root, f'c{y}', f'{i:05d}.jpg'), quality=90)
  return root


def _decode_rate(source, canvas: int, n: int, repeat: int = 2) -> tuple[float, float]:
  """(images/s, mean file KB) of read + decode + canvas of the first n files of `source` in
  this process (files cached)."""
  from dino_jax import paths  # pylint: disable=import-outside-toplevel
  from dino_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  kb = np.mean([os.path.getsize(source[i]['path']) for i in range(n)]) / 1024
  for i in range(n):  # warm the page cache
    paths.read_bytes(source[i]['path'])
  t0 = time.perf_counter()
  for _ in range(repeat):
    for i in range(n):
      out, why = pipeline.try_canvas(lambda i=i: source[i], canvas)
      assert out is not None, why
  return repeat * n / (time.perf_counter() - t0), kb


def _wait_fraction(config, steps: int) -> tuple[float, float]:
  """(fraction of loop wall time inside next(batches), ms per step) over `steps` steps of the
  train loop's own sequence: next batch -> global arrays -> dispatch the jitted step."""
  from dino_jax import data, sharding, train  # pylint: disable=import-outside-toplevel
  run = train.build(config)
  state = train.init_state(run)
  batches = data.train_iterator(
      run.train_source, canvas_size=config.data.canvas_size, global_batch=config.batch_size,
      seed=0, worker_count=config.data.worker_count, prefetch=config.data.prefetch)
  for _ in range(3):  # compile, fill the prefetch buffer
    state, m = run.step_fn(state, sharding.to_global(next(batches), run.mesh))
  jax.block_until_ready(m)
  wait = 0.0
  t_start = time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    batch = next(batches)
    wait += time.perf_counter() - t0
    state, m = run.step_fn(state, sharding.to_global(batch, run.mesh))
  jax.block_until_ready(m)
  total = time.perf_counter() - t_start
  batches.close()
  return wait / total, 1e3 * total / steps


def bench_data(args) -> None:
  import glob  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  from dino_jax import config_file, data  # pylint: disable=import-outside-toplevel
  from dino_jax.data import folder  # pylint: disable=import-outside-toplevel
  shared, cap = args.data_dir, args.images or None
  davis = os.path.join(shared, 'davis2016_subset', 'JPEGImages', '480p')
  npzs = [(name, os.path.join(shared, f'{name}.npz'), n) for name, n in
          (('imagenette_96_subset', 1000), ('cifar10_subset', 10000))]
  if not (any(os.path.exists(p) for _, p, _ in npzs) or
          glob.glob(os.path.join(davis, '*', '*.jpg'))):
    raise SystemExit(f'bench data needs the shared data folder ({shared}): see --data-dir')
  config = config_file.load(args.config)
  config_file.override(config, dict(parse_override(config, o) for o in args.set))
  tmp = tempfile.mkdtemp(prefix='dino_bench_data_')
  try:
    sets = {name: _write_jpegs(npz, 'x_train', os.path.join(tmp, name), min(n, cap or n))
            for name, npz, n in npzs if os.path.exists(npz)}
    if glob.glob(os.path.join(davis, '*', '*.jpg')):
      sets['davis2016 480p frames'] = davis
    print(f'data: host decode + canvas, one process (= one grain worker), {os.cpu_count()} '
          f'cores visible')
    for name, root in sets.items():
      src = folder.FolderSource(root)
      canvas = config.data.canvas_size if name == 'cifar10_subset' else args.canvas
      n = min(len(src), cap or len(src))
      ips, kb = _decode_rate(src, canvas, n)
      h, w = np.asarray(data.pipeline.record_image(src[0], 10 ** 6)).shape[:2]
      print(f'  {name}: {n} JPEGs of {w}x{h} ({kb:.1f} KB) -> {canvas}px canvas: '
            f'{ips:8.1f} images/s per worker')
    cifar = os.path.join(shared, 'cifar10_subset.npz')
    sources = ([f'folder:{sets["cifar10_subset"]}', f'npz:{cifar}'] if 'cifar10_subset' in sets
               else [config.data.source])
    print(f'data: share of the train loop spent waiting for data, {args.config} '
          f'(batch {config.batch_size}, canvas {config.data.canvas_size}, '
          f'{config.data.worker_count} workers, prefetch {config.data.prefetch})')
    for source in sources:
      config.data.source = source
      frac, ms = _wait_fraction(config, args.steps)
      print(f'  {source}: {100 * frac:5.1f}% of {ms:.0f} ms/step waiting for the next batch')
  finally:
    shutil.rmtree(tmp)
