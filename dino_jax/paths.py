"""Local paths and bucket URLs (gs://, s3://, ...) behind one small interface.

Local paths go through os; URLs through etils.epath (gcsfs or TensorFlow's gfile underneath:
`pip install -e '.[gcs]'`), because os.path would silently treat gs://b/x as a relative local
folder ./gs:/b/x. Used for workdirs, image folders, prepared datasets and npz files.
"""
from __future__ import annotations

import os
import shutil
import stat
from typing import Callable, Iterator

from absl import logging


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


def special_kind(mode: int) -> str:
  """'FIFO', 'socket', 'character device', ... for an os.stat st_mode that is not a regular
  file or a directory ('' for those two)."""
  for test, kind in ((stat.S_ISFIFO, 'FIFO'), (stat.S_ISSOCK, 'socket'),
                     (stat.S_ISCHR, 'character device'), (stat.S_ISBLK, 'block device')):
    if test(mode):
      return kind
  return '' if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else 'special file'


def read_bytes(path) -> bytes:
  """The whole file. A local path that is not a regular file after following links (a FIFO,
  which would block forever, a socket, a device) raises OSError without being opened."""
  if not is_remote(path):
    kind = special_kind(os.stat(path).st_mode)
    if kind:
      raise OSError(f'{path}: not a regular file (a {kind})')
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


# on_skip(kind, path, reason) hears of every entry a local walk leaves out; kind is one of:
SKIP_SPECIAL = 'special file'  # a FIFO, socket or device (reading a FIFO blocks forever)
SKIP_LOOP = 'repeated directory'  # a symlinked directory already walked (a loop, or a 2nd link)
SKIP_UNREADABLE = 'unreadable directory'  # a directory that cannot be listed (permissions)
OnSkip = Callable[[str, str, str], None]


def _log_skip(kind: str, path: str, reason: str) -> None:
  logging.warning('left out %s %s: %s', kind, path, reason)


def walk(root, on_skip: OnSkip | None = None) -> Iterator[tuple[str, list[str], list[str]]]:
  """os.walk(root) top-down, symbolic links followed, for local folders; for URLs the
  storage's own listing (one request per folder level, not per file), dirpath a URL under
  root. Pruning dirnames in place prunes the walk.

  A local walk never opens anything and finishes on any tree: filenames hold only regular files
  (after following links; broken links stay, for the reader to report), never FIFOs, sockets or
  devices; a symbolic link to a directory already walked (a loop such as `loop -> ..`, or a
  second link to one directory) is not entered. Each left-out entry is passed to
  on_skip(kind, path, reason) (default: a logged warning)."""
  if not is_remote(root):
    yield from _walk_local(os.fspath(root), on_skip or _log_skip)
    return
  scheme = str(root).split('://', 1)[0]
  for top, dirnames, filenames in _epath(root).walk(top_down=True):
    top = str(top)  # fsspec's walk (gcsfs) drops the scheme: put it back
    yield (top if is_remote(top) else f'{scheme}://{top.lstrip("/")}'), dirnames, filenames


def _walk_local(root: str, on_skip: OnSkip) -> Iterator[tuple[str, list[str], list[str]]]:
  seen: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of directories walked -> first path
  stack = [(root, False)]  # (path, is a symbolic link)
  while stack:
    top, is_link = stack.pop()
    try:
      st = os.stat(top)
    except OSError as e:
      if top != root:  # a missing root lists nothing, as os.walk
        on_skip(SKIP_UNREADABLE, top, e.strerror or type(e).__name__)
      continue
    key = (st.st_dev, st.st_ino)
    if is_link and key in seen:  # only a link can lead back: real directories form a tree
      first = seen[key]
      on_skip(SKIP_LOOP, top, f'a link to {first}, ' + (
          'which contains it (a loop)' if _contains(first, top) else 'already listed'))
      continue
    seen.setdefault(key, top)
    dirnames, filenames, links = [], [], set()
    try:
      with os.scandir(top) as it:
        entries = list(it)
    except OSError as e:
      on_skip(SKIP_UNREADABLE, top, e.strerror or type(e).__name__)
      continue
    for entry in entries:
      try:
        if entry.is_dir():  # follows links; d_type makes this free for plain entries
          dirnames.append(entry.name)
          if entry.is_symlink():
            links.add(entry.name)
          continue
        if entry.is_file():
          filenames.append(entry.name)
          continue
        kind = special_kind(entry.stat().st_mode)  # stat only, never open
      except OSError:  # a broken link: listed, so reading it reports the missing target
        filenames.append(entry.name)
        continue
      on_skip(SKIP_SPECIAL, entry.path, f'a {kind}, not a regular file')
    yield top, dirnames, filenames
    # depth first, in the order the caller left dirnames in (pruning prunes)
    stack.extend((os.path.join(top, d), d in links) for d in reversed(dirnames))


def _contains(parent: str, path: str) -> bool:
  return path.startswith(parent.rstrip(os.sep) + os.sep)


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
