"""Frozen features of a dataset: teacher (or any backbone) CLS after the final norm."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dino_jax import augment, sharding
from dino_jax.data import eval_batches
from dino_jax.models.head import l2_normalize


def make_feature_fn(model_def: nnx.GraphDef, *, size: int, crop_fraction: float, dtype):
  """jit((params, canvas, hw) -> L2-normalised CLS features, f32) for a DINO graphdef."""
  @jax.jit
  def features(params, canvas, hw):
    images = augment.center_view(canvas, hw, size, crop_fraction, dtype)
    cls = nnx.merge(model_def, params).backbone(images).cls
    return l2_normalize(cls.astype(jnp.float32))
  return features


def extract(feature_fn, params, source, *, mesh, canvas_size: int, batch_size: int,
            limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(features (N, D), labels (N,)) for the first `limit` images of `source` (0: all)."""
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev  # a multiple of the device count
  local = batch_size // jax.process_count()
  feats, labels = [], []
  for batch in eval_batches(source, canvas_size=canvas_size, batch_size=local, limit=limit,
                            process_index=jax.process_index(),
                            process_count=jax.process_count()):
    g = sharding.to_global({'image': batch['image'], 'hw': batch['hw']}, mesh)
    f = feature_fn(params, g['image'], g['hw'])
    f = multihost_utils.process_allgather(f, tiled=True)
    mask = multihost_utils.process_allgather(batch['mask'], tiled=True)
    lab = multihost_utils.process_allgather(batch['label'], tiled=True)
    feats.append(np.asarray(f)[mask])
    labels.append(np.asarray(lab)[mask])
  return np.concatenate(feats), np.concatenate(labels)
