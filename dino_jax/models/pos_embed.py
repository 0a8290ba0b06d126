"""Positional-embedding resizing as the official models do it: PyTorch's bicubic (A=-0.75,
border clamp, the +0.1 scale offset of DINO v1 / DINOv2) or its antialiased bicubic (DINOv2
register models), written as two small resampling matrices; the same matrices (and the
bilinear one) resize the Gram teacher's feature maps (objective.gram_targets)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
  """(out_size, in_size) matrix of torch F.interpolate(mode='bicubic', align_corners=False).

  With an explicit scale_factor torch samples src = (dst + 0.5) / scale_factor - 0.5 and uses
  the cubic convolution kernel with A = -0.75, clamping indices at the border, no antialias.
  """
  a = -0.75

  def kernel(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

  m = np.zeros((out_size, in_size), np.float64)
  for dst in range(out_size):
    src = (dst + 0.5) / scale_factor - 0.5
    base = math.floor(src)
    frac = src - base
    for k in range(-1, 3):
      idx = min(max(base + k, 0), in_size - 1)
      m[dst, idx] += kernel(frac - k)
  return m


def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of torch F.interpolate(size=out_size, mode='bilinear',
  align_corners=False) along one axis: src = (dst + 0.5) * in / out - 0.5, clamped at 0 as
  torch does for the linear modes."""
  m = np.zeros((out_size, in_size), np.float64)
  for dst in range(out_size):
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = min(int(np.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    frac = src - i0
    m[dst, i0] += 1 - frac
    m[dst, i1] += frac
  return m


def torch_bicubic_aa_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
  """(out_size, in_size) matrix of torch F.interpolate(mode='bicubic', antialias=True).

  PyTorch's antialiased path follows PIL: the cubic kernel with A = -0.5, widened by the
  downscale factor s = 1/scale_factor when s > 1, truncated at the border and renormalised.
  Weights are computed in float32, as PyTorch does for float32 inputs (parity to ~1e-7).
  """
  f = np.float32
  a = f(-0.5)

  def kernel(t):
    t = np.abs(t).astype(f)
    return np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, f(0))).astype(f)

  scale = f(1.0 / scale_factor)
  support = f(2.0) * max(scale, f(1.0))
  inv = f(1.0) / scale if scale >= 1.0 else f(1.0)
  m = np.zeros((out_size, in_size), f)
  for dst in range(out_size):
    center = scale * (f(dst) + f(0.5))
    lo = max(int(center - support + f(0.5)), 0)
    hi = min(int(center + support + f(0.5)), in_size)
    wts = kernel((np.arange(lo, hi).astype(f) - center + f(0.5)) * inv)
    total = f(0)
    for w in wts:  # sequential float32 sum, as torch
      total = f(total + w)
    m[dst, lo:hi] = wts / total if total != 0 else wts
  return m


def interpolate_pos_embed(pos_patch: jax.Array, h: int, w: int, offset: float = 0.1,
                          antialias: bool = False) -> jax.Array:
  """Resize (1, S*S, D) patch pos-embeds to an h x w grid as the official code does.

  offset > 0: torch scale_factor (n + offset) / S (DINO v1, DINOv2 without registers);
  offset 0: an explicit output size, scale n / S. antialias: DINOv2 register models.
  """
  n = pos_patch.shape[1]
  s = int(math.isqrt(n))
  if s * s != n:
    raise ValueError(f'pos_embed holds {n} patch positions, not a square grid')
  if h == s and w == s:
    return pos_patch
  matrix = torch_bicubic_aa_matrix if antialias else torch_bicubic_matrix
  my = matrix(s, h, (h + offset) / s)
  mx = matrix(s, w, (w + offset) / s)
  grid = pos_patch.reshape(s, s, -1)
  out = jnp.einsum('ys,xt,std->yxd', jnp.asarray(my, jnp.float32), jnp.asarray(mx, jnp.float32),
                   grid.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(1, h * w, -1).astype(pos_patch.dtype)
