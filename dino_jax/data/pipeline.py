"""grain pipelines: records -> fixed uint8 canvases (+ valid h, w) -> per-process batches.

Training order is a pure function of (seed, step). The data form one stream: epoch after
epoch of a seeded global permutation (reshuffled every epoch). Global batch s is stream
elements [s * B, (s + 1) * B); process p of P reads only the elements p, p + P, p + 2P, ...,
so a run on P processes trains on the same global batches as one process would, and each
host decodes only its share. Epochs are counted as the official code does (steps_per_epoch:
full global batches per pass), while the stream runs on across epoch boundaries.

A record that cannot be read or decoded is replaced by the next readable element of this
process's stream; the replaced element carries the bad record's path and reason in its
'skipped' field, which TrainIterator pops, counts and logs.
"""
from __future__ import annotations

import concurrent.futures
from typing import Iterator

import grain
import numpy as np
from absl import logging
from PIL import Image

from dino_jax import paths
from dino_jax.data.base import DataError, Source
from dino_jax.data.decode import BadImage, decode
from dino_jax.data.sources import as_rgb


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


def record_image(record: dict, size: int) -> np.ndarray:
  """uint8 RGB of any source record (decoded array, file bytes or a path); raises when bad."""
  if 'error' in record:
    raise OSError(record['error'])
  if 'image' in record:
    return as_rgb(record['image'])
  data = record['encoded'] if 'encoded' in record else paths.read_bytes(record['path'])
  return decode(data, size)


def try_canvas(record_fn, size: int) -> tuple[dict | None, str]:
  """(canvas record, '') or (None, 'WHERE: why') for the record returned by record_fn()."""
  record = {}
  try:
    record = record_fn()
    canvas, hw = to_canvas(record_image(record, size), size)
  except Exception as e:  # pylint: disable=broad-except  # any bad record is skipped, not fatal
    reason = str(e) if isinstance(e, BadImage) else f'{type(e).__name__}: {e}'
    return None, f'{record.get("path", "a record")}: {reason}'
  return {'image': canvas, 'hw': hw, 'label': np.int32(record['label'])}, ''


class ReadableCanvases(grain.MapDataset):
  """Canvases of `parent`'s records; an unreadable element i is replaced by the first readable
  of i+1, i+2, ... (at most `tries` looked at) and says what it replaced in 'skipped'."""

  def __init__(self, parent: grain.MapDataset, size: int, tries: int):
    super().__init__(parent)
    self._size, self._tries = size, tries

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f'ReadableCanvases(size={self._size})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    out, skipped = try_canvas(lambda: self._parent[index], self._size)
    for k in range(1, self._tries):
      if out is not None:
        break
      out, _ = try_canvas(lambda k=k: self._parent[index + k], self._size)
    if out is None:
      raise DataError(f'no readable image in {self._tries} records after {skipped}')
    return {**out, 'skipped': np.array(skipped)}


def steps_per_epoch(n_images: int, global_batch: int) -> int:
  """Full global batches in one pass over the data (the official drop_last=True)."""
  return n_images // global_batch


def check_size(n_images: int, global_batch: int) -> None:
  if n_images < global_batch:
    raise DataError(f'the dataset has {n_images} images, fewer than one global batch '
                    f'(config.batch_size={global_batch})')


def check_source(source: Source, global_batch: int, canvas_size: int,
                 threads: int = 8) -> None:
  """Before training: one clear DataError unless at least one global batch of the source's
  records decodes (reads records in order until that many are found: cheap for good data)."""
  n = len(source)
  found, bad = 0, []
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for start in range(0, n, 4 * global_batch):
      stop = min(n, start + 4 * global_batch)
      for out, why in pool.map(lambda i: try_canvas(lambda: source[i], canvas_size),
                               range(start, stop)):
        found += out is not None
        bad += [why] if out is None else []
      if found >= global_batch:
        return
  if not found:
    raise DataError(f'none of the {n} images can be read (first: {bad[0]})')
  check_size(n, global_batch)
  raise DataError(f'the dataset has {found} readable images ({len(bad)} of {n} cannot be '
                  f'read, first: {bad[0]}), fewer than one global batch '
                  f'(config.batch_size={global_batch})')


def _without_skipped(record: dict) -> dict:
  return {k: v for k, v in record.items() if k != 'skipped'}


def train_dataset(source: Source, *, canvas_size: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  with_skipped: bool = False) -> grain.MapDataset:
  """Infinite MapDataset of this process's batches; element i is batch i. with_skipped keeps
  each row's 'skipped' string (for TrainIterator)."""
  check_size(len(source), global_batch)
  local_batch = global_batch // process_count
  stream = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ReadableCanvases(stream[process_index::process_count], canvas_size, tries=len(source))
  if not with_skipped:
    ds = ds.map(_without_skipped)
  return ds.batch(local_batch, drop_remainder=True)


def global_sum(n: int) -> int:
  """Sum of an int over all processes (every process must call it at the same point)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return n
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return int(np.sum(multihost_utils.process_allgather(np.int64(n))))


class TrainIterator:
  """This process's training batches from a step on, with worker processes and prefetch.

  get_state() -> {'next_step': int} (JSON-serialisable; equals the number of batches taken);
  set_state(state) continues exactly from that step, whatever the worker count.
  take_skipped() -> unreadable images skipped (all processes) since its last call.
  """

  def __init__(self, ds: grain.MapDataset, *, start_step: int, worker_count: int,
               prefetch: int):
    self._ds, self._workers, self._prefetch = ds, worker_count, prefetch
    self._skipped = 0
    self._it = None
    self._open(start_step)

  def _open(self, step: int) -> None:
    if self._it is not None:
      self._it.close()
    it = self._ds[step:].to_iter_dataset(grain.ReadOptions(
        num_threads=max(1, self._prefetch), prefetch_buffer_size=max(1, self._prefetch)))
    if self._workers > 0:
      from absl import flags  # pylint: disable=import-outside-toplevel
      if not flags.FLAGS.is_parsed():  # grain reads its flags in worker processes
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
    self._it, self._step = iter(it), step

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = dict(next(self._it))
    self._step += 1
    for why in batch.pop('skipped').tolist():
      if why:
        self._skipped += 1
        logging.warning('data: skipped unreadable image %s', why)
    return batch

  def get_state(self) -> dict:
    return {'next_step': self._step}

  def set_state(self, state: dict) -> None:
    self._open(int(state['next_step']))

  def take_skipped(self) -> int:
    n, self._skipped = self._skipped, 0
    return global_sum(n)

  def close(self) -> None:
    self._it.close()


def train_iterator(source: Source, *, canvas_size: int, global_batch: int, seed: int,
                   start_step: int = 0, worker_count: int = 0, prefetch: int = 2,
                   process_index: int = 0, process_count: int = 1) -> TrainIterator:
  ds = train_dataset(source, canvas_size=canvas_size, global_batch=global_batch, seed=seed,
                     process_index=process_index, process_count=process_count,
                     with_skipped=True)
  return TrainIterator(ds, start_step=start_step, worker_count=worker_count, prefetch=prefetch)


def eval_batches(source: Source, *, canvas_size: int, batch_size: int,
                 limit: int = 0, process_index: int = 0, process_count: int = 1,
                 threads: int = 8) -> Iterator[dict]:
  """Every image once, in order, padded to full batches; 'mask' marks real rows (an
  unreadable image is logged and masked out)."""
  n = len(source) if not limit else min(limit, len(source))
  indices = range(process_index, n, process_count)
  blank = {'image': np.zeros((canvas_size, canvas_size, 3), np.uint8),
           'hw': np.array([canvas_size, canvas_size], np.int32), 'label': np.int32(-1)}
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for start in range(0, len(indices), batch_size):
      chunk = indices[start:start + batch_size]
      rows, mask = [], np.zeros(batch_size, bool)
      for j, (out, why) in enumerate(pool.map(
          lambda i: try_canvas(lambda: source[i], canvas_size), chunk)):
        if why:
          logging.warning('data: skipped unreadable image %s (evaluation)', why)
        rows.append(out or blank)
        mask[j] = out is not None
      rows += [blank] * (batch_size - len(rows))
      yield {k: np.stack([r[k] for r in rows]) for k in ('image', 'hw', 'label')} | {
          'mask': mask}
