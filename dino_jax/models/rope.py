"""Axial rotary position embedding (RoPE) of patch tokens, as the DINOv3 ViT uses it.

Pure functions; no parameters (the periods are constants of the config, a buffer in the
official model, never trained). For a crop of gh x gw patches:

- coordinates: patch centres (i + 0.5) / n per axis, mapped from [0, 1] to [-1, 1] by 2c - 1,
  where n is the axis's own length ('separate', DINOv3's setting), the longer one ('max') or
  the shorter one ('min'); rows are the first coordinate, columns the second, row-major order.
- training-time augmentations (only with a key; none at eval), in this order, one draw per
  call shared by every image of the call: `shift` adds u ~ U[-shift, shift] per axis; `jitter`
  multiplies each axis by its own exp(U[-ln jitter, ln jitter]); `rescale` multiplies both
  axes by one exp(U[-ln rescale, ln rescale]). 0 turns one off.
- periods: D_head / 4 of them, base ** (4 j / D_head) for j < D_head / 4 (DINOv3: base 100),
  or geometric from min_period to max_period (both ends included) when both are given.
- angles: 2 pi * coordinate / period, the rows' D_head / 4 angles then the columns', that half
  repeated twice over the head dimension; a head vector x = [x1 | x2] (two halves) becomes
  x cos + [-x2 | x1] sin, i.e. channel j and j + D_head / 2 rotate together by angle j.

`tables` gives (sin, cos) of shape (prefix + gh * gw, D_head) with identity rows (sin 0,
cos 1) for the `prefix` CLS and storage tokens, so `apply` leaves those untouched; the
rotation runs in float32 and returns the input dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZE = ('separate', 'max', 'min')


class Spec(NamedTuple):
  """The RoPE settings of a ViT (ViTConfig.rope_spec). 0 turns an augmentation off; both
  periods > 0 replace `base`."""
  base: float = 100.0
  min_period: float = 0.0
  max_period: float = 0.0
  normalize: str = 'separate'
  shift: float = 0.0
  jitter: float = 0.0
  rescale: float = 0.0

  @property
  def augments(self) -> bool:
    return bool(self.shift or self.jitter or self.rescale)


def periods(head_dim: int, spec: Spec) -> np.ndarray:
  """(head_dim // 4,) float32 periods."""
  if head_dim % 4:
    raise ValueError(f'RoPE needs a head dimension divisible by 4, got {head_dim}')
  n = head_dim // 4
  if spec.min_period > 0 and spec.max_period > 0:
    ratio = spec.max_period / spec.min_period
    out = spec.max_period * ratio ** (np.linspace(0.0, 1.0, n) - 1.0)
  else:
    out = spec.base ** (2.0 * np.arange(n) / (head_dim // 2))
  return out.astype(np.float32)


def coords(gh: int, gw: int, normalize: str = 'separate') -> np.ndarray:
  """(gh * gw, 2) float32 (row, column) patch coordinates, row-major."""
  if normalize not in NORMALIZE:
    raise ValueError(f'unknown RoPE normalize {normalize!r}; choose one of {NORMALIZE}')
  dh, dw = {'separate': (gh, gw), 'max': (max(gh, gw),) * 2,
            'min': (min(gh, gw),) * 2}[normalize]
  ch = (np.arange(gh) + 0.5) / dh
  cw = (np.arange(gw) + 0.5) / dw
  grid = np.stack(np.meshgrid(ch, cw, indexing='ij'), axis=-1).reshape(-1, 2)
  return (2.0 * grid - 1.0).astype(np.float32)


def augment(c: jax.Array, spec: Spec, key: jax.Array) -> jax.Array:
  """The training-time shift, jitter and rescale of (N, 2) coordinates (one draw each)."""
  k_shift, k_jitter, k_rescale = jax.random.split(key, 3)
  if spec.shift:
    c = c + jax.random.uniform(k_shift, (2,), jnp.float32, -spec.shift, spec.shift)
  if spec.jitter:
    lim = math.log(spec.jitter)
    c = c * jnp.exp(jax.random.uniform(k_jitter, (2,), jnp.float32, -lim, lim))
  if spec.rescale:
    lim = math.log(spec.rescale)
    c = c * jnp.exp(jax.random.uniform(k_rescale, (1,), jnp.float32, -lim, lim))
  return c


def sincos(c: jax.Array, period: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(sin, cos) of the angles of (N, 2) coordinates, each (N, 4 * len(period)) float32."""
  angles = 2 * math.pi * c[:, :, None] / jnp.asarray(period)[None, None, :]  # (N, 2, D/4)
  angles = angles.reshape(c.shape[0], -1)  # rows' angles, then columns'
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.sin(angles), jnp.cos(angles)


def tables(spec: Spec, gh: int, gw: int, prefix: int, head_dim: int,
           key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sin, cos), each (prefix + gh * gw, head_dim) float32, for tokens [prefix, patches]:
  identity rows for the prefix; `key` draws the augmentations (None: eval, none)."""
  c = jnp.asarray(coords(gh, gw, spec.normalize))
  if key is not None and spec.augments:
    c = augment(c, spec, key)
  sin, cos = sincos(c, periods(head_dim, spec))
  if prefix:
    sin = jnp.concatenate([jnp.zeros((prefix, head_dim), jnp.float32), sin])
    cos = jnp.concatenate([jnp.ones((prefix, head_dim), jnp.float32), cos])
  return sin, cos


def rotate_half(x: jax.Array) -> jax.Array:
  """[x1 | x2] -> [-x2 | x1] over the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotate (B, N, H, D) queries or keys by (N, D) tables, in float32; returns x's dtype."""
  xf = x.astype(jnp.float32)
  sin, cos = sin[None, :, None, :], cos[None, :, None, :]
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
