"""DAVIS video object segmentation by label propagation on frozen patch features; J and F.

Protocol (the official DINO evaluation): each frame is resized so its short side is 480 and
its long side is floored to a multiple of 64, normalised (with the official code's red-channel
std of 0.228), and its last-block patch tokens (after the final norm) are L2-normalised. The
labels of frame t come from a context of the first frame (ground truth, downsampled to the
patch grid with nearest neighbour) and the soft predictions of the 7 previous frames: the
affinity exp(<f_t, f_src> / 0.1), restricted to a (2 * 12 + 1)^2-patch neighbourhood, keeps for
each target patch only the values at or above its 5th largest over all sources, is normalised
to sum 1 and carries the one-hot labels over. The soft labels are upsampled (bilinear, x patch
size), min-max normalised per object, argmaxed and resized (nearest) to the original size.

Scores follow the DAVIS-2017 semi-supervised benchmark: per object and frame, J is the region
IoU and F the boundary F-measure (boundary pixels matched within ceil(0.008 * image diagonal)
pixels); the first and last frames are left out; J and F are averaged over frames, then over
every object of every sequence; J&F is their mean.

Masks: DAVIS-2017 palette PNGs (pixel = object id, 255 = void) and DAVIS-2016 8-bit greyscale
PNGs ({0, 255}: one object, id 1 where > 127) are both read.
"""
from __future__ import annotations

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from scipy import ndimage

from dino_jax.evaluators import cli

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.228, 0.224, 0.225], np.float32)  # 0.228: the official script's value
N_LAST_FRAMES = 7
NEIGHBORHOOD = 12
TOPK = 5
TEMPERATURE = 0.1
BOUNDARY_TH = 0.008
VOID = 255


# ----------------------------------------------------------------------------- reading DAVIS


def read_mask(path: str) -> tuple[np.ndarray, list | None]:
  """(object ids (H, W) uint8, palette or None) of a DAVIS-2017 palette PNG or a DAVIS-2016
  greyscale PNG."""
  img = Image.open(path)
  if img.mode == 'P':
    return np.asarray(img, np.uint8), img.getpalette()
  if img.mode in ('L', '1'):
    return (np.asarray(img.convert('L')) > 127).astype(np.uint8), None
  raise ValueError(f'{path}: mask PNG of mode {img.mode}: expected a palette PNG (DAVIS-2017, '
                   f'object ids) or an 8-bit greyscale PNG (DAVIS-2016, 0/255)')


def list_sequence(root: str, sequence: str, resolution: str = '480p') -> tuple[list, list]:
  """(frame paths, annotation paths) of a sequence in the DAVIS layout, sorted by name.
  Annotations may cover only the first frame (as for a semi-supervised test set)."""
  fdir = os.path.join(root, 'JPEGImages', resolution, sequence)
  adir = os.path.join(root, 'Annotations', resolution, sequence)
  if not os.path.isdir(fdir):
    raise FileNotFoundError(f'no frames folder {fdir}')
  frames = sorted(os.path.join(fdir, f) for f in os.listdir(fdir)
                  if f.lower().endswith(('.jpg', '.jpeg', '.png')))
  if not frames:
    raise FileNotFoundError(f'{fdir} holds no frames')
  stems = [os.path.splitext(os.path.basename(f))[0] for f in frames]
  annots = [os.path.join(adir, s + '.png') for s in stems]
  if not os.path.exists(annots[0]):
    raise FileNotFoundError(f'the first frame has no annotation: {annots[0]} is missing')
  return frames, [a if os.path.exists(a) else None for a in annots]


def list_sequences(root: str, resolution: str = '480p') -> list[str]:
  fdir = os.path.join(root, 'JPEGImages', resolution)
  if not os.path.isdir(fdir):
    raise FileNotFoundError(f'{root} is not a DAVIS folder: {fdir} is missing')
  return sorted(d for d in os.listdir(fdir) if os.path.isdir(os.path.join(fdir, d)))


def frame_size(h: int, w: int, short: int = 480, multiple: int = 64) -> tuple[int, int]:
  """(height, width): short side -> `short`, long side scaled alike and floored to a multiple
  of `multiple` (the official frame size)."""
  long_side = int(max(h, w) * short / min(h, w) // multiple * multiple)
  if long_side < multiple:
    raise ValueError(f'a {h}x{w} frame at short side {short} has no long side that is a '
                     f'multiple of {multiple}: raise the short side')
  return (long_side, short) if h > w else (short, long_side)


def load_frame(path: str, size: tuple[int, int]) -> np.ndarray:
  """(H, W, 3) float32 normalised frame at size (height, width), bilinear."""
  img = Image.open(path).convert('RGB').resize((size[1], size[0]), Image.BILINEAR)
  return (np.asarray(img, np.float32) / 255.0 - MEAN) / STD


# ----------------------------------------------------------------------------- propagation


def neighborhood_mask(h: int, w: int, radius: int) -> np.ndarray:
  """(h*w, h*w) 1 where two patches are within `radius` rows and columns of each other."""
  ys, xs = np.divmod(np.arange(h * w), w)
  near = (np.abs(ys[:, None] - ys[None]) <= radius) & (np.abs(xs[:, None] - xs[None]) <= radius)
  return near.astype(np.float32)


@functools.partial(jax.jit, static_argnames=('topk',))
def propagate_step(feat_t, ctx_feats, ctx_labels, ctx_valid, near, *, topk: int,
                   temperature: float):
  """Soft labels (N, C) of a target frame.

  feat_t (N, D) and ctx_feats (M, N, D) L2-normalised patch features; ctx_labels (M, N, C);
  ctx_valid (M,) marks the context slots in use; near (N, N) the neighbourhood mask."""
  sims = jnp.einsum('mnd,td->mnt', ctx_feats, feat_t, precision=jax.lax.Precision.HIGHEST)
  aff = jnp.exp(sims / temperature) * near[None] * ctx_valid[:, None, None]
  aff = aff.reshape(-1, aff.shape[-1])  # (M * N sources, N targets)
  kth = jax.lax.top_k(aff.T, topk)[0][:, -1]  # the topk-th largest per target
  aff = jnp.where(aff >= kth[None], aff, 0.0)
  aff = aff / jnp.sum(aff, axis=0, keepdims=True)
  labels = ctx_labels.reshape(-1, ctx_labels.shape[-1])
  return jnp.einsum('st,sc->tc', aff, labels, precision=jax.lax.Precision.HIGHEST)


def propagate(feats: np.ndarray, first_labels: np.ndarray, grid: tuple[int, int], *,
              n_last: int = N_LAST_FRAMES, radius: int = NEIGHBORHOOD, topk: int = TOPK,
              temperature: float = TEMPERATURE) -> np.ndarray:
  """(T, N, C) soft labels of every frame from (T, N, D) normalised features and the first
  frame's (N, C) one-hot labels. Context of frame t: frame 0 and frames t-n_last .. t-1."""
  feats = np.asarray(feats, np.float32)
  first_labels = np.asarray(first_labels, np.float32)
  n_frames, n = feats.shape[:2]
  near = jnp.asarray(neighborhood_mask(*grid, radius))
  slots = 1 + n_last
  ctx_feats = np.zeros((slots,) + feats.shape[1:], np.float32)
  ctx_labels = np.zeros((slots, n, first_labels.shape[1]), np.float32)
  ctx_feats[0], ctx_labels[0] = feats[0], first_labels
  out = [first_labels]
  for t in range(1, n_frames):
    prev = list(range(max(1, t - n_last), t))
    valid = np.zeros(slots, np.float32)
    valid[:1 + len(prev)] = 1.0
    for i, s in enumerate(prev):
      ctx_feats[1 + i], ctx_labels[1 + i] = feats[s], out[s]
    soft = np.asarray(propagate_step(feats[t], ctx_feats, ctx_labels, valid, near,
                                     topk=min(topk, slots * n), temperature=temperature))
    out.append(soft)
  return np.stack(out)


def to_mask(soft: np.ndarray, grid: tuple[int, int], patch: int,
            out_size: tuple[int, int]) -> np.ndarray:
  """(N, C) soft labels -> (H, W) object ids: bilinear x patch upsample, per-object min-max,
  argmax, nearest resize to out_size (height, width)."""
  h, w = grid
  x = jnp.asarray(soft.reshape(h, w, -1))
  x = np.asarray(jax.image.resize(x, (h * patch, w * patch, x.shape[-1]), 'linear'))
  lo, hi = x.min((0, 1)), x.max((0, 1))
  x = np.where(hi > 0, (x - lo) / np.maximum(hi - lo, 1e-12), x)
  ids = np.argmax(x, axis=-1).astype(np.uint8)
  return np.asarray(Image.fromarray(ids).resize((out_size[1], out_size[0]), Image.NEAREST))


def one_hot_grid(mask: np.ndarray, grid: tuple[int, int], n_classes: int) -> np.ndarray:
  """(N, C) one-hot of a full-size id mask downsampled to the patch grid (nearest)."""
  small = np.asarray(Image.fromarray(mask).resize((grid[1], grid[0]), Image.NEAREST))
  small = np.where(small == VOID, 0, small)
  return np.eye(n_classes, dtype=np.float32)[small.reshape(-1)]


def segment_sequence(frames: list[np.ndarray], first_mask: np.ndarray, feature_fn, patch: int,
                     out_size: tuple[int, int], **kw) -> list[np.ndarray]:
  """Predicted id masks (out_size) for every frame. frames: preprocessed (H, W, 3) arrays;
  feature_fn(frame) -> (h*w, D) L2-normalised patch features; first_mask at out_size."""
  hh, ww = frames[0].shape[0] // patch, frames[0].shape[1] // patch
  feats = np.stack([np.asarray(feature_fn(f)) for f in frames])
  n_classes = int(np.where(first_mask == VOID, 0, first_mask).max()) + 1
  soft = propagate(feats, one_hot_grid(first_mask, (hh, ww), n_classes), (hh, ww), **kw)
  return [first_mask] + [to_mask(s, (hh, ww), patch, out_size) for s in soft[1:]]


# ----------------------------------------------------------------------------- J and F


def region_j(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
  """Jaccard index of two boolean masks; 1 when both are empty."""
  if void is not None:
    pred, gt = pred & ~void, gt & ~void
  union = np.sum(pred | gt)
  return 1.0 if union == 0 else float(np.sum(pred & gt) / union)


def boundary(mask: np.ndarray) -> np.ndarray:
  """Pixels whose right, lower or lower-right neighbour has the other value."""
  m = mask.astype(bool)
  b = np.zeros_like(m)
  b[:, :-1] |= m[:, :-1] != m[:, 1:]
  b[:-1, :] |= m[:-1, :] != m[1:, :]
  b[:-1, :-1] |= m[:-1, :-1] != m[1:, 1:]
  return b


def disk(radius: int) -> np.ndarray:
  y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  return x * x + y * y <= radius * radius


def boundary_f(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
               bound_th: float = BOUNDARY_TH) -> float:
  """Boundary F-measure; boundaries match within ceil(bound_th * diagonal) pixels."""
  if void is not None:
    pred, gt = pred & ~void, gt & ~void
  tol = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
  bp, bg = boundary(pred), boundary(gt)
  n_p, n_g = int(bp.sum()), int(bg.sum())
  if n_p == 0 and n_g == 0:
    return 1.0
  if n_p == 0 or n_g == 0:
    return 0.0
  se = disk(int(tol))
  precision = np.sum(bp & ndimage.binary_dilation(bg, se)) / n_p
  recall = np.sum(bg & ndimage.binary_dilation(bp, se)) / n_g
  return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def score_sequence(preds: list[np.ndarray], gts: list[np.ndarray | None]) -> dict:
  """{'J': [per object], 'F': [per object]} means over the annotated frames other than the
  first and the last (all annotated frames after the first when there are fewer than 3)."""
  objects = [o for o in np.unique(gts[0]) if o not in (0, VOID)]
  idx = [i for i, g in enumerate(gts) if g is not None and 0 < i < len(gts) - 1]
  if not idx:
    idx = [i for i, g in enumerate(gts) if g is not None and i > 0]
  if not idx:
    raise ValueError('scoring needs ground-truth masks beyond the first frame')
  j, f = [], []
  for o in objects:
    j.append(float(np.mean([region_j(preds[i] == o, gts[i] == o, gts[i] == VOID) for i in idx])))
    f.append(float(np.mean([boundary_f(preds[i] == o, gts[i] == o, gts[i] == VOID)
                            for i in idx])))
  return {'J': j, 'F': f}


def summarize(per_sequence: dict[str, dict]) -> dict:
  """J, F and J&F means over every object of every sequence."""
  j = [x for s in per_sequence.values() for x in s['J']]
  f = [x for s in per_sequence.values() for x in s['F']]
  jm, fm = float(np.mean(j)), float(np.mean(f))
  return {'J': jm, 'F': fm, 'J&F': (jm + fm) / 2}


def save_mask(path: str, mask: np.ndarray, palette: list | None) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if palette is None:
    Image.fromarray((mask > 0).astype(np.uint8) * 255, 'L').save(path)
  else:
    img = Image.fromarray(mask, 'P')
    img.putpalette(palette)
    img.save(path)


# python -m dino_jax.evaluate video

HELP = 'DAVIS label propagation, J and F'


def add_arguments(parser) -> None:
  parser.add_argument('--davis', required=True, help='DAVIS root (JPEGImages/, Annotations/)')
  parser.add_argument('--sequences', nargs='*', default=None)
  parser.add_argument('--resolution', default='480p')
  parser.add_argument('--short_side', type=int, default=480)
  parser.add_argument('--n_last', type=int, default=N_LAST_FRAMES)
  parser.add_argument('--neighborhood', type=int, default=NEIGHBORHOOD)
  parser.add_argument('--topk', type=int, default=TOPK)
  parser.add_argument('--temperature', type=float, default=TEMPERATURE)
  parser.add_argument('--out', default=None, help='write the predicted masks here')


def run(args) -> dict:
  backbone, _, what = cli.load(args)
  p = backbone.cfg.patch_size
  seqs = args.sequences or list_sequences(args.davis, args.resolution)
  graphdef, params = nnx.split(backbone)

  @jax.jit
  def feature_params(prm, x):
    out = nnx.merge(graphdef, prm)(x[None])
    f = out.patches[0].astype(jnp.float32)
    return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  feature = lambda x: feature_params(params, jnp.asarray(x, backbone.dtype))

  per_seq, copy_first = {}, {}
  t0 = time.time()
  for seq in seqs:
    frame_paths, annot_paths = list_sequence(args.davis, seq, args.resolution)
    first, palette = read_mask(annot_paths[0])
    h, w = first.shape
    size = frame_size(h, w, args.short_side)
    frames = [load_frame(f, size) for f in frame_paths]
    preds = segment_sequence(frames, first, feature, p, (h, w), n_last=args.n_last,
                             radius=args.neighborhood, topk=args.topk,
                             temperature=args.temperature)
    gts = [read_mask(a)[0] if a else None for a in annot_paths]
    per_seq[seq] = score_sequence(preds, gts)
    copy_first[seq] = score_sequence([first] * len(gts), gts)
    s = summarize({seq: per_seq[seq]})
    print(f'  {seq}: {len(frames)} frames at {size[0]}x{size[1]} '
          f'({size[0] // p}x{size[1] // p} patches): J {s["J"]:.3f} F {s["F"]:.3f} '
          f'J&F {s["J&F"]:.3f}', flush=True)
    if args.out:
      for path, m in zip(frame_paths, preds):
        stem = os.path.splitext(os.path.basename(path))[0]
        save_mask(os.path.join(args.out, seq, stem + '.png'), m, palette)
  res = summarize(per_seq)
  base = summarize(copy_first)
  print(f'DAVIS label propagation of {what} on {args.davis} ({len(seqs)} sequences, '
        f'{time.time() - t0:.1f} s): J {res["J"]:.3f} F {res["F"]:.3f} J&F {res["J&F"]:.3f}')
  print(f'  reference, the first mask copied to every frame: J {base["J"]:.3f} '
        f'F {base["F"]:.3f} J&F {base["J&F"]:.3f}')
  return {**res, 'copy_first': base, 'sequences': per_seq}
