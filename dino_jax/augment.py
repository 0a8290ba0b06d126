"""DINO multi-crop augmentation as pure JAX functions of (key, image), vmapped over the batch.

Input is a batch of uint8 canvases (B, S, S, 3) with the valid height/width of each image
(the host resized every image, preserving aspect, into the canvas's top-left corner). Every
crop is cut from the valid region on device, inside the jitted train step:

  random-resized-crop (torchvision's law) -> flip -> colour jitter (random op order)
  -> grayscale -> Gaussian blur -> solarize -> normalise

Per-crop probabilities follow the official DINO table (global 1: blur 1.0; global 2: blur 0.1,
solarize 0.2; locals: blur 0.5). Output: global crops and local crops, crop-major.

AugmentConfig (from config.crops) holds the crop specs and probabilities; the random ops here
(crop box draw, flip, colour jitter in a random order, the coin flips) compose the
deterministic image ops of image_ops.py, which the evaluators share. The crop settings of the
official pipelines are defaults.CROP_PRESETS; `python -m dino_jax.crop_grid` draws the crops a
config makes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dino_jax.image_ops import (adjust_hue, crop_box, gaussian_blur, grayscale, luma,
                                normalize, resized_crop, solarize)


@dataclasses.dataclass(frozen=True)
class CropSpec:
  size: int
  scale: tuple[float, float]
  blur_p: float
  solarize_p: float


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  global_crops: tuple[CropSpec, ...]
  local_crops: tuple[CropSpec, ...]
  flip_p: float = 0.5
  jitter_p: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_p: float = 0.2
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  blur_radius: int = 0  # kernel half-width; 0: ceil(3 * max sigma), PIL-like

  @classmethod
  def from_config(cls, config) -> 'AugmentConfig':
    c = config.crops
    g = lambda blur, sol: CropSpec(c.global_size, tuple(c.global_scale), blur, sol)
    local = CropSpec(c.local_size, tuple(c.local_scale), c.local_blur_p, 0.0)
    return cls(global_crops=(g(c.global1_blur_p, 0.0), g(c.global2_blur_p, c.global2_solarize_p)),
               local_crops=(local,) * c.n_local,
               flip_p=c.flip_p, jitter_p=c.jitter_p, brightness=c.brightness,
               contrast=c.contrast, saturation=c.saturation, hue=c.hue,
               grayscale_p=c.grayscale_p, blur_sigma=tuple(c.blur_sigma),
               blur_radius=c.blur_radius)


# ----------------------------------------------------------------------------- one view


def _jitter_slot(img, op, fb, fc, fs):
  """One of brightness (op 0), contrast (1), saturation (2) or nothing (3), written as the one
  map clip(a * img + b * gray(img) + c) so that a traced `op` costs a single pass."""
  gray = luma(img)
  a = jnp.select([op == 0, op == 1, op == 2], [fb, fc, fs], 1.0)
  b = jnp.where(op == 2, 1.0 - fs, 0.0)
  c = jnp.where(op == 1, (1.0 - fc) * jnp.mean(gray), 0.0)
  return jnp.clip(a * img + b * gray[..., None] + c, 0.0, 1.0)


def color_jitter(key, img, cfg: AugmentConfig):
  """Brightness, contrast, saturation and hue with factors ~ U, applied in a random order.

  The costly hue op runs exactly once: the cheap ops ranked before it run first (nothing in
  the slots of ops ranked after it), then hue, then those ranked after it.
  """
  kb, kc, ks, kh, kp = jax.random.split(key, 5)
  fb = jax.random.uniform(kb, minval=1 - cfg.brightness, maxval=1 + cfg.brightness)
  fc = jax.random.uniform(kc, minval=1 - cfg.contrast, maxval=1 + cfg.contrast)
  fs = jax.random.uniform(ks, minval=1 - cfg.saturation, maxval=1 + cfg.saturation)
  fh = jax.random.uniform(kh, minval=-cfg.hue, maxval=cfg.hue)
  order = jax.random.permutation(kp, 4)  # op ids: 0 brightness, 1 contrast, 2 saturation, 3 hue
  hue_pos = jnp.argmax(order == 3)
  for pos in range(3):
    img = _jitter_slot(img, jnp.where(pos < hue_pos, order[pos], 3), fb, fc, fs)
  img = adjust_hue(img, fh)
  for pos in range(1, 4):
    img = _jitter_slot(img, jnp.where(pos > hue_pos, order[pos], 3), fb, fc, fs)
  return img


def _view(key, canvas, hw, blur_p, solarize_p, *, size: int, scale, cfg: AugmentConfig,
          do_blur: bool, do_solarize: bool, dtype):
  """One augmented crop (size, size, 3) float32 in [0, 1] from a canvas of values in 0..255.
  blur_p and solarize_p may be traced (one value per crop of a vmapped group); do_blur and
  do_solarize say statically whether any crop of the group needs the op."""
  keys = jax.random.split(key, 9)
  box = crop_box(keys[0], hw[0], hw[1], scale)
  flip = jax.random.bernoulli(keys[1], cfg.flip_p)
  img = resized_crop(canvas, box, size, valid=hw, flip=flip, dtype=dtype) / 255.0
  img = jnp.clip(img, 0.0, 1.0)  # the cubic kernel overshoots; PIL clamps to uint8 range
  jittered = color_jitter(keys[2], img, cfg)
  img = jnp.where(jax.random.bernoulli(keys[3], cfg.jitter_p), jittered, img)
  img = jnp.where(jax.random.bernoulli(keys[4], cfg.grayscale_p), grayscale(img), img)
  if do_blur:
    sigma = jax.random.uniform(keys[5], minval=cfg.blur_sigma[0], maxval=cfg.blur_sigma[1])
    blurred = gaussian_blur(img, sigma, cfg.blur_sigma[1], cfg.blur_radius)
    img = jnp.where(jax.random.bernoulli(keys[6], blur_p), blurred, img)
  if do_solarize:
    img = jnp.where(jax.random.bernoulli(keys[7], solarize_p), solarize(img), img)
  return img


def view(key, canvas, hw, spec: CropSpec, cfg: AugmentConfig, dtype=jnp.float32):
  """One augmented crop (size, size, 3) float32 in [0, 1] from a uint8 canvas."""
  return _view(key, canvas, hw, spec.blur_p, spec.solarize_p, size=spec.size, scale=spec.scale,
               cfg=cfg, do_blur=spec.blur_p > 0, do_solarize=spec.solarize_p > 0,
               dtype=dtype)


def _resample_dtype(dtype):
  """Matrix products in 16-bit floats when the crops are wanted in them, else float32."""
  return dtype if jnp.dtype(dtype).itemsize == 2 else jnp.float32


def crops(key, canvas, hw, specs: tuple[CropSpec, ...], cfg: AugmentConfig, dtype):
  """len(specs) * B crops, crop-major, normalised, in `dtype`.

  Crops that share size and scale (e.g. all local crops) form one group, vmapped over
  (crop, image) with the canvas shared along the crop axis, so each image's canvas feeds one
  large matrix product per group; their blur and solarize probabilities travel as arrays.
  """
  b = canvas.shape[0]
  canvas = canvas.astype(_resample_dtype(dtype))  # exact: bfloat16 holds 0..255
  out, first = [], 0
  while first < len(specs):
    spec = specs[first]
    n = next((i for i in range(first, len(specs)) if (specs[i].size, specs[i].scale) !=
              (spec.size, spec.scale)), len(specs)) - first
    group = specs[first:first + n]
    keys = jnp.stack([jax.random.split(jax.random.fold_in(key, c), b)
                      for c in range(first, first + n)])
    blur_p = jnp.array([s.blur_p for s in group], jnp.float32)
    sol_p = jnp.array([s.solarize_p for s in group], jnp.float32)
    one = lambda k, c, s, bp, sp: _view(
        k, c, s, bp, sp, size=spec.size, scale=spec.scale, cfg=cfg,
        do_blur=any(g.blur_p > 0 for g in group),
        do_solarize=any(g.solarize_p > 0 for g in group), dtype=canvas.dtype)
    per_image = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    imgs = jax.vmap(per_image, in_axes=(0, None, None, 0, 0))(keys, canvas, hw, blur_p, sol_p)
    out.append(normalize(imgs.reshape((n * b,) + imgs.shape[2:]), dtype))
    first += n
  return jnp.concatenate(out, axis=0)


def multicrop(key, canvas, hw, cfg: AugmentConfig, dtype=jnp.float32):
  """(global crops (n_global*B, G, G, 3), local crops (n_local*B, L, L, 3) or None)."""
  k_global, k_local = jax.random.split(key)
  g = crops(k_global, canvas, hw, cfg.global_crops, cfg, dtype)
  l = crops(k_local, canvas, hw, cfg.local_crops, cfg, dtype) if cfg.local_crops else None
  return g, l


def gram_teacher_crops(key, canvas, hw, cfg: AugmentConfig, size: int, dtype=jnp.float32):
  """DINOv3's Gram teacher crops (n_global*B, size, size, 3): the same boxes and flips as the
  global crops `multicrop(key, ...)` draws (the same keys), resized to `size`, normalised, with
  no colour or blur op (crops.gram_teacher_no_distortions of the official configs)."""
  k_global, _ = jax.random.split(key)
  b = canvas.shape[0]
  canvas = canvas.astype(_resample_dtype(dtype))

  def one(k, c, s, scale):
    keys = jax.random.split(k, 9)  # as _view: the box from keys[0], the flip from keys[1]
    box = crop_box(keys[0], s[0], s[1], scale)
    flip = jax.random.bernoulli(keys[1], cfg.flip_p)
    img = resized_crop(c, box, size, valid=s, flip=flip, dtype=canvas.dtype) / 255.0
    return jnp.clip(img, 0.0, 1.0)

  out = []
  for c, spec in enumerate(cfg.global_crops):
    keys = jax.random.split(jax.random.fold_in(k_global, c), b)
    imgs = jax.vmap(lambda k, x, s, scale=spec.scale: one(k, x, s, scale))(keys, canvas, hw)
    out.append(normalize(imgs, dtype))
  return jnp.concatenate(out, axis=0)
