"""grain pipelines: images -> fixed uint8 canvases (+ valid h, w) -> per-process batches.

Training order is a pure function of (seed, step): batch i of this process is element i of a
grain MapDataset (shard -> shuffle -> canvas -> batch, reshuffled each epoch), so a resumed run
continues exactly where it stopped by starting at its step.
"""
from __future__ import annotations

from typing import Iterator

import grain
import numpy as np
from PIL import Image

from dino_jax.data.sources import Source


def to_canvas(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Resize (aspect kept, bicubic) so the longer side is `size`; paste top-left into a
  size x size uint8 canvas, edge-replicated beyond the image. Returns (canvas, [h, w])."""
  h, w = image.shape[:2]
  s = size / max(h, w)
  nh, nw = max(1, round(h * s)), max(1, round(w * s))
  if (nh, nw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
  canvas = np.pad(image, ((0, size - nh), (0, size - nw), (0, 0)), mode='edge')
  return canvas, np.array([nh, nw], np.int32)


class ToCanvas(grain.transforms.Map):

  def __init__(self, size: int):
    self.size = size

  def map(self, record: dict) -> dict:
    canvas, hw = to_canvas(record['image'], self.size)
    return {'image': canvas, 'hw': hw, 'label': np.int32(record['label'])}


def steps_per_epoch(n_images: int, global_batch: int) -> int:
  """Full global batches in one pass over the data (the official drop_last=True)."""
  return n_images // global_batch


def check_size(n_images: int, global_batch: int) -> None:
  if n_images < global_batch:
    raise ValueError(f'the dataset has {n_images} images, fewer than one global batch '
                     f'(config.batch_size={global_batch})')


def train_dataset(source: Source, *, canvas_size: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Infinite MapDataset of this process's batches; element i is batch i."""
  check_size(len(source), global_batch)
  local_batch = global_batch // process_count
  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]  # each process reads only its shard
  ds = ds.seed(seed).shuffle()
  ds = ds.map(ToCanvas(canvas_size))
  return ds.batch(local_batch, drop_remainder=True).repeat(None)


def train_iterator(source: Source, *, canvas_size: int, global_batch: int, seed: int,
                   start_step: int = 0, worker_count: int = 0, prefetch: int = 2,
                   process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  ds = train_dataset(source, canvas_size=canvas_size, global_batch=global_batch, seed=seed,
                     process_index=process_index, process_count=process_count)
  ds = ds[start_step:]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch),
                                            prefetch_buffer_size=max(1, prefetch)))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it)


def eval_batches(source: Source, *, canvas_size: int, batch_size: int,
                 limit: int = 0, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Every image once, in order, padded to full batches; 'mask' marks real rows."""
  n = len(source) if not limit else min(limit, len(source))
  ds = grain.MapDataset.source(source)[:n][process_index::process_count].map(
      ToCanvas(canvas_size))
  for start in range(0, len(ds), batch_size):
    rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
    mask = np.zeros(batch_size, bool)
    mask[:len(rows)] = True
    rows += [rows[-1]] * (batch_size - len(rows))
    yield {'image': np.stack([r['image'] for r in rows]), 'hw': np.stack([r['hw'] for r in rows]),
           'label': np.stack([r['label'] for r in rows]), 'mask': mask}
