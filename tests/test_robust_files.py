"""Image folders with special files: a FIFO named x.jpg, a socket, a symbolic-link loop. Listing
(folder:PATH and prepare) finishes, lists every real image exactly once, says what it left out,
and opens, moves or deletes nothing."""
import json
import os
import socket
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from dino_jax import paths
from dino_jax.data import folder

TIMEOUT = 60  # seconds; listing a few files takes milliseconds, a FIFO read blocks forever


def image(path, level):
  im = Image.fromarray(np.full((12, 10, 3), level, np.uint8))
  im.save(path, 'PNG' if str(path).endswith('.png') else 'JPEG', quality=95)


def finishes(fn, fifos=()):
  """fn() run in a thread that must finish within TIMEOUT; on a hang the FIFOs get a writer
  (so a blocked reader sees EOF and the test process can exit) and the test fails."""
  out = {}

  def target():
    try:
      out['value'] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      out['error'] = e

  t = threading.Thread(target=target, daemon=True)
  t.start()
  t.join(TIMEOUT)
  if t.is_alive():
    for f in fifos:
      try:
        os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:
        pass
    pytest.fail(f'{fn} still running after {TIMEOUT} s (blocked on a special file?)')
  if 'error' in out:
    raise out['error']
  return out['value']


@pytest.fixture
def tree(tmp_path, monkeypatch):
  """root/cat (3 png), root/dog (2 jpg + outside/ linked in with 2 more + a linked file),
  a FIFO cat/x.jpg, a socket dog/s.png, a loop cat/loop -> .. and a deeper one
  dog/deep/up -> ../.. . Returns (root, {relative path of each real image}, specials)."""
  root, outside = tmp_path / 'root', tmp_path / 'outside'
  for d in (root / 'cat', root / 'dog' / 'deep', outside):
    d.mkdir(parents=True)
  want = set()
  for i in range(3):
    image(root / 'cat' / f'c{i}.png', 10 * i)
    want.add(f'cat/c{i}.png')
  for i in range(2):
    image(root / 'dog' / f'd{i}.jpg', 100 + 10 * i)
    want.add(f'dog/d{i}.jpg')
  image(root / 'dog' / 'deep' / 'deep.png', 200)
  want.add('dog/deep/deep.png')
  for i in range(2):
    image(outside / f'o{i}.png', 150 + i)
  os.symlink(outside, root / 'dog' / 'more')  # a directory outside the tree: followed
  want |= {'dog/more/o0.png', 'dog/more/o1.png'}
  os.symlink(outside / 'o0.png', root / 'dog' / 'linked.png')  # a file link: followed
  want.add('dog/linked.png')
  fifo = root / 'cat' / 'x.jpg'
  os.mkfifo(fifo)
  monkeypatch.chdir(root / 'dog')  # AF_UNIX paths are short: bind a relative name
  sock = socket.socket(socket.AF_UNIX)
  sock.bind('s.png')
  os.symlink('..', root / 'cat' / 'loop')
  os.symlink('../..', root / 'dog' / 'deep' / 'up')
  yield root, want, {'fifo': fifo, 'socket': root / 'dog' / 's.png'}
  sock.close()


def assert_untouched(specials):
  assert stat.S_ISFIFO(os.lstat(specials['fifo']).st_mode)
  assert stat.S_ISSOCK(os.lstat(specials['socket']).st_mode)


def test_listing_skips_special_files_and_loops_and_finishes(tree):
  root, want, specials = tree
  left_out = []
  found = finishes(lambda: folder.list_images(str(root), left_out), [specials['fifo']])
  assert len(found) == len(set(found)) == len(want)  # each real image once, no loop copies
  assert set(found) == want
  kinds = sorted((e['kind'], e['path']) for e in left_out)
  assert kinds == [(paths.SKIP_LOOP, 'cat/loop'), (paths.SKIP_LOOP, 'dog/deep/up'),
                   (paths.SKIP_SPECIAL, 'cat/x.jpg'), (paths.SKIP_SPECIAL, 'dog/s.png')]
  reasons = {e['path']: e['reason'] for e in left_out}
  assert 'FIFO' in reasons['cat/x.jpg'] and 'socket' in reasons['dog/s.png']
  assert 'loop' in reasons['cat/loop'] and 'loop' in reasons['dog/deep/up']
  assert_untouched(specials)


def test_folder_source_labels_and_one_line_per_kind(tree, capsys, caplog):
  root, want, specials = tree
  src = finishes(lambda: folder.FolderSource(str(root)), [specials['fifo']])
  assert src.class_names == ['cat', 'dog'] and len(src) == len(want)
  assert sorted(src.relpath(i) for i in range(len(src))) == sorted(want)
  assert [src[i]['label'] for i in range(len(src))] == [
      0 if src.relpath(i).startswith('cat') else 1 for i in range(len(src))]
  out = capsys.readouterr().out.splitlines()
  assert out == [
      f'warning: {root}: left out 2 special files (first: cat/x.jpg: a FIFO, not a regular '
      f'file)',
      f'warning: {root}: left out 2 repeated directories (first: cat/loop: a link to {root}, '
      f'which contains it (a loop))']
  assert sum('left out' in r.getMessage() for r in caplog.records) == 4  # each one logged
  assert_untouched(specials)


def test_second_link_to_a_listed_directory_is_not_listed_twice(tmp_path):
  (tmp_path / 'a').mkdir()
  image(tmp_path / 'a' / 'x.png', 5)
  os.symlink('a', tmp_path / 'b')  # b sorts after a: a is listed, b is the same folder again
  left_out = []
  assert finishes(lambda: folder.list_images(str(tmp_path), left_out)) == ['a/x.png']
  assert left_out == [{'kind': paths.SKIP_LOOP, 'path': 'b',
                       'reason': f'a link to {tmp_path / "a"}, already listed'}]


def test_read_bytes_refuses_a_fifo_without_blocking(tmp_path):
  fifo = tmp_path / 'x.jpg'
  os.mkfifo(fifo)
  with pytest.raises(OSError, match=r'x\.jpg: not a regular file \(a FIFO\)'):
    finishes(lambda: paths.read_bytes(str(fifo)), [fifo])
  assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_prepare_finishes_with_the_right_count(tree, tmp_path):
  root, want, specials = tree
  dst = tmp_path / 'prepared'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  try:
    r = subprocess.run([sys.executable, '-m', 'dino_jax.data.prepare', f'--src={root}',
                        f'--dst={dst}', '--shards=2', '--workers=2'], capture_output=True,
                       text=True, timeout=120, env=env, cwd=REPO, check=False)
  except subprocess.TimeoutExpired:
    os.close(os.open(specials['fifo'], os.O_WRONLY | os.O_NONBLOCK))
    pytest.fail('prepare did not finish on a folder with a FIFO and a symlink loop')
  assert r.returncode == 0, r.stderr
  info = json.loads((dst / 'dataset.json').read_text())
  split = info['splits']['train']
  assert split['num_examples'] == len(want) and split['skipped'] == []
  assert sorted(e['path'] for e in split['left_out']) == [
      'cat/loop', 'cat/x.jpg', 'dog/deep/up', 'dog/s.png']
  lines = r.stdout.splitlines()
  assert sum(l.startswith(f'warning: {root}: left out 2 ') for l in lines) == 2
  assert f'train: wrote {len(want)} records in 2 files, skipped 0' in lines
  assert_untouched(specials)
  assert (root / 'cat' / 'loop').is_symlink() and os.readlink(root / 'cat' / 'loop') == '..'
