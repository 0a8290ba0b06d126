"""Self-attention maps: last-block CLS -> patch attention per head, thresholded masks, PNGs.

The official visualisation: attention of the CLS token to every patch in the last block, one
map per head, on an image of any size (cropped to a multiple of the patch size). The masks
keep, per head, the most-attended patches that together hold a fraction `mass` (the paper's
0.6) of that head's attention: the smallest such set. Maps are shown upsampled by the patch
size with nearest neighbour. `make_attention_fn` and `summary_grid` give the maps of the
evaluation view and their grid, which the training loop's attention log (dino_jax/attention_log.py)
writes to TensorBoard.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from dino_jax import data, image_ops, inference
from dino_jax.evaluators import cli

# viridis at 0, 1/4, 1/2, 3/4, 1 (linearly interpolated in between)
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                     [253, 231, 37]], np.float64)
HEAD_COLORS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                        [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                        [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
                       np.float64)


def attention_maps(backbone, images) -> jax.Array:
  """(B, heads, h, w) float32 CLS attention of normalised NHWC images (h, w: patch grid)."""
  out = backbone(images, return_attention=True)
  p = backbone.cfg.patch_size
  b, hh, ww = images.shape[0], images.shape[1] // p, images.shape[2] // p
  attn = inference.cls_attention(out)
  return attn.reshape(b, attn.shape[1], hh, ww).astype(jnp.float32)


def threshold_masks(attn: np.ndarray, mass: float = 0.6) -> np.ndarray:
  """Boolean masks (same shape) keeping, per map (the last two axes), the smallest set of
  top patches whose attention holds at least `mass` of that map's total.

  A patch is kept when the mass of the patches ranked above it is still short of `mass`
  (1e-6 slack absorbs float rounding at exact boundaries). Ties are broken by position.
  """
  if not 0.0 < mass <= 1.0:
    raise ValueError(f'attention threshold mass={mass} is not in (0, 1]')
  a = np.asarray(attn, np.float64)
  lead, flat = a.shape[:-2], a.reshape(-1, a.shape[-2] * a.shape[-1])
  if np.any(flat < 0):
    raise ValueError('attention maps must be non-negative')
  p = flat / np.maximum(flat.sum(-1, keepdims=True), 1e-30)
  order = np.argsort(-p, axis=-1, kind='stable')
  sorted_p = np.take_along_axis(p, order, -1)
  before = np.cumsum(sorted_p, -1) - sorted_p
  keep_sorted = before < mass - 1e-6
  keep = np.zeros_like(keep_sorted)
  np.put_along_axis(keep, order, keep_sorted, -1)
  return keep.reshape(*lead, *a.shape[-2:])


def kept_mass(attn: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Fraction of each map's attention inside its mask."""
  a = np.asarray(attn, np.float64)
  return (a * masks).sum((-2, -1)) / a.sum((-2, -1))


def colorize(m: np.ndarray) -> np.ndarray:
  """(h, w) map -> (h, w, 3) uint8 viridis, min-max scaled."""
  m = np.asarray(m, np.float64)
  m = (m - m.min()) / max(m.max() - m.min(), 1e-12)
  x = m * (len(_ANCHORS) - 1)
  i = np.clip(np.floor(x).astype(int), 0, len(_ANCHORS) - 2)
  t = (x - i)[..., None]
  return np.round(_ANCHORS[i] * (1 - t) + _ANCHORS[i + 1] * t).astype(np.uint8)


def upsample(m: np.ndarray, factor: int) -> np.ndarray:
  return np.repeat(np.repeat(m, factor, axis=0), factor, axis=1)


def overlay(image: np.ndarray, masks: np.ndarray, factor: int) -> np.ndarray:
  """The image darkened outside every mask, each head's kept patches tinted in its colour."""
  img = image.astype(np.float64)
  tint = np.zeros_like(img)
  count = np.zeros(img.shape[:2] + (1,))
  for j, m in enumerate(masks):
    up = upsample(m, factor)[..., None].astype(np.float64)
    tint += up * HEAD_COLORS[j % len(HEAD_COLORS)]
    count += up
  any_mask = count > 0
  mixed = 0.5 * img + 0.5 * tint / np.maximum(count, 1)
  return np.round(np.where(any_mask, mixed, 0.35 * img)).astype(np.uint8)


def panels(image: np.ndarray, attn: np.ndarray, mass: float, factor: int) -> dict:
  """uint8 pictures of one image: 'image', 'head{j}' (per-head maps), 'mask{j}' (per-head
  overlay of the thresholded mask), 'overlay' (all heads) and 'grid' (one row of them all)."""
  masks = threshold_masks(attn, mass)
  out = {'image': image}
  for j, (a, m) in enumerate(zip(attn, masks)):
    out[f'head{j}'] = upsample(colorize(a), factor)
    out[f'mask{j}'] = overlay(image, m[None], factor)
  out['overlay'] = overlay(image, masks, factor)
  heads = [out[f'head{j}'] for j in range(len(attn))]
  sep = np.full((image.shape[0], 2, 3), 255, np.uint8)
  row = [image] + heads + [out['overlay']]
  out['grid'] = np.concatenate(sum(([r, sep] for r in row), [])[:-1], axis=1)
  return out


def write_pngs(out_dir: str, name: str, pictures: dict) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for key, pic in pictures.items():
    path = os.path.join(out_dir, f'{name}-{key}.png')
    Image.fromarray(pic).save(path)
    paths.append(path)
  return paths


def prepare(image: np.ndarray, size: tuple[int, int], patch: int) -> np.ndarray:
  """uint8 RGB image resized (bilinear) to size = (height, width), then cropped at the
  bottom/right to a multiple of the patch size, as the official script does."""
  h, w = size
  img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  return img[:h - h % patch, :w - w % patch]


def to_model_input(images_uint8: np.ndarray, dtype=jnp.float32) -> jax.Array:
  return image_ops.normalize(jnp.asarray(images_uint8, jnp.float32) / 255.0, dtype)


# ------------------------------------------------- the eval view and grids (for attention_log)


def make_attention_fn(model_def: nnx.GraphDef, *, size: int, crop_fraction: float, dtype):
  """jit((params, canvas, hw) -> (views in [0, 1], (B, heads, h, w) maps)) of the eval view,
  for the graphdef of a DINO network or of a ViT backbone."""
  @jax.jit
  def fn(params, canvas, hw):
    model = nnx.merge(model_def, params)
    backbone = model.backbone if hasattr(model, 'backbone') else model
    images = image_ops.center_view(canvas, hw, size, crop_fraction, dtype)
    views = image_ops.denormalize(images.astype(jnp.float32))
    return jnp.clip(views, 0.0, 1.0), attention_maps(backbone, images)
  return fn


def summary_grid(views: np.ndarray, attn: np.ndarray, mass: float, patch: int,
                 scale: int = 1) -> np.ndarray:
  """(H, W, 3) uint8: one row per image of [image | per-head maps | masks overlay]."""
  rows = []
  for v, a in zip(views, attn):
    img = np.round(np.asarray(v) * 255).astype(np.uint8)
    grid = panels(img, np.asarray(a), mass, patch)['grid']
    rows.append(upsample(grid, scale))
    rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
  return np.concatenate(rows[:-1], axis=0)


# python -m dino_jax.evaluate attention

HELP = 'attention-map PNGs'


def add_arguments(parser) -> None:
  parser.add_argument('--images', nargs='*', default=[], help='image files')
  parser.add_argument('--source', default=None, help='also draw images from this data source')
  parser.add_argument('--index', type=int, nargs='*', default=[0],
                      help='indices into --source')
  parser.add_argument('--image_size', type=int, nargs=2, default=[480, 480],
                      metavar=('H', 'W'), help='resize to H x W (official 480 x 480)')
  parser.add_argument('--threshold', type=float, default=0.6, help='attention mass kept')
  parser.add_argument('--scale', type=int, default=1, help='enlarge the PNGs (nearest)')
  parser.add_argument('--out', required=True, help='output folder')


def run(args) -> dict:
  backbone, _, what = cli.load(args)
  images = [(os.path.splitext(os.path.basename(p))[0], np.asarray(Image.open(p).convert('RGB')))
            for p in args.images]
  if args.source:
    train, test = data.load(args.source)
    src = test if test is not None else train
    images += [(f'{args.source.split(":")[-1].split("/")[-1].split(".")[0]}-{i}',
                src[i]['image']) for i in args.index]
  if not images:
    raise SystemExit('error: give --images and/or --source with --index')
  p = backbone.cfg.patch_size
  graphdef, params = nnx.split(backbone)
  fn = jax.jit(lambda prm, x: attention_maps(nnx.merge(graphdef, prm), x))
  written = []
  for name, img in images:
    x = prepare(img, tuple(args.image_size), p)
    attn = np.asarray(fn(params, to_model_input(x[None], backbone.dtype)))[0]
    pics = panels(x, attn, args.threshold, p)
    if args.scale > 1:
      pics = {k: upsample(v, args.scale) for k, v in pics.items()}
    written += write_pngs(args.out, name, pics)
    masks = threshold_masks(attn, args.threshold)
    mass = kept_mass(attn, masks)
    print(f'{name}: {attn.shape[0]} heads on a {attn.shape[1]}x{attn.shape[2]} patch grid; '
          f'masks keep {", ".join(f"{m:.3f}" for m in mass)} of the attention, '
          f'{", ".join(str(int(n)) for n in masks.sum((1, 2)))} patches')
  print(f'attention maps of {what}: wrote {len(written)} PNGs to {args.out}')
  return {'pngs': written}
