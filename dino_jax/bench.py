"""Benchmarks that print their numbers (never timed tests).

  python -m dino_jax.bench augment [--config configs/vit_s16.py] [--batch 32] [--canvas 256]
      [--n-local 10]
      DINO multi-crop (2 x 224 + n_local x 96) images/s: the jitted on-device pipeline beside
      a PIL pipeline with the same ops run in this process on one core.
  python -m dino_jax.bench data [--config configs/cpu.py] [--canvas 256] [--steps 40]
      [--data-dir ../shared/data]
      host JPEG decode + canvas resize images/s in one process (= per grain worker), on
      ../shared/data images written out as JPEG files (CIFAR at the config's canvas,
      Imagenette and DAVIS's 854x480 JPEG frames at --canvas);
      then the fraction of the train loop's wall time spent waiting for the next batch in
      the config's recipe, reading those JPEG files (folder:) and the npz arrays.
  python -m dino_jax.bench train --config=configs/bench_cpu.py [--steps 5] [--set F=V ...]
      [--peak-tflops T] [--breakdown]     (`bench step` is the same command)
      compile time, step time, images/s, FLOPs (the traced step's matrix products), TFLOP/s per device, MFU against the device's peak (PEAK_TFLOPS table or
      --peak-tflops), peak device memory from the compiled memory analysis, and with
      --breakdown the time of augmentation, teacher forward and student forward+backward.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import shutil
import time

import jax
import jax.extend
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
    pil_dino_views(im, rng, args.n_local)
  pil_ips = n_pil / (time.perf_counter() - t0)
  device = jax.devices()[0]
  cores = os.cpu_count() if device.platform == 'cpu' else None
  print(f'augment: 2x224 + {args.n_local}x96 crops from {args.canvas}px canvases, '
        f'batch {args.batch}, output {dtype}, device {device.device_kind} ({device.platform})')
  print(f'  jax (jit, on device): {jax_ips:8.1f} images/s  (compile {compile_s:.1f} s)')
  for name, ips in parts.items():
    print(f'    {name}: {ips:8.1f} images/s')
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


def _decode_rate(source, canvas: int, repeat: int = 2) -> tuple[float, float]:
  """(images/s, mean file KB) of read + decode + canvas in this process (files cached)."""
  from dino_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  kb = np.mean([os.path.getsize(source[i]['path']) for i in range(len(source))]) / 1024
  for i in range(len(source)):  # warm the page cache
    pipeline._read(source[i]['path'])  # pylint: disable=protected-access
  t0 = time.perf_counter()
  for _ in range(repeat):
    for i in range(len(source)):
      out, why = pipeline.try_canvas(lambda i=i: source[i], canvas)
      assert out is not None, why
  return repeat * len(source) / (time.perf_counter() - t0), kb


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
  tmp = tempfile.mkdtemp(prefix='dino_bench_data_')
  sets = {}
  shared = args.data_dir
  for name, key, n in (('imagenette_96_subset', 'x_train', 1000),
                       ('cifar10_subset', 'x_train', 10000)):
    npz = os.path.join(shared, f'{name}.npz')
    if os.path.exists(npz):
      sets[name] = _write_jpegs(npz, key, os.path.join(tmp, name), n)
  davis = os.path.join(shared, 'davis2016_subset', 'JPEGImages', '480p')
  if glob.glob(os.path.join(davis, '*', '*.jpg')):
    sets['davis2016 480p frames'] = davis
  if not sets:
    raise SystemExit(f'bench data needs the shared data folder ({shared}): see --data-dir')
  print(f'data: host decode + canvas, one process (= one grain worker), {os.cpu_count()} '
        f'cores visible')
  config = config_file.load(args.config)
  config_file.override(config, dict(_parse_override(config, o) for o in args.set))
  for name, root in sets.items():
    src = folder.FolderSource(root)
    canvas = config.data.canvas_size if name == 'cifar10_subset' else args.canvas
    ips, kb = _decode_rate(src, canvas)
    h, w = np.asarray(data.pipeline.record_image(src[0], 10 ** 6)).shape[:2]
    print(f'  {name}: {len(src)} JPEGs of {w}x{h} ({kb:.1f} KB) -> {canvas}px canvas: '
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
  shutil.rmtree(tmp)


# Dense peak TFLOP/s per device by (device_kind, compute dtype), from the vendors' spec sheets
# (no sparsity). Other devices: pass --peak-tflops.
PEAK_TFLOPS = {
    ('NVIDIA H100 80GB HBM3', 'bfloat16'): 989.0, ('NVIDIA H100 80GB HBM3', 'float32'): 494.5,
    ('NVIDIA H100 PCIe', 'bfloat16'): 756.0, ('NVIDIA H100 PCIe', 'float32'): 378.0,
    ('NVIDIA H200', 'bfloat16'): 989.0, ('NVIDIA H200', 'float32'): 494.5,
    ('NVIDIA A100-SXM4-80GB', 'bfloat16'): 312.0, ('NVIDIA A100-SXM4-80GB', 'float32'): 156.0,
    ('NVIDIA A100-SXM4-40GB', 'bfloat16'): 312.0, ('NVIDIA A100-SXM4-40GB', 'float32'): 156.0,
    ('TPU v4', 'bfloat16'): 275.0,
    ('TPU v5 lite', 'bfloat16'): 197.0,
    ('TPU v5', 'bfloat16'): 459.0,  # v5p
    ('TPU v6 lite', 'bfloat16'): 918.0,
}


def _peak_tflops(kind: str, dtype: str, override: float | None) -> float | None:
  return override if override else PEAK_TFLOPS.get((kind, dtype))


def _time(fn, *args, steps: int) -> tuple[float, float]:
  """(compile + first call seconds, mean seconds per later call) of a jitted function."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return first, (time.perf_counter() - t0) / steps


def _dot_flops(jaxpr) -> float:
  """2 * M * N * K summed over every matrix product of a jaxpr, sub-jaxprs included (scan
  bodies times their length, the costliest branch of a cond). Elementwise work is not
  counted, as usual for MFU."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    subs = [_dot_flops(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
    if eqn.primitive.name == 'cond':  # one branch runs: count the costliest
      total += max(subs, default=0.0)
    elif eqn.primitive.name == 'scan':
      total += eqn.params['length'] * sum(subs)
    else:  # jit, custom_vjp, remat ...; a while loop's body counts once (its trip count is dynamic)
      total += sum(subs)
  return total


def _model_flops(fn, *args) -> float:
  """Matrix-product FLOPs of one call of fn, traced with XLA's attention (plain products, the
  same count as any fused kernel). JAX's trace caches do not see the environment, so they are
  cleared around this trace: a step already lowered with cuDNN attention would otherwise be
  reused, without its attention products. With remat, the recomputed forward is counted too."""
  os.environ['DINO_JAX_ATTENTION'], old = 'xla', os.environ.get('DINO_JAX_ATTENTION')
  jax.clear_caches()
  try:
    return _dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)
  finally:
    if old is None:
      del os.environ['DINO_JAX_ATTENTION']
    else:
      os.environ['DINO_JAX_ATTENTION'] = old
    jax.clear_caches()


def _breakdown(run, state, batch, steps: int) -> None:
  """Where a step's time goes: each part jitted and timed on its own."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from dino_jax import augment  # pylint: disable=import-outside-toplevel
  aug = augment.AugmentConfig.from_config(run.config)
  crop = jax.jit(lambda k, c, hw: augment.multicrop(k, c, hw, aug, run.config.dtype))
  g, l = crop(jax.random.PRNGKey(0), batch['image'], batch['hw'])
  crops = [g] + ([l] if l is not None else [])

  def backbone(params, crops):
    model = nnx.merge(run.student_def, params)
    return sum(model.backbone(c).cls.astype('float32').sum() for c in crops)

  def student(params, crops):
    return nnx.merge(run.student_def, params).multicrop(crops).sum()

  parts = [
      ('augmentation (all crops)', crop, (jax.random.PRNGKey(1), batch['image'], batch['hw'])),
      ('teacher forward (global crops)', jax.jit(student), (state.teacher_params, [g])),
      ('student backbone forward+backward', jax.jit(jax.grad(backbone)), (state.params, crops)),
      ('student backbone+head forward+backward', jax.jit(jax.grad(student)),
       (state.params, crops)),
  ]
  print('  breakdown (each part jitted alone; the rest of the step is loss, optimizer, EMA):')
  for name, fn, args in parts:
    _, t = _time(fn, *args, steps=steps)
    print(f'    {name:40s} {t * 1e3:8.1f} ms')


def bench_train(args) -> None:
  """Compile time, step time, images/s, TFLOP/s, MFU and peak memory of the train step."""
  from dino_jax import augment, config_file, data, sharding, train  # pylint: disable=import-outside-toplevel
  config = config_file.load(args.config)
  config_file.override(config, dict(_parse_override(config, o) for o in args.set))
  run = train.build(config)
  state = train.init_state(run)
  ds = data.train_dataset(run.train_source, canvas_size=config.data.canvas_size,
                          global_batch=config.batch_size, seed=0,
                          process_index=jax.process_index(), process_count=jax.process_count())
  batch = sharding.to_global(ds[0], run.mesh)
  t0 = time.perf_counter()
  lowered = run.step_fn.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # FLOPs counted from the traced program's matrix products (XLA's cost analysis of the
  # compiled program misses the cuBLAS/cuDNN calls on GPUs), split evenly over the devices;
  # the augmentation's resampling products are counted apart and left out of MFU.
  n_dev = jax.device_count()
  aug = augment.AugmentConfig.from_config(config)
  aug_flops = _model_flops(lambda k, c, hw: augment.multicrop(k, c, hw, aug, config.dtype),
                           jax.random.PRNGKey(0), batch['image'], batch['hw']) / n_dev
  model_flops = _model_flops(run.step_fn, state, batch) / n_dev - aug_flops
  mem = compiled.memory_analysis()
  for _ in range(args.warmup):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  device = jax.devices()[0]
  tflops = model_flops / step_s / 1e12
  peak = _peak_tflops(device.device_kind, config.dtype, args.peak_tflops)
  mfu = f'{100 * tflops / peak:.1f}% of {peak:.4g} TFLOP/s' if peak else \
      'n/a (unknown device peak: pass --peak-tflops)'
  print(f'train: {config.model.arch}/{config.model.patch_size}, batch {config.batch_size}, '
        f'crops 2x{config.crops.global_size} + {config.crops.n_local}x{config.crops.local_size}, '
        f'dtype {config.dtype}, remat {config.model.remat}, out_dim {config.model.out_dim}')
  print(f'  devices: {n_dev} x {device.device_kind} ({device.platform}), '
        f'{jax.process_count()} process(es), mesh {dict(run.mesh.shape)}')
  print(f'  compile {compile_s:.1f} s')
  print(f'  step {step_s * 1e3:.1f} ms (median of {args.steps}; min {min(times) * 1e3:.1f}, '
        f'max {max(times) * 1e3:.1f}), {config.batch_size / step_s:.1f} images/s')
  print(f'  {model_flops / 1e9:.1f} GFLOP/step/device for the model, loss and update + '
        f'{aug_flops / 1e9:.1f} for augmentation (matrix products of the traced step)')
  print(f'  {tflops:.3f} TFLOP/s per device achieved (model), MFU {mfu}')
  if mem is not None:
    peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
                  mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    print(f'  peak device memory {peak_bytes / 2**30:.2f} GiB (compiled memory analysis: '
          f'arguments {mem.argument_size_in_bytes / 2**30:.2f} + outputs '
          f'{mem.output_size_in_bytes / 2**30:.2f} + temporaries '
          f'{mem.temp_size_in_bytes / 2**30:.2f} - donated {mem.alias_size_in_bytes / 2**30:.2f})')
  if args.breakdown:
    _breakdown(run, state, batch, args.steps)


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
  a.add_argument('--dtype', default=None,
                 help="crops' dtype (default: the config's compute dtype); 16-bit dtypes also "
                      'run the resampling products in 16 bits')
  a.add_argument('--breakdown', action='store_true',
                 help='also time the same crops without blur, and with no photometric ops')
  d = sub.add_parser('data')
  d.add_argument('--config', default='configs/cpu.py', help='the recipe for the wait share')
  d.add_argument('--canvas', type=int, default=256, help='canvas size for the decode rate')
  d.add_argument('--steps', type=int, default=40)
  d.add_argument('--data-dir', default=SHARED, help='the shared data folder')
  d.add_argument('--set', nargs='*', default=[], metavar='FIELD=VALUE',
                 help='config overrides, e.g. data.worker_count=2')
  t = sub.add_parser('train', aliases=['step'])
  t.add_argument('--config', required=True)
  t.add_argument('--steps', type=int, default=5, help='timed steps (the median is reported)')
  t.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  t.add_argument('--set', nargs='*', default=[], metavar='FIELD=VALUE',
                 help='config overrides, e.g. batch_size=128 dtype=bfloat16')
  t.add_argument('--peak-tflops', type=float, default=None,
                 help='peak TFLOP/s of one device for MFU (default: the PEAK_TFLOPS table)')
  t.add_argument('--breakdown', action='store_true',
                 help='also time augmentation, teacher forward and student fwd+bwd alone')
  args = parser.parse_args()
  {'augment': bench_augment, 'step': bench_train, 'data': bench_data,
   'train': bench_train}[args.what](args)


if __name__ == '__main__':
  main()
