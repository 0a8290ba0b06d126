"""iBOT / DINOv2 block masks, generated inside the jitted step with static shapes.

The law (DINOv2's collate + MaskingGenerator): of the n global-crop images of a batch exactly
int(n * mask_probability) are masked; image i of those gets a ratio ~ U(r_i, r_{i+1}) with
r = linspace(lo, hi, n_masked + 1) and a target of int(N * ratio) patches; the rest get no
mask; which images are masked is a random permutation. A target is reached by adding
rectangles: area ~ U(min_block, min(remaining, max_block)), aspect ratio log-uniform in
[min_aspect, 1 / min_aspect], up to 10 tries for a rectangle that fits the grid and adds between
1 and `remaining` new patches; it stops at the target or when a rectangle adds nothing.

Since sum_i int(N * r_{i+1}) bounds the masked count of any batch, the masked tokens fit a
static buffer of that many rows (`upper_bound`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

TRIES = 10


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  grid: tuple[int, int]  # patches (rows, cols) of a global crop
  probability: float = 0.5  # fraction of the global-crop images that are masked
  ratio: tuple[float, float] = (0.1, 0.5)  # stratified range of the masked fraction
  min_block: int = 4  # patches
  max_block_fraction: float = 0.5  # of the grid
  min_aspect: float = 0.3

  @property
  def n_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  def n_masked_images(self, n_images: int) -> int:
    return int(n_images * self.probability)

  def ratio_edges(self, n_images: int) -> np.ndarray:
    return np.linspace(self.ratio[0], self.ratio[1], self.n_masked_images(n_images) + 1)

  def target_caps(self, n_images: int) -> np.ndarray:
    """int(N * r_{i+1}) per stratum: the most patches masked image i may target."""
    return np.array([int(self.n_patches * r) for r in self.ratio_edges(n_images)[1:]],
                    np.int32)

  def upper_bound(self, n_images: int) -> int:
    """Most masked patches a batch of n_images global crops can have (static buffer size)."""
    return int(self.target_caps(n_images).sum())


def _add_block(key, mask, remaining, spec: MaskSpec):
  """One rectangle of at most `remaining` new patches (DINOv2's 10 tries): (mask, added)."""
  h, w = spec.grid
  max_block = jnp.minimum(remaining, spec.max_block_fraction * spec.n_patches)
  k_area, k_aspect, k_top, k_left = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (TRIES,), minval=spec.min_block, maxval=max_block)
  log_lo = math.log(spec.min_aspect)
  aspect = jnp.exp(jax.random.uniform(k_aspect, (TRIES,), minval=log_lo, maxval=-log_lo))
  bh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  bw = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (bh < h) & (bw < w)
  # randint(0, h - bh) inclusive on both ends, as Python's random.randint
  top = jnp.floor(jax.random.uniform(k_top, (TRIES,)) * (h - bh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (TRIES,)) * (w - bw + 1)).astype(jnp.int32)
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  rect = ((rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None]) &
          (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None]))
  new = jnp.sum(rect & ~mask[None], axis=(1, 2))
  ok = fits & (new > 0) & (new <= max_block)
  first = jnp.argmax(ok)
  any_ok = ok[first]
  return jnp.where(any_ok, mask | rect[first], mask), jnp.where(any_ok, new[first], 0)


def block_mask(key: jax.Array, target: jax.Array, spec: MaskSpec) -> jax.Array:
  """(h, w) bool mask of at most `target` patches built from rectangles."""
  def cond(carry):
    _, count, stalled, _ = carry
    return (count < target) & ~stalled

  def body(carry):
    mask, count, _, k = carry
    k, sub = jax.random.split(k)
    mask, added = _add_block(sub, mask, target - count, spec)
    return mask, count + added, added == 0, k

  init = (jnp.zeros(spec.grid, bool), jnp.zeros([], jnp.int32), jnp.zeros([], bool), key)
  return jax.lax.while_loop(cond, body, init)[0]


def mask_targets(u: jax.Array, n_images: int, spec: MaskSpec) -> jax.Array:
  """Patches to mask per stratum, int(N * ratio) with ratio = r_i + u_i (r_{i+1} - r_i), for
  u in [0, 1): capped at `target_caps` so that float32 rounding of the ratio (which may land
  on or past r_{i+1}) can never exceed the static buffer of `upper_bound` rows."""
  edges = np.asarray(spec.ratio_edges(n_images), np.float32)
  return capped_targets(u, edges[:-1], edges[1:], spec.target_caps(n_images), spec.n_patches)


def capped_targets(u, lo, hi, caps, n_patches: int) -> jax.Array:
  """min(int(n_patches * (lo + u (hi - lo))), caps), elementwise in float32."""
  ratios = jnp.asarray(lo, jnp.float32) + u * (jnp.asarray(hi, jnp.float32) -
                                               jnp.asarray(lo, jnp.float32))
  return jnp.minimum((n_patches * ratios).astype(jnp.int32), jnp.asarray(caps, jnp.int32))


def batch_masks(key: jax.Array, n_images: int, spec: MaskSpec) -> jax.Array:
  """(n_images, N) bool masks for the global crops of a batch (crop-major rows)."""
  n_masked = spec.n_masked_images(n_images)
  k_ratio, k_perm, k_blocks = jax.random.split(key, 3)
  u = jax.random.uniform(k_ratio, (n_masked,))
  targets = jnp.concatenate([mask_targets(u, n_images, spec),
                             jnp.zeros(n_images - n_masked, jnp.int32)])
  targets = jax.random.permutation(k_perm, targets)
  keys = jax.random.split(k_blocks, n_images)
  masks = jax.vmap(lambda k, t: block_mask(k, t, spec))(keys, targets)
  return masks.reshape(n_images, spec.n_patches)


def gather_masked(masks: jax.Array, upper_bound: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Static-size view of the masked tokens of (n, N) masks.

  Returns (flat indices (upper_bound,) into n * N tokens, valid (upper_bound,) bool, weights
  (upper_bound,) = 1 / (masked count of the token's image), 0 for padding rows).
  """
  flat = masks.reshape(-1)
  idx = jnp.nonzero(flat, size=upper_bound, fill_value=0)[0]
  valid = jnp.arange(upper_bound) < jnp.sum(flat)
  per_image = jnp.sum(masks, axis=1)
  count = per_image[idx // masks.shape[1]]
  weights = jnp.where(valid, 1.0 / jnp.maximum(count, 1), 0.0)
  return idx, valid, weights
