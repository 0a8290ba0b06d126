"""Frozen features of a dataset from a DINO network or a bare ViT backbone.

Kinds (the official evaluations):
  cls          CLS after the final norm, L2-normalised (k-NN)
  cls4         the last 4 blocks' CLS (each after the final norm) concatenated (ViT-S linear)
  cls_avgpool  CLS and the mean of the patch tokens, interleaved per dimension as the
               official code lays them out (ViT-B linear; official linear weights fit as is)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dino_jax import image_ops, sharding
from dino_jax.data import eval_batches
from dino_jax.models.head import l2_normalize


def backbone_features(backbone, images, kind: str = 'cls') -> jax.Array:
  """(B, dim) float32 features of normalised images for one of the kinds above."""
  if kind == 'cls':
    return l2_normalize(backbone(images).cls.astype(jnp.float32))
  if kind == 'cls4':
    out = backbone(images, n_last=4)
    return jnp.concatenate([x[:, 0] for x in out.intermediates], -1).astype(jnp.float32)
  if kind == 'cls_avgpool':
    out = backbone(images)
    pair = jnp.stack([out.cls, jnp.mean(out.patches, axis=1)], axis=-1)  # (B, D, 2)
    return pair.reshape(pair.shape[0], -1).astype(jnp.float32)
  raise ValueError(f'feature kind {kind!r}: choose one of {", ".join(KINDS)}')


KINDS = ('cls', 'cls4', 'cls_avgpool')


def _backbone(model):
  return model.backbone if hasattr(model, 'backbone') else model


def make_feature_fn(model_def: nnx.GraphDef, *, size: int, crop_fraction: float, dtype,
                    kind: str = 'cls'):
  """jit((params, canvas, hw) -> features, f32) of the evaluation view, for the graphdef of a
  DINO network or of a ViT backbone."""
  if kind not in KINDS:
    raise ValueError(f'feature kind {kind!r}: choose one of {", ".join(KINDS)}')

  @jax.jit
  def features(params, canvas, hw):
    images = image_ops.center_view(canvas, hw, size, crop_fraction, dtype)
    return backbone_features(_backbone(nnx.merge(model_def, params)), images, kind)
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
