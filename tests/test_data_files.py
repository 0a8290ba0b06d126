"""Image files: robust decoding, folder: and arrayrecord: sources, skip accounting, iterator
state, per-process shards, clear errors, and a tiny training run on a folder of bad files."""
import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from dino_jax.validate import ConfigError
from conftest import REPO, tiny_config
from dino_jax import data, paths, train
from dino_jax.data import decode as decode_lib
from dino_jax.data import folder, pipeline, prepare, records

SIZE = 16  # canvas size of the tiny config


def encode(im, fmt, **kw):
  out = io.BytesIO()
  im.save(out, fmt, **kw)
  return out.getvalue()


def png_header_only(w, h):
  """A PNG whose header claims w x h 8-bit grey pixels: a decompression bomb's shape."""
  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0)) +
          chunk(b'IDAT', zlib.compress(b'\0' * 1000)) + chunk(b'IEND', b''))


def grey(level, size=(24, 24), mode='RGB'):
  return Image.new('RGB', size, (level,) * 3).convert(mode)


def exif_rotated(level):
  """A 40 wide x 20 high JPEG whose EXIF says 'rotate 90 degrees' (orientation 6)."""
  exif = Image.Exif()
  exif[0x0112] = 6
  return encode(grey(level, (40, 20)), 'JPEG', exif=exif)


def sixteen_bit(level):
  return encode(Image.fromarray(np.full((24, 24), level * 257, np.uint16)), 'PNG')


def rgba(level):
  im = grey(level, mode='RGBA')
  im.putalpha(Image.linear_gradient('L').resize((24, 24)))
  return encode(im, 'PNG')


def palette_with_transparency(level):
  im = grey(level).convert('P')
  return encode(im, 'PNG', transparency=0)


# Good files: (name, bytes for grey level) decoded to that grey; each level names one image.
GOOD = [
    ('plain.jpg', lambda v: encode(grey(v), 'JPEG', quality=95)),
    ('cmyk.jpg', lambda v: encode(grey(v, mode='CMYK'), 'JPEG', quality=95)),
    ('grey.png', lambda v: encode(grey(v, mode='L'), 'PNG')),
    ('palette.png', palette_with_transparency),
    ('rgba.png', rgba),
    ('la.png', lambda v: encode(grey(v, mode='LA'), 'PNG')),
    ('sixteen.png', sixteen_bit),
    ('exif.jpg', exif_rotated),
    ('huge.jpg', lambda v: encode(grey(v, (4800, 2400)), 'JPEG', quality=50)),
    ('bitmap.bmp', lambda v: encode(grey(v), 'BMP')),
    ('photo.TIFF', lambda v: encode(grey(v), 'TIFF')),
    ('web.webp', lambda v: encode(grey(v), 'WEBP', lossless=True)),
]
# Bad files: skipped, counted and logged.
BAD = {
    'empty.jpg': b'',
    'truncated.jpg': encode(Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), 'JPEG')[:600],
    'corrupt.png': b'\x89PNG\r\n\x1a\n' + bytes(np.random.default_rng(1).integers(
        0, 255, 300, np.uint8)),
    'notanimage.jpg': b'<html>404 not found</html>',
    'bomb.png': png_header_only(100_000, 100_000),
}
IGNORED = {'notes.txt': b'hello', '._plain.jpg': b'\0\0\0'}  # not images: not listed at all


def make_folder(root, n_good, classes=('cat', 'dog'), bad=tuple(BAD), first_level=0):
  """n_good good images (cycling through GOOD's kinds) with grey levels first_level + 7 * i,
  spread over the class folders, plus the bad and ignored files. Returns {level: hw}."""
  hws = {}
  for c in classes:
    (root / c).mkdir(parents=True, exist_ok=True)
  for i in range(n_good):
    name, make = GOOD[i % len(GOOD)]
    level = first_level + 7 * i
    (root / classes[i % len(classes)] / f'{i:03d}_{name}').write_bytes(make(level))
    hws[level] = {'exif.jpg': [SIZE, SIZE // 2], 'huge.jpg': [SIZE // 2, SIZE]}.get(
        name, [SIZE, SIZE])
  for i, name in enumerate(bad):
    (root / classes[i % len(classes)] / name).write_bytes(BAD[name])
  for name, content in IGNORED.items():
    (root / classes[0] / name).write_bytes(content)
  return hws


def level_of(canvas, hw):
  """The grey level an image was written with, read back from its canvas."""
  h, w = hw
  return int(np.round(canvas[:h, :w].astype(np.float64).mean()))


def identify(levels, value):
  best = min(levels, key=lambda l: abs(l - value))
  assert abs(best - value) <= 3, (value, best)
  return best


# ---- decoding -------------------------------------------------------------------------------

@pytest.mark.parametrize('name,make', GOOD)
def test_every_good_kind_decodes_to_upright_8bit_rgb(name, make):
  image = decode_lib.decode(make(100), SIZE)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  np.testing.assert_allclose(image.mean(axis=(0, 1)), 100, atol=3)
  if name == 'exif.jpg':
    assert image.shape[:2] == (20, 10)  # stored 40 wide x 20 high: upright, drafted to 1/2
  if name == 'huge.jpg':  # 1/8 scale by draft, then reduce(18): still twice the 16 x 8 target
    assert image.shape[:2] == (17, 34)


def test_exif_rotation_moves_pixels_like_pil():
  a = np.zeros((20, 40, 3), np.uint8)
  a[:5, :10] = 255  # bright top-left corner
  exif = Image.Exif()
  exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
  image = decode_lib.decode(encode(Image.fromarray(a), 'PNG', exif=exif), 64)
  assert image.shape == (40, 20, 3)
  assert image[:10, -5:].mean() > 200 and image[-10:, :5].mean() < 50  # now top-right


def test_sixteen_bit_keeps_the_top_byte():
  a = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
  image = decode_lib.decode(encode(Image.fromarray(a), 'PNG'), 64)
  np.testing.assert_array_equal(image[..., 0], np.round(a / 257).astype(np.uint8))


def test_big_png_is_reduced_before_resize():
  png = encode(Image.new('RGB', (3000, 2000), (1, 2, 3)), 'PNG')
  image = decode_lib.decode(png, 100)
  assert image.shape[:2] == (143, 215)  # reduce(14), rounding up: >= twice the 100 x 67 target


@pytest.mark.parametrize('name,message', [
    ('empty.jpg', r'empty file \(0 bytes\)'),
    ('truncated.jpg', '(?i)truncated'),
    ('corrupt.png', 'not an image PIL can identify'),
    ('notanimage.jpg', 'not an image PIL can identify'),
    ('bomb.png', r'100000x100000 pixels .* exceed the decompression-bomb limit'),
])
def test_bad_files_raise_one_line_reasons(name, message):
  with pytest.raises(decode_lib.BadImage, match=message) as e:
    decode_lib.decode(BAD[name], SIZE)
  assert '\n' not in str(e.value)


# ---- folder source --------------------------------------------------------------------------

def test_folder_lists_images_with_class_labels(tmp_path):
  make_folder(tmp_path, 6)
  src, test = data.load(f'folder:{tmp_path}')
  assert test is None and src.has_labels and src.class_names == ['cat', 'dog']
  names = [src.relpath(i) for i in range(len(src))]
  assert len(src) == 6 + len(BAD)  # bad files are listed (and skipped later); .txt, ._x not
  assert not any(n.endswith(('.txt', '._plain.jpg')) for n in names)
  assert {src[i]['label'] for i in range(len(src)) if names[i].startswith('cat')} == {0}
  assert {src[i]['label'] for i in range(len(src)) if names[i].startswith('dog')} == {1}


def test_flat_and_nested_folders_have_no_labels(tmp_path):
  (tmp_path / 'a.png').write_bytes(encode(grey(5), 'PNG'))
  (tmp_path / 'x' / 'y').mkdir(parents=True)
  (tmp_path / 'x' / 'y' / 'b.jpg').write_bytes(encode(grey(9), 'JPEG'))
  src, _ = data.load(f'folder:{tmp_path}')
  assert not src.has_labels and len(src) == 2
  assert [src[i]['label'] for i in range(2)] == [-1, -1]
  assert src.relpath(1) == os.path.join('x', 'y', 'b.jpg')


def test_train_val_layout_labels_val_with_train_classes(tmp_path):
  make_folder(tmp_path / 'train', 4, bad=())
  make_folder(tmp_path / 'val', 2, classes=('dog',), bad=())
  train_src, val = data.load(f'folder:{tmp_path}')
  assert train_src.class_names == ['cat', 'dog'] and val.class_names == ['cat', 'dog']
  assert [val[i]['label'] for i in range(len(val))] == [1, 1]
  make_folder(tmp_path / 'val', 1, classes=('bird',), bad=())
  with pytest.raises(data.DataError, match='images outside the training classes'):
    data.load(f'folder:{tmp_path}')


@pytest.mark.parametrize('setup,message', [
    ('missing', 'no such file or folder'),  # caught by config validation
    ('empty', 'no image files under'),
    ('only_bad', 'none of the 5 images can be read'),
    ('too_few', r'has 11 readable images \(5 of 16 cannot be read, first: .*\), fewer than one '
                r'global batch \(config.batch_size=16\)'),
    ('too_few_files', r'has 4 images, fewer than one global batch'),
])
def test_unusable_folders_fail_before_training_with_one_line(tmp_path, setup, message):
  root = tmp_path / 'images'
  if setup != 'missing':
    root.mkdir()
  if setup == 'empty':
    (root / 'notes.txt').write_bytes(b'no images here')
  if setup == 'only_bad':
    make_folder(root, 0, classes=('a',))
  if setup == 'too_few':
    make_folder(root, 11)
  if setup == 'too_few_files':
    make_folder(root, 4, bad=())
  config = tiny_config(**{'data.source': f'folder:{root}'})
  with pytest.raises((data.DataError, ConfigError), match=message) as e:
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'work').exists()  # nothing started


def test_main_prints_the_data_error_and_exits_1(tmp_path):
  (tmp_path / 'images').mkdir()
  proc = subprocess.run(
      [sys.executable, '-m', 'dino_jax.main', f'--config={REPO}/configs/cpu.py',
       f'--workdir={tmp_path}/w', f'--config.data.source=folder:{tmp_path}/images'],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: config.data.source=folder:{tmp_path}/images: no image files under '
      f'{tmp_path}/images (looked for the extensions PIL reads: .jpg, .png, .webp, ...)')


# ---- the pipeline on bad files --------------------------------------------------------------

@pytest.fixture(scope='module')
def bad_folder(tmp_path_factory):
  """27 good images + 5 bad = 32 files: two batches of 16 per pass."""
  root = tmp_path_factory.mktemp('bad_folder')
  hws = make_folder(root, 27)
  return root, hws


@pytest.mark.parametrize('workers', [0, 2])
def test_one_pass_skips_each_bad_file_once_and_loses_no_good_image(bad_folder, workers, caplog):
  root, hws = bad_folder
  src, _ = data.load(f'folder:{root}')
  assert len(src) == 32
  it = data.train_iterator(src, canvas_size=SIZE, global_batch=16, seed=0, worker_count=workers)
  with caplog.at_level(logging.WARNING):
    batches = [next(it) for _ in range(2)]  # exactly one pass over the 32 files
  skipped = it.take_skipped()
  it.close()
  assert skipped == len(BAD) and it.take_skipped() == 0
  seen = []
  for b in batches:
    assert b['image'].shape == (16, SIZE, SIZE, 3) and set(b) == {'image', 'hw', 'label'}
    for canvas, hw in zip(b['image'], b['hw']):
      level = identify(hws, level_of(canvas, hw))
      assert hw.tolist() == hws[level]
      seen.append(level)
  assert set(seen) == set(hws)  # every good image, each bad slot filled by a good one
  assert len(seen) - len(set(seen)) == len(BAD)
  logged = '\n'.join(r.getMessage() for r in caplog.records)
  for name in BAD:
    assert f'data: skipped unreadable image {root}' in logged and name in logged


def test_restored_iterator_state_continues_exactly(bad_folder):
  root, _ = bad_folder
  src, _ = data.load(f'folder:{root}')
  kw = dict(canvas_size=SIZE, global_batch=8, seed=5)
  it = data.train_iterator(src, **kw)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert state == {'next_step': 3}
  expected = [next(it) for _ in range(5)]
  restored = data.train_iterator(src, **kw, worker_count=1)
  next(restored)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert restored.get_state() == {'next_step': 8}
  restored.close()


def test_two_processes_read_disjoint_halves_of_the_single_process_batches(bad_folder):
  """Global batch s of two processes = batch s of one process (the readable records of it;
  a bad record's stand-in is the next one in its own process's share)."""
  root, hws = bad_folder
  src, _ = data.load(f'folder:{root}')
  kw = dict(canvas_size=SIZE, global_batch=16, seed=1, with_skipped=True)
  one = pipeline.train_dataset(src, **kw)
  per_process = [pipeline.train_dataset(src, **kw, process_index=p, process_count=2)
                 for p in range(2)]

  def levels(batch):
    return [identify(hws, level_of(c, hw))
            for c, hw, why in zip(batch['image'], batch['hw'], batch['skipped']) if not why]

  for step in range(4):
    whole = levels(one[step])
    halves = [levels(ds[step]) for ds in per_process]
    assert all(per_process[p][step]['image'].shape[0] == 8 for p in range(2))
    assert sorted(halves[0] + halves[1]) == sorted(whole)
  # the records (before decoding) of one pass: disjoint shards covering every file
  import grain  # pylint: disable=import-outside-toplevel
  full = grain.MapDataset.source(src).seed(1).shuffle().repeat(None)
  shards = [{full[p + 2 * j]['path'] for j in range(16)} for p in range(2)]
  assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 32


def test_eval_batches_mask_out_unreadable_images(bad_folder):
  root, hws = bad_folder
  src, _ = data.load(f'folder:{root}')
  batches = list(data.eval_batches(src, canvas_size=SIZE, batch_size=10))
  assert len(batches) == 4
  real = [identify(hws, level_of(c, hw)) for b in batches
          for c, hw, m in zip(b['image'], b['hw'], b['mask']) if m]
  assert sorted(real) == sorted(hws)


# ---- prepare -> arrayrecord -----------------------------------------------------------------

def test_prepare_writes_arrayrecord_read_back_identically(bad_folder, tmp_path):
  root, _ = bad_folder
  info = prepare.prepare(str(root), str(tmp_path / 'ar'), shards=3, workers=2)
  entry = info['splits']['train']
  assert entry['num_examples'] == 27 and len(entry['files']) == 3
  assert sorted(os.path.basename(s['path']) for s in entry['skipped']) == sorted(BAD)
  ar, test = data.load(f'arrayrecord:{tmp_path / "ar"}')
  fo, _ = data.load(f'folder:{root}')
  assert test is None and ar.has_labels and ar.class_names == fo.class_names
  good = [i for i in range(len(fo)) if not os.path.basename(fo.relpath(i)) in BAD]
  assert len(ar) == len(good)
  for j, i in enumerate(good):
    rec = ar[j]
    assert rec['path'] == fo.relpath(i) and rec['label'] == fo[i]['label']
    with open(fo[i]['path'], 'rb') as f:
      assert rec['encoded'] == f.read()  # the original bytes
  batch = data.train_dataset(ar, canvas_size=SIZE, global_batch=9, seed=0)[0]
  assert batch['image'].shape == (9, SIZE, SIZE, 3)


def test_prepare_cli_with_max_size_and_splits(tmp_path):
  make_folder(tmp_path / 'src' / 'train', 12, bad=('empty.jpg',))
  make_folder(tmp_path / 'src' / 'val', 4, bad=())
  proc = subprocess.run(
      [sys.executable, '-m', 'dino_jax.data.prepare', f'--src={tmp_path}/src',
       f'--dst={tmp_path}/ar', '--max_size=20', '--workers=2'],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  assert 'skipped cat/empty.jpg: empty file (0 bytes)' in proc.stdout
  assert f'use --config.data.source=arrayrecord:{tmp_path}/ar' in proc.stdout
  train_src, val = data.load(f'arrayrecord:{tmp_path}/ar')
  assert len(train_src) == 12 and len(val) == 4 and val.split == 'val'
  for i in range(len(train_src)):
    im = Image.open(io.BytesIO(train_src[i]['encoded']))
    assert im.format == 'JPEG' and max(im.size) <= 20


def test_arrayrecord_errors(tmp_path):
  with pytest.raises(data.DataError, match='no dataset.json'):
    data.load(f'arrayrecord:{tmp_path}')
  (tmp_path / 'dataset.json').write_text(json.dumps({'format': 'other'}))
  with pytest.raises(data.DataError, match="format 'other' is not"):
    data.load(f'arrayrecord:{tmp_path}')
  with pytest.raises(ValueError, match='expected one of digits, npz:PATH, tfds'):
    data.load('arrayrecord:')


def test_image_extensions_cover_common_formats():
  exts = folder.image_extensions()
  assert {'.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff', '.gif'} <= exts
  assert '.txt' not in exts and '.h5' not in exts  # HDF5 is an identify-only stub in PIL
  assert records.parse(records.encode(3, 'a/b.jpg', b'xyz')) == {
      'label': 3, 'path': 'a/b.jpg', 'encoded': b'xyz'}


# ---- end to end -----------------------------------------------------------------------------

def test_training_on_a_folder_of_bad_files_counts_every_skip(tmp_path, bad_folder):
  """train/ (the 32-file folder: 27 good, 5 bad) + val/ (with one bad file): the run trains,
  logs the skips in its metrics (5 per pass, 2 passes) and runs k-NN on the readable val."""
  root, _ = bad_folder
  os.symlink(root, tmp_path / 'train')
  make_folder(tmp_path / 'val', 6, bad=('truncated.jpg',), first_level=3)
  config = tiny_config(**{'data.source': f'folder:{tmp_path}'})
  state = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert int(state.step) == 4  # 32 files // 16 = 2 steps per epoch, 2 epochs
  with open(tmp_path / 'work' / 'metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  steps = [l for l in lines if 'loss' in l]
  assert [l['step'] for l in steps] == [1, 2, 3, 4]
  assert all(np.isfinite(l['loss']) for l in steps)
  assert sum(l['data_skipped'] for l in steps) == 2 * len(BAD)
  assert [l['step'] for l in lines if 'knn_top1' in l] == [4]


def test_folder_in_a_bucket_reads_like_the_local_folder(bucket, tmp_path):
  """folder:gs://... lists through the storage's walk and reads each image through epath:
  same files, labels and batches as the same folder on disk."""
  url, root = bucket
  make_folder(tmp_path / 'disk' / 'train', 9, bad=('empty.jpg',))
  make_folder(tmp_path / 'disk' / 'val', 3, classes=('dog',), bad=())
  make_folder(root / 'imgs' / 'train', 9, bad=('empty.jpg',))
  make_folder(root / 'imgs' / 'val', 3, classes=('dog',), bad=())
  disk, disk_val = data.load(f'folder:{tmp_path / "disk"}')
  remote, remote_val = data.load(f'folder:{url}/imgs')
  assert remote.root == f'{url}/imgs/train' and remote_val.root == f'{url}/imgs/val'
  assert remote.class_names == disk.class_names == ['cat', 'dog']
  assert [remote.relpath(i) for i in range(len(remote))] == \
      [disk.relpath(i) for i in range(len(disk))]
  assert remote[0]['path'] == f'{url}/imgs/train/{disk.relpath(0)}'
  np.testing.assert_array_equal(remote.labels, disk.labels)
  assert [remote_val[i]['label'] for i in range(len(remote_val))] == [1, 1, 1]
  want = data.train_dataset(disk, canvas_size=SIZE, global_batch=8, seed=0)[0]
  got = data.train_dataset(remote, canvas_size=SIZE, global_batch=8, seed=0)[0]
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(data.DataError, match=f'folder:{url}/nothing: no such directory'):
    data.load(f'folder:{url}/nothing')


def test_prepare_from_a_bucket_into_a_bucket(bucket, tmp_path):
  """prepare reads a gs:// folder and writes to gs://: the shards are written locally and
  uploaded (ArrayRecord writes local files only), dataset.json last; the result is what a
  local prepare writes. (ArrayRecord reads gs:// itself through its own GCS reader, which
  this mock cannot serve, so the records are read back from the bucket's local folder.)"""
  url, root = bucket
  make_folder(root / 'imgs', 7, bad=('empty.jpg',))
  make_folder(tmp_path / 'disk', 7, bad=('empty.jpg',))
  info = prepare.prepare(f'{url}/imgs', f'{url}/ar', shards=2, workers=2)
  local_info = prepare.prepare(str(tmp_path / 'disk'), str(tmp_path / 'ar'), shards=2, workers=2)
  assert info['source'] == f'{url}/imgs'
  assert info['splits'] == local_info['splits']
  assert records.read_info(f'{url}/ar') == info
  got, _ = data.load(f'arrayrecord:{root / "ar"}')
  want, _ = data.load(f'arrayrecord:{tmp_path / "ar"}')
  assert len(got) == len(want) == 7
  assert [got[i] for i in range(7)] == [want[i] for i in range(7)]
  with pytest.raises(data.DataError, match=f'arrayrecord:{url}/none: no dataset.json'):
    records.read_info(f'{url}/none')


def test_npz_in_a_bucket(bucket):
  url, root = bucket
  x = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), np.uint8)
  np.savez(root / 'd.npz', x_train=x, y_train=np.arange(5))
  src, test = data.load(f'npz:{url}/d.npz')
  assert test is None and len(src) == 5
  np.testing.assert_array_equal(src[3]['image'], x[3])
  with pytest.raises(FileNotFoundError, match='no such file'):
    data.load(f'npz:{url}/missing.npz')


def test_bucket_walk_puts_back_the_scheme_fsspec_drops():
  """gcsfs's walk yields 'bucket/dir' without 'gs://'; paths.walk gives URLs under the root."""
  from etils.epath import testing as epath_testing  # pylint: disable=import-outside-toplevel
  tree = {'b/d': (['x'], ['1.jpg']), 'b/d/x': ([], ['2.png'])}

  def walk(fn, top, **kwargs):
    del fn, kwargs
    for d in ('b/d', 'b/d/x'):
      assert top == 'gs://b/d'
      yield d, *tree[d]

  with epath_testing.mock_epath(walk=walk):
    got = list(paths.walk('gs://b/d'))
  assert got == [('gs://b/d', ['x'], ['1.jpg']), ('gs://b/d/x', [], ['2.png'])]
  assert paths.relative('gs://b/d/x', 'gs://b/d/') == 'x'
  assert paths.relative('gs://b/d', 'gs://b/d') == '.'
  assert paths.join('gs://b/d/', 'x', 'y.jpg') == 'gs://b/d/x/y.jpg'
