"""Random-access image sources, selected by a config string.

  digits            scikit-learn's 8x8 handwritten digits (ships with the package: offline)
  npz:PATH          arrays x_train, y_train [, x_test, y_test] (uint8 HWC or HW images)
  tfds:NAME[:SPLIT] a TFDS dataset through tfds.data_source (ArrayRecord; no TensorFlow)
  folder:PATH       image files, class subfolders giving labels (folder.py)
  arrayrecord:DIR   a folder converted by `python -m dino_jax.data.prepare` (records.py)

Every source is a base.Source: a record holds 'label' (an int, -1 when the data has none) and
the image as one of: 'image' (a decoded uint8 array), 'encoded' (file bytes) or 'path' (a file
to read); 'path' also names where a record came from, and 'error' says why a source could not
read it. The grain map step (pipeline.py) turns every kind into a canvas, or skips it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dino_jax import paths
from dino_jax.data import folder, records
from dino_jax.data.base import Source


def as_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) from grayscale (H, W) / (H, W, 1), RGB or RGBA arrays."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:
    image = image[..., :3]
  if image.dtype != np.uint8:
    raise ValueError(f'expected uint8 images, got {image.dtype}')
  return image


@dataclasses.dataclass
class ArraySource:
  """In-memory images (N, H, W[, C]) uint8 with optional labels."""
  images: np.ndarray
  labels: np.ndarray | None = None

  def __post_init__(self):
    if len(self.images) == 0:
      raise ValueError('the dataset is empty')
    if self.labels is not None and len(self.labels) != len(self.images):
      raise ValueError(f'{len(self.images)} images but {len(self.labels)} labels')

  @property
  def has_labels(self) -> bool:
    return self.labels is not None

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    label = -1 if self.labels is None else int(self.labels[index])
    return {'image': as_rgb(self.images[index]), 'label': label}


class TFDSSource:
  """A split of a TFDS dataset read with tfds.data_source (random access, ArrayRecord)."""

  def __init__(self, name: str, split: str):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.name, self.split = name, split
    self.ds = tfds.data_source(name, split=split)
    self.has_labels = 'label' in self.ds.dataset_info.features

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, index: int) -> dict:
    where = f'tfds:{self.name}/{self.split}[{index}]'
    try:
      record = self.ds[index]
    except Exception as e:  # pylint: disable=broad-except  # a corrupt record is skipped
      return {'path': where, 'label': -1, 'error': f'{type(e).__name__}: {e}'}
    return {'image': record['image'], 'path': where,
            'label': int(record['label']) if self.has_labels else -1}


def _digits() -> tuple[ArraySource, ArraySource]:
  """sklearn digits (1797 images, 8x8, 0..16) as uint8 RGB; the last 297 are the test split."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  labels = d.target.astype(np.int32)
  return ArraySource(images[:1500], labels[:1500]), ArraySource(images[1500:], labels[1500:])


def _npz(path: str) -> tuple[ArraySource, ArraySource | None]:
  if not paths.exists(path):
    raise FileNotFoundError(f'config.data.source: no such file {path!r}')
  with paths.open_file(path) as raw, np.load(raw, allow_pickle=False) as f:
    if 'x_train' not in f:
      raise ValueError(f'config.data.source: {path!r} has no array x_train '
                       f'(found {sorted(f.files)})')
    train = ArraySource(f['x_train'], f['y_train'] if 'y_train' in f else None)
    test = None
    for x, y in (('x_test', 'y_test'), ('x_val', 'y_val')):
      if x in f:
        test = ArraySource(f[x], f[y] if y in f else None)
        break
  return train, test


def _tfds(name: str) -> tuple[TFDSSource, TFDSSource | None]:
  """The requested split (default 'train') and, for k-NN, 'validation' or else 'test'."""
  name, _, split = name.partition(':')
  train = TFDSSource(name, split or 'train')
  for test_split in ('validation', 'test'):
    try:
      return train, TFDSSource(name, test_split)
    except (ValueError, KeyError):  # the dataset has no such split
      continue
  return train, None


LOADERS = {'npz': _npz, 'tfds': _tfds, 'folder': folder.load, 'arrayrecord': records.load}
EXPECTED = 'expected one of digits, npz:PATH, tfds:NAME[:SPLIT], folder:PATH, arrayrecord:DIR'


def load(source: str) -> tuple[Source, Source | None]:
  """(train, test-or-None) for a config.data.source string."""
  check_kind(source)
  kind, _, arg = source.partition(':')
  return _digits() if kind == 'digits' else LOADERS[kind](arg)


def check_kind(source: str) -> None:
  """Cheap syntax check of a source string (no I/O), for config validation."""
  kind, _, arg = source.partition(':')
  if not (kind == 'digits' and not arg or kind in LOADERS and arg):
    raise ValueError(f'config.data.source={source!r}: {EXPECTED}')
