"""Benchmarks that print their numbers (never timed tests).

  python -m dino_jax.bench augment [--config configs/vit_s16.py] [--batch 32] [--canvas 256]
      [--n-local 10]
      DINO multi-crop (2 x global_size + n_local x local_size of the config; 224 and 96 by
      default) images/s: the jitted on-device pipeline beside a PIL pipeline with the same ops
      run in this process on one core.
  python -m dino_jax.bench data [--config configs/cpu.py] [--canvas 256] [--steps 40]
      [--data-dir ../shared/data] [--images N] [--set F=V ...]
      host JPEG decode + canvas resize images/s in one process (= per grain worker), on
      ../shared/data images written out as JPEG files (CIFAR at the config's canvas,
      Imagenette and DAVIS's 854x480 JPEG frames at --canvas; --images caps each set);
      then the fraction of the train loop's wall time spent waiting for the next batch in
      the config's recipe, reading those JPEG files (folder:) and the npz arrays.
  python -m dino_jax.bench train --config=configs/bench_cpu.py [--steps 5] [--set F=V ...]
      [--peak-tflops T] [--breakdown] [--profile DIR]     (`bench step` is the same command)
      compile time, step time, images/s, FLOPs (the traced step's matrix products), TFLOP/s
      per device, MFU against the device's peak (PEAK_TFLOPS table or --peak-tflops), peak
      device memory from the compiled memory analysis; with --breakdown the time of
      augmentation, teacher forward and student forward+backward; with --profile a
      jax.profiler trace of --profile-steps more steps written to DIR.

The augment and data benchmarks live in bench_input.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.extend
import numpy as np

from dino_jax.bench_input import SHARED, bench_augment, bench_data, parse_override


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
  """Where a step's time goes: each part jitted and timed on its own, on the step's own code
  paths (the student's backbone as DINO.backbone_crops runs it: packed or per crop size, with
  drop path; no iBOT masks)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from dino_jax import augment, sharding  # pylint: disable=import-outside-toplevel
  aug = augment.AugmentConfig.from_config(run.config)
  crop = jax.jit(lambda k, c, hw: augment.multicrop(k, c, hw, aug, run.config.dtype))
  g, l = crop(jax.random.PRNGKey(0), batch['image'], batch['hw'])
  crop_sharding = sharding.batch_sharding(run.mesh)
  key = jax.random.PRNGKey(2)

  def teacher(params, g):
    model = nnx.merge(run.teacher_def, params)
    return model.head(model.backbone(g).cls).astype('float32').sum()

  def cls_tokens(params, g, l):
    model = nnx.merge(run.student_def, params)
    return model, model.backbone_crops(g, l, key, sharding=crop_sharding)[1]

  def backbone(params, g, l):
    return cls_tokens(params, g, l)[1].astype('float32').sum()

  def student(params, g, l):
    model, cls = cls_tokens(params, g, l)
    return model.head(cls).astype('float32').sum()

  parts = [
      ('augmentation (all crops)', crop, (jax.random.PRNGKey(1), batch['image'], batch['hw'])),
      ('teacher forward (global crops)', jax.jit(teacher), (state.teacher_params, g)),
      ('student backbone forward+backward', jax.jit(jax.grad(backbone)), (state.params, g, l)),
      ('student backbone+head forward+backward', jax.jit(jax.grad(student)),
       (state.params, g, l)),
  ]
  print('  breakdown (each part jitted alone; the rest of the step is loss, optimizer, EMA):')
  for name, fn, args in parts:
    _, t = _time(fn, *args, steps=steps)
    print(f'    {name:40s} {t * 1e3:8.1f} ms')


def bench_train(args) -> None:
  """Compile time, step time, images/s, TFLOP/s, MFU and peak memory of the train step."""
  from dino_jax import augment, config_file, data, sharding, train  # pylint: disable=import-outside-toplevel
  config = config_file.load(args.config)
  config_file.override(config, dict(parse_override(config, o) for o in args.set))
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
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)  # (--warmup 0 runs none)
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
  if args.profile:
    state = _profile(compiled, state, batch, args.profile, args.profile_steps)
  if args.breakdown:
    _breakdown(run, state, batch, args.steps)


def _profile(compiled, state, batch, out_dir: str, steps: int):
  """A jax.profiler trace of `steps` more steps (after the timed ones, so tracing costs them
  nothing) in out_dir/plugins/profile/<time>/: <host>.xplane.pb for TensorBoard's profile
  plugin (xprof) and <host>.trace.json.gz for Perfetto (ui.perfetto.dev). Returns the state."""
  with jax.profiler.trace(out_dir):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=i):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
  print(f'  profile: {steps} step(s) traced to {out_dir} (TensorBoard profile plugin / '
        f'xprof: the .xplane.pb; Perfetto: the .trace.json.gz)')
  return state


def main(argv: list[str] | None = None) -> None:
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
  d.add_argument('--images', type=int, default=0,
                 help='at most this many images of each set (default 0: 1000 Imagenette, '
                      '10000 CIFAR, every DAVIS frame)')
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
  t.add_argument('--profile', default=None, metavar='DIR',
                 help='write a jax.profiler trace of --profile-steps more steps to DIR')
  t.add_argument('--profile-steps', type=int, default=3)
  args = parser.parse_args(argv)
  from dino_jax.errors import DinoJaxError  # pylint: disable=import-outside-toplevel
  try:
    {'augment': bench_augment, 'step': bench_train, 'data': bench_data,
     'train': bench_train}[args.what](args)
  except DinoJaxError as e:  # a bad config field or data source: one line, as in main.py
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
