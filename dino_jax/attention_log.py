"""The training loop's attention log: the teacher's CLS attention maps of a few fixed images
written to TensorBoard at every eval. It reads the loop's Run and MetricWriter; the maps and
grids themselves come from evaluators/attention.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax.data.pipeline import try_canvas
from dino_jax.evaluators import attention


def log_to_tensorboard(tb, fn, params, canvas, hw, step: int, *, mass: float, patch: int):
  """Write the attention grid of a few fixed images to TensorBoard (tb None: compute only,
  as every process must join the jitted call)."""
  views, attn = jax.device_get(fn(params, canvas, hw))
  if tb is None:
    return None
  scale = max(1, 96 // views.shape[1])
  grid = attention.summary_grid(views, attn, mass, patch, scale)
  tb.add_image('attention/teacher', grid, int(step), dataformats='HWC')
  tb.flush()
  return grid


def tensorboard_logger(run, writer):
  """f(teacher_params, step) that logs the teacher's attention maps of the first
  `config.attention_images` test images (train images without a test split) to TensorBoard;
  None when that is 0. Every process computes; process 0 writes."""
  c = run.config
  n = c.get('attention_images', 0)
  source = run.test_source if run.test_source is not None else run.train_source
  if not n:
    return None
  pairs = []  # the first n readable images (any source: arrays, files, records)
  for i in range(len(source)):
    record, _ = try_canvas(lambda i=i: source[i], c.data.canvas_size)
    if record is not None:
      pairs.append((record['image'], record['hw']))
    if len(pairs) == n:
      break
  if not pairs:
    return None
  canvas, hw = (np.stack(x) for x in zip(*pairs))
  fn = attention.make_attention_fn(run.teacher_def, size=c.crops.global_size,
                                   crop_fraction=c.crops.eval_crop_fraction,
                                   dtype=jnp.dtype(c.dtype))
  tb = writer.tb if writer.active else None
  return lambda params, step: log_to_tensorboard(tb, fn, params, canvas, hw, step,
                                                 mass=0.6, patch=c.model.patch_size)
