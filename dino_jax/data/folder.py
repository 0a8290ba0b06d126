"""folder:PATH: a directory of image files, listed once and read lazily (decoding happens in
the grain map step, on the host's workers).

Labels: when PATH holds only subdirectories (no image files of its own), each subdirectory is
a class (sorted names -> 0, 1, ...; images found recursively inside it), as torchvision's
ImageFolder does. Otherwise every image under PATH, recursively, is used without labels.
Splits: when PATH has a `train/` subdirectory, it is the training set and `val/`,
`validation/` or `test/` (the first present) the k-NN test set, labelled with the training
classes. Names starting with '.' are ignored (e.g. macOS `._x.jpg` resource forks); so is any
file whose extension no PIL plugin reads. Listing opens nothing: FIFOs, sockets and devices
(even named x.jpg) are left out, and so is a symbolic link to a directory already listed (a loop
such as `loop -> ..`); each is logged, and one line per kind is printed.
"""
from __future__ import annotations

import collections
import os

import numpy as np
from absl import logging
from PIL import Image, ImageFile

from dino_jax import paths
from dino_jax.data.base import DataError

TEST_SPLITS = ('val', 'validation', 'test')


def image_extensions() -> frozenset[str]:
  """Lower-case extensions of every format PIL can decode here (identify-only stubs left out)."""
  Image.init()
  def decodable(fmt):
    factory = Image.OPEN.get(fmt, (None,))[0]
    return factory is not None and not (isinstance(factory, type) and
                                        issubclass(factory, ImageFile.StubImageFile))
  return frozenset(ext for ext, fmt in Image.registered_extensions().items() if decodable(fmt))


def _visible(name: str) -> bool:
  return not name.startswith('.')


def list_images(root: str, left_out: list | None = None) -> list[str]:
  """Paths of the image files under `root` (recursive; a local folder or a bucket URL),
  relative to it, in sorted order. Entries the walk leaves out (special files, repeated
  directories: see paths.walk) are appended to `left_out` as {'kind', 'path', 'reason'}, path
  relative to root, and logged."""
  exts = image_extensions()
  found = []

  def on_skip(kind, path, reason):
    rel = paths.relative(path, root)
    name = os.path.basename(rel)
    if kind == paths.SKIP_SPECIAL and not (_visible(name) and
                                           os.path.splitext(name)[1].lower() in exts):
      return  # a socket or FIFO that would not have been listed anyway
    logging.warning('data: left out %s %s under %s: %s', kind, rel, root, reason)
    if left_out is not None:
      left_out.append({'kind': kind, 'path': rel, 'reason': reason})

  for dirpath, dirnames, filenames in paths.walk(root, on_skip):
    dirnames[:] = sorted(d for d in dirnames if _visible(d))
    rel = paths.relative(dirpath, root)
    for f in sorted(filenames):
      if _visible(f) and os.path.splitext(f)[1].lower() in exts:
        found.append(f if rel == '.' else os.path.join(rel, f))
  return found


class FolderSource:
  """Image files of a directory: {'path': absolute path, 'label': class index or -1}."""

  def __init__(self, root: str, class_names: list[str] | None = None):
    if not paths.isdir(root):
      raise DataError(f'config.data.source=folder:{root}: no such directory')
    self.root = paths.absolute(root)
    self.left_out: list[dict] = []  # special files and repeated directories, not listed
    files = list_images(self.root, self.left_out)
    report_left_out(self.root, self.left_out)
    if not files:
      raise DataError(f'config.data.source=folder:{root}: no image files under {root} '
                      f'(looked for the extensions PIL reads: .jpg, .png, .webp, ...)')
    top_level_images = any(os.sep not in f for f in files)
    if class_names is None and not top_level_images:
      class_names = sorted({f.split(os.sep, 1)[0] for f in files})
    self.class_names = class_names
    if class_names is None:
      labels = np.full(len(files), -1, np.int32)
    else:
      index = {c: i for i, c in enumerate(class_names)}
      unknown = sorted({f.split(os.sep, 1)[0] for f in files} - set(index))
      if unknown or top_level_images:
        raise DataError(f'config.data.source: {root} has images outside the training classes '
                        f'({", ".join(unknown[:3]) or "files at the top level"})')
      labels = np.array([index[f.split(os.sep, 1)[0]] for f in files], np.int32)
    self.labels = labels
    # one bytes blob + offsets: compact to pickle into worker processes (ImageNet: ~50 MB)
    encoded = [f.encode('utf-8') for f in files]
    self._offsets = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
    self._blob = b''.join(encoded)

  @property
  def has_labels(self) -> bool:
    return self.class_names is not None

  def __len__(self) -> int:
    return len(self.labels)

  def relpath(self, index: int) -> str:
    return self._blob[self._offsets[index]:self._offsets[index + 1]].decode('utf-8')

  def __getitem__(self, index: int) -> dict:
    return {'path': paths.join(self.root, self.relpath(index)),
            'label': int(self.labels[index])}


def report_left_out(root: str, left_out: list[dict]) -> None:
  """One printed line per kind of entry the listing of `root` left out."""
  by_kind = collections.defaultdict(list)
  for e in left_out:
    by_kind[e['kind']].append(e)
  for kind, entries in by_kind.items():
    first = entries[0]
    n = len(entries)
    kinds = kind if n == 1 else kind[:-1] + 'ies' if kind.endswith('y') else kind + 's'
    print(f'warning: {root}: left out {n} {kinds} (first: {first["path"]}: '
          f'{first["reason"]})', flush=True)


def load(path: str) -> tuple[FolderSource, FolderSource | None]:
  """(train, test-or-None): PATH/train + PATH/val when PATH has a train/ folder, else PATH."""
  train_dir = paths.join(path, 'train')
  if not paths.isdir(train_dir):
    return FolderSource(path), None
  train = FolderSource(train_dir)
  for name in TEST_SPLITS:
    test_dir = paths.join(path, name)
    if paths.isdir(test_dir):
      return train, FolderSource(test_dir, class_names=train.class_names)
  return train, None
