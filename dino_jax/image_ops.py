"""Image operations shared by the multi-crop augmentation (augment.py) and the evaluators: pure
JAX functions, each of one HWC image (vmap them over a batch) except center_view, which takes
the batch of canvases. Nothing here draws randomness but crop_box, from the key it is given.

  resampling     crop_box (torchvision RandomResizedCrop's box law), resample_matrix and
                 resized_crop (bicubic, antialiased, PIL's borders; two matrix products),
                 resized_crop_linear (bilinear, antialiased)
  colour         luma, grayscale, brightness / contrast / saturation / hue, solarize,
                 gaussian_blur (torchvision's definitions, images in [0, 1])
  normalisation  MEAN, STD (ImageNet), normalize, denormalize
  views          center_view: the evaluation view (centred square, resized, normalised)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma, as PIL 'L'


# ----------------------------------------------------------------------------- resampling


def crop_box(key, h, w, scale, ratio=(3 / 4, 4 / 3), attempts: int = 10):
  """torchvision RandomResizedCrop.get_params: (top, left, height, width), int32.

  Up to `attempts` draws of area ~ U(scale) * h * w and log-aspect ~ U(log ratio); the first
  that fits wins; otherwise the centre crop with the aspect clamped into `ratio`.
  """
  h = jnp.asarray(h, jnp.float32)
  w = jnp.asarray(w, jnp.float32)
  k_area, k_ratio, k_i, k_j = jax.random.split(key, 4)
  area = h * w * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (attempts,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)
  cw = jnp.round(jnp.sqrt(area * aspect))
  ch = jnp.round(jnp.sqrt(area / aspect))
  ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = jnp.argmax(ok)
  found = ok[first]
  ch, cw = ch[first], cw[first]
  top = jnp.floor(jax.random.uniform(k_i) * (h - ch + 1))
  left = jnp.floor(jax.random.uniform(k_j) * (w - cw + 1))
  # Fallback: whole image, aspect clamped into [ratio[0], ratio[1]], centred.
  in_ratio = w / h
  fw = jnp.where(in_ratio < ratio[0], w, jnp.where(in_ratio > ratio[1], jnp.round(h * ratio[1]), w))
  fh = jnp.where(in_ratio < ratio[0], jnp.round(w / ratio[0]), h)
  ftop = jnp.floor((h - fh) / 2)
  fleft = jnp.floor((w - fw) / 2)
  box = jnp.where(found, jnp.stack([top, left, ch, cw]), jnp.stack([ftop, fleft, fh, fw]))
  return box.astype(jnp.int32)


def _keys_cubic(x):
  """Keys' cubic convolution kernel with a = -0.5 (PIL's BICUBIC), for |x| < 2."""
  x = jnp.abs(x)
  near = (1.5 * x - 2.5) * x * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resample_matrix(start, length, valid, in_size: int, out_size: int):
  """(out_size, in_size) float32 matrix that resizes the interval [start, start + length) of a
  signal to out_size samples: bicubic, antialiased when shrinking (the kernel is stretched by
  length / out_size), with taps outside the valid signal [0, valid) dropped and the rest
  renormalised, as PIL does at image borders."""
  scale = out_size / length
  stretch = jnp.maximum(1.0 / scale, 1.0)
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / scale - 0.5
  taps = jnp.arange(in_size, dtype=jnp.float32)
  w = _keys_cubic((taps[None, :] - centres[:, None]) / stretch) * (taps < valid)[None, :]
  return w / jnp.sum(w, axis=1, keepdims=True)


def resized_crop(image, box, size: int, valid=None, flip=False, dtype=jnp.float32):
  """Crop `box` (top, left, height, width) from an HWC image and resize it to size x size
  (float32): two matrix products, bicubic and antialiased when shrinking. `valid` (h, w) bounds
  the real pixels (default: the whole array); `flip` mirrors the result horizontally for free
  (the column matrix's rows are reversed). The products run in `dtype` and accumulate in
  float32; in bfloat16 the uint8 inputs are exact but the weights and the intermediate rows are
  rounded: against float32 up to 1.3 levels of 255 off, which is the output's own bfloat16
  resolution. As PIL's resize(box=...), taps just outside the box (inside the image) count."""
  box = box.astype(jnp.float32)
  h, w = image.shape[:2]
  valid = jnp.array([h, w], jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
  my = resample_matrix(box[0], box[2], valid[0], h, size)
  mx = resample_matrix(box[1], box[3], valid[1], w, size)
  mx = jnp.where(flip, mx[::-1], mx)
  rows = jnp.einsum('yY,YXc->yXc', my.astype(dtype), image.astype(dtype),
                    preferred_element_type=jnp.float32)
  return jnp.einsum('xX,yXc->yxc', mx.astype(dtype), rows.astype(dtype),
                    preferred_element_type=jnp.float32)


def resized_crop_linear(image, box, size: int):
  """Crop `box` (top, left, height, width) from an HWC image in [0, 1] and resize it to
  size x size, bilinear and antialiased (as PIL's BILINEAR), clipped to [0, 1]."""
  box = box.astype(jnp.float32)
  scale = jnp.stack([size / box[2], size / box[3]])
  img = jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1), scale,
                                      -box[:2] * scale, method='linear', antialias=True)
  return jnp.clip(img, 0.0, 1.0)


# ----------------------------------------------------------------------------- colour ops
# All on float images in [0, 1], with torchvision's definitions.


# Luma inside the jitter slots is an elementwise sum: as a product with a 3-vector, XLA on
# GPUs hands each of the six K=3 products to a library call that cuts the fusions around it
# (measured on an H100: 11.6k -> 22k images/s for the whole multi-crop). grayscale() keeps the
# product on purpose: there it is the one boundary that stops XLA on CPUs from fusing the
# whole colour pipeline into every tap of the blur that follows (elementwise: 6x slower).


def luma(img):
  """(..., H, W) ITU-R 601-2 luma of (..., H, W, 3) RGB."""
  return img[..., 0] * GRAY[0] + img[..., 1] * GRAY[1] + img[..., 2] * GRAY[2]


def grayscale(img):
  return jnp.broadcast_to(img @ GRAY[:, None], img.shape)


def adjust_brightness(img, f):
  return jnp.clip(img * f, 0.0, 1.0)


def adjust_contrast(img, f):
  mean = jnp.mean(luma(img))
  return jnp.clip(f * img + (1 - f) * mean, 0.0, 1.0)


def adjust_saturation(img, f):
  return jnp.clip(f * img + (1 - f) * grayscale(img), 0.0, 1.0)


def rgb_to_hsv(img):
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc = jnp.max(img, axis=-1)
  minc = jnp.min(img, axis=-1)
  v = maxc
  delta = maxc - minc
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  safe = jnp.where(delta > 0, delta, 1.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return h, s, v


def hsv_to_rgb(h, s, v):
  """The piecewise-linear HSV -> RGB map in closed form: channel n in (R, G, B) = (5, 3, 1) is
  v - v * s * clip(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6."""
  k = (jnp.array([5.0, 3.0, 1.0]) + 6.0 * h[..., None]) % 6.0
  return v[..., None] - (v * s)[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(img, shift):
  h, s, v = rgb_to_hsv(img)
  return hsv_to_rgb((h + shift) % 1.0, s, v)


def solarize(img, threshold=128 / 255):
  return jnp.where(img >= threshold, 1.0 - img, img)


def gaussian_blur(img, sigma, max_sigma: float = 2.0, radius: int = 0):
  """Separable Gaussian blur with edge-replicating borders: 2 * radius + 1 shifted
  multiply-adds per axis (fused elementwise work on CPU, GPU and TPU alike).

  radius 0 takes ceil(3 * max_sigma), close to PIL's GaussianBlur; torchvision's fixed
  kernel_size=9 (DINOv2) is radius 4.
  """
  hgt, wid = img.shape[:2]
  radius = min(radius or int(math.ceil(3 * max_sigma)), max(hgt, wid) - 1)
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  weights = weights / jnp.sum(weights)
  for axis, n in ((0, hgt), (1, wid)):
    pad = [(0, 0)] * img.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(img, pad, mode='edge')
    img = sum(weights[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
              for i in range(2 * radius + 1))
  return img


# ----------------------------------------------------------------------------- normalisation


def normalize(img, dtype=jnp.float32):
  return ((img - MEAN) / STD).astype(dtype)


def denormalize(img):
  """The inverse of normalize (float32 values, [0, 1] up to rounding)."""
  return img * STD + MEAN


# ----------------------------------------------------------------------------- views


def center_view(canvas, hw, size: int, crop_fraction: float = 1.0, dtype=jnp.float32):
  """Evaluation view: the centred square of side crop_fraction * min(h, w), resized, normalised.

  crop_fraction 0.875 is the official Resize(256) + CenterCrop(224).
  """
  def one(c, s):
    side = jnp.floor(jnp.minimum(s[0], s[1]) * crop_fraction)
    top = jnp.floor((s[0] - side) / 2)
    left = jnp.floor((s[1] - side) / 2)
    img = resized_crop(c, jnp.stack([top, left, side, side]), size, valid=s) / 255.0
    return jnp.clip(img, 0.0, 1.0)
  return normalize(jax.vmap(one)(canvas, hw), dtype)
