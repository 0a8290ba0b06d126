"""arrayrecord:DIR: a dataset written by `python -m dino_jax.data.prepare` (no TensorFlow).

DIR/dataset.json describes it; DIR/<split>.array_record-<i>-of-<n> hold one record per image:
    int32 label (little-endian; -1: none) | uint32 n | n bytes of the source path (UTF-8) |
    the image file's bytes, unchanged (or re-encoded smaller with --max_size)
The path travels with the image so a record that fails to decode is logged by its origin.
"""
from __future__ import annotations

import json
import struct

from dino_jax import paths
from dino_jax.data.base import DataError

FORMAT = 'dino_jax.arrayrecord.v1'
INFO = 'dataset.json'
_HEADER = struct.Struct('<iI')


def encode(label: int, path: str, data: bytes) -> bytes:
  name = path.encode('utf-8')
  return _HEADER.pack(label, len(name)) + name + data


def parse(record: bytes) -> dict:
  label, n = _HEADER.unpack_from(record)
  start = _HEADER.size
  return {'label': label, 'path': record[start:start + n].decode('utf-8'),
          'encoded': record[start + n:]}


def shard_names(split: str, n: int) -> list[str]:
  return [f'{split}.array_record-{i:05d}-of-{n:05d}' for i in range(n)]


def read_info(root: str) -> dict:
  path = paths.join(root, INFO)
  if not paths.exists(path):
    raise DataError(f'config.data.source=arrayrecord:{root}: no {INFO} (write the dataset '
                    f'with python -m dino_jax.data.prepare)')
  info = json.loads(paths.read_bytes(path))
  if info.get('format') != FORMAT:
    raise DataError(f'{path}: format {info.get("format")!r} is not {FORMAT!r}')
  return info


class ArrayRecordSource:
  """One split of a prepared dataset: {'encoded': bytes, 'path': str, 'label': int}."""

  def __init__(self, root: str, split: str):
    import grain  # pylint: disable=import-outside-toplevel
    info = read_info(root)
    if split not in info['splits']:
      raise DataError(f'config.data.source=arrayrecord:{root}: no split {split!r} '
                      f'(has {", ".join(info["splits"])})')
    self.root, self.split = root, split
    self.class_names = info['class_names']
    files = [paths.join(root, f) for f in info['splits'][split]['files']]  # gs:// read natively
    self._ds = grain.sources.ArrayRecordDataSource(files)
    if len(self._ds) != info['splits'][split]['num_examples']:
      raise DataError(f'{root}: split {split} has {len(self._ds)} records, {INFO} says '
                      f'{info["splits"][split]["num_examples"]}')

  @property
  def has_labels(self) -> bool:
    return self.class_names is not None

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict:
    return parse(self._ds[index])


def load(root: str) -> tuple[ArrayRecordSource, ArrayRecordSource | None]:
  """(train, the first of val/validation/test present, or None)."""
  info = read_info(root)
  train = ArrayRecordSource(root, 'train')
  for split in ('val', 'validation', 'test'):
    if split in info['splits']:
      return train, ArrayRecordSource(root, split)
  return train, None
