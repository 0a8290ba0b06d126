"""DINO multi-crop augmentation as pure JAX functions of (key, image), vmapped over the batch.

Input is a batch of uint8 canvases (B, S, S, 3) with the valid height/width of each image
(the host resized every image, preserving aspect, into the canvas's top-left corner). Every
crop is cut from the valid region on device, inside the jitted train step:

  random-resized-crop (torchvision's law) -> flip -> colour jitter (random op order)
  -> grayscale -> Gaussian blur -> solarize -> normalise

Per-crop probabilities follow the official DINO table (global 1: blur 1.0; global 2: blur 0.1,
solarize 0.2; locals: blur 0.5). Output: global crops and local crops, crop-major.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma, as PIL 'L'


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


# Crop settings of the two official pipelines, as config.crops fields. DINOv2's blur
# probabilities are the effective ones (its wrapper passes 1 - p to RandomApply, so the
# released models saw: global 1 never, global 2 0.9, locals 0.5), with torchvision's 9-tap
# kernel. Use: config.crops.update(augment.PRESETS['dinov2']).
PRESETS = {
    'dino': dict(global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), global1_blur_p=1.0,
                 global2_blur_p=0.1, global2_solarize_p=0.2, local_blur_p=0.5,
                 blur_sigma=(0.1, 2.0), blur_radius=0),
    'dinov2': dict(global_scale=(0.32, 1.0), local_scale=(0.05, 0.32), global1_blur_p=0.0,
                   global2_blur_p=0.9, global2_solarize_p=0.2, local_blur_p=0.5,
                   blur_sigma=(0.1, 2.0), blur_radius=4),
}


# ----------------------------------------------------------------------------- geometry


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


def normalize(img, dtype=jnp.float32):
  return ((img - MEAN) / STD).astype(dtype)


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


# ----------------------------------------------------------------------------- look at crops


def crop_grid(images: np.ndarray, hw: np.ndarray, cfg: AugmentConfig, seed: int = 0,
              cell: int = 96) -> np.ndarray:
  """uint8 picture: one row per image, [canvas | global crops | local crops], each cell
  resized (nearest) to cell x cell."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  g, l = jax.jit(lambda k, c, s: multicrop(k, c, s, cfg))(jax.random.PRNGKey(seed), images, hw)
  views = [np.asarray(v) for v in (g, l) if v is not None]
  b = images.shape[0]
  denorm = lambda x: np.clip((x * STD + MEAN) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  up = lambda x: np.asarray(Image.fromarray(x).resize((cell, cell), Image.NEAREST))
  rows = []
  for i in range(b):
    cells = [up(images[i][:hw[i][0], :hw[i][1]])]
    for v in views:
      n = v.shape[0] // b
      cells += [up(denorm(v[c * b + i])) for c in range(n)]
    rows.append(np.concatenate(cells, axis=1))
  return np.concatenate(rows, axis=0)


def _main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from dino_jax import data  # pylint: disable=import-outside-toplevel
  config = flags.FLAGS.config
  train, _ = data.load(config.data.source)
  n = min(flags.FLAGS.n, len(train))
  batch = next(iter(data.eval_batches(train, canvas_size=config.data.canvas_size,
                                      batch_size=n)))
  grid = crop_grid(batch['image'], batch['hw'], AugmentConfig.from_config(config),
                   seed=flags.FLAGS.seed)
  Image.fromarray(grid).save(flags.FLAGS.out)
  print(f'wrote {flags.FLAGS.out}: {n} rows of [image, 2 global crops, '
        f'{config.crops.n_local} local crops]')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=ungrouped-imports
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Path to a config file.')
  flags.DEFINE_string('out', 'crops.png', 'Where to write the PNG grid.')
  flags.DEFINE_integer('n', 8, 'How many images (rows).')
  flags.DEFINE_integer('seed', 0, 'Augmentation seed.')
  flags.mark_flags_as_required(['config'])
  app.run(_main)
