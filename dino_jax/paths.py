"""Local paths and bucket URLs (gs://, s3://, ...) behind one small interface.

Local paths go through os; URLs through etils.epath (gcsfs or TensorFlow's gfile underneath:
`pip install -e '.[gcs]'`), because os.path would silently treat gs://b/x as a relative local
folder ./gs:/b/x. Used for workdirs, image folders, prepared datasets and npz files.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterator


def is_remote(path) -> bool:
  """gs://, s3:// ... paths (orbax, ArrayRecord and etils.epath read them; os.path must not)."""
  return '://' in str(path)


def _epath(path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(path)


def absolute(path) -> str:
  """Local paths made absolute; bucket URLs kept as they are."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def join(root, *parts: str) -> str:
  """root/part/...: os.path.join for local paths, '/' for URLs (os.sep is '/' here too)."""
  return '/'.join([str(root).rstrip('/'), *parts]) if is_remote(root) else \
      os.path.join(root, *parts)


def exists(path) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def size(path) -> int:
  return _epath(path).stat().length if is_remote(path) else os.path.getsize(path)


def open_file(path, mode: str = 'rb'):
  if is_remote(path):
    return _epath(path).open(mode)
  return open(path, mode)  # pylint: disable=consider-using-with,unspecified-encoding


def read_bytes(path) -> bytes:
  with open_file(path, 'rb') as f:
    return f.read()


def makedirs(path) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def upload(local: str, dst) -> None:
  """Copy a local file to dst (a local path or a URL), replacing it."""
  if is_remote(dst):
    _epath(local).copy(_epath(dst), overwrite=True)
  else:
    shutil.copyfile(local, dst)


def walk(root) -> Iterator[tuple[str, list[str], list[str]]]:
  """os.walk(root) top-down (symbolic links followed) for local folders; for URLs the
  storage's own listing (one request per folder level, not per file), dirpath a URL under
  root. Pruning dirnames in place prunes the walk."""
  if not is_remote(root):
    yield from os.walk(root, followlinks=True)
    return
  scheme = str(root).split('://', 1)[0]
  for top, dirnames, filenames in _epath(root).walk(top_down=True):
    top = str(top)  # fsspec's walk (gcsfs) drops the scheme: put it back
    yield (top if is_remote(top) else f'{scheme}://{top.lstrip("/")}'), dirnames, filenames


def relative(path: str, root: str) -> str:
  """path relative to root ('.' for root itself), for local paths and URLs alike."""
  if not is_remote(root):
    return os.path.relpath(path, root)
  root, path = str(root).rstrip('/'), str(path).rstrip('/')
  if path == root:
    return '.'
  if not path.startswith(root + '/'):
    raise ValueError(f'{path} is not under {root}')
  return path[len(root) + 1:]
