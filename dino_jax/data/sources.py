"""Random-access image sources, selected by a config string.

  digits            scikit-learn's 8x8 handwritten digits (ships with the package: offline)
  npz:PATH          arrays x_train, y_train [, x_test, y_test] (uint8 HWC or HW images)
  tfds:NAME         a TFDS dataset through tfds.data_source (ArrayRecord; no TensorFlow)

Every source yields {'image': uint8 (H, W, 3), 'label': int} records; `label` is -1 when the
data has none.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import numpy as np


class Source(Protocol):
  has_labels: bool

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...


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
    record = self.ds[index]
    return {'image': as_rgb(record['image']),
            'label': int(record['label']) if self.has_labels else -1}


def _digits() -> tuple[ArraySource, ArraySource]:
  """sklearn digits (1797 images, 8x8, 0..16) as uint8 RGB; the last 297 are the test split."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  labels = d.target.astype(np.int32)
  return ArraySource(images[:1500], labels[:1500]), ArraySource(images[1500:], labels[1500:])


def _npz(path: str) -> tuple[ArraySource, ArraySource | None]:
  if not os.path.exists(path):
    raise FileNotFoundError(f'config.data.source: no such file {path!r}')
  with np.load(path, allow_pickle=False) as f:
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


KINDS = ('digits', 'npz', 'tfds')


def load(source: str) -> tuple[Source, Source | None]:
  """(train, test-or-None) for a config.data.source string."""
  kind, _, arg = source.partition(':')
  if kind == 'digits' and not arg:
    return _digits()
  if kind == 'npz' and arg:
    return _npz(arg)
  if kind == 'tfds' and arg:
    return _tfds(arg)
  raise ValueError(f'config.data.source={source!r}: expected one of digits, npz:PATH, '
                   f'tfds:NAME[:SPLIT]')


def check_kind(source: str) -> None:
  """Cheap syntax check of a source string (no I/O), for config validation."""
  kind, _, arg = source.partition(':')
  if kind not in KINDS or (kind != 'digits') != bool(arg):
    raise ValueError(f'config.data.source={source!r}: expected one of digits, npz:PATH, '
                     f'tfds:NAME[:SPLIT]')
