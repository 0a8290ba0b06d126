"""Convert an image folder into an ArrayRecord dataset (no TensorFlow), read as arrayrecord:DIR.

  python -m dino_jax.data.prepare --src=FOLDER --dst=DIR [--shards=N] [--max_size=S]
      [--workers=W]

FOLDER is laid out as for folder:PATH (class subfolders give labels; a train/ subfolder with
val/, validation/ or test/ beside it gives two splits). Every image is decoded once to check
it: unreadable files are left out, printed, and listed in DIR/dataset.json, as are FIFOs,
sockets and devices and symbolic links back to folders already listed, which the listing
passes over without opening (nothing in FOLDER is changed). The bytes are
stored unchanged, or, with --max_size, decoded upright to RGB, shrunk so the longer side is
at most S and stored as JPEG (quality 95): smaller records that decode faster.
Many small files become a few large ones that grain reads at random (group_size 1).
FOLDER and DIR may be bucket URLs (gs://...; `pip install -e '.[gcs]'`).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import math
import os
import sys
import tempfile

from PIL import Image

from dino_jax import paths
from dino_jax.data import folder, records
from dino_jax.data.base import DataError
from dino_jax.data.decode import BadImage, decode

CHECK_SIZE = 1024  # the size images are decoded at to check them when --max_size is 0


def _convert(job: tuple[str, int]) -> tuple[bytes | None, str]:
  """(record bytes or None, reason) for (absolute path, max_size)."""
  path, max_size = job
  try:
    data = paths.read_bytes(path)
    image = decode(data, max_size or CHECK_SIZE)
  except (OSError, BadImage) as e:
    return None, str(e)
  if max_size:
    im = Image.fromarray(image)
    if max(im.size) > max_size:
      s = max_size / max(im.size)
      im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                     Image.BICUBIC)
    out = io.BytesIO()
    im.save(out, 'JPEG', quality=95)
    data = out.getvalue()
  return data, ''


def write_split(source: folder.FolderSource, dst: str, split: str, shards: int, max_size: int,
                pool) -> dict:
  """Write one split's shards into the local folder dst; returns its dataset.json entry."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  n = len(source)
  shards = max(1, min(shards, n))
  names = records.shard_names(split, shards)
  per_shard = math.ceil(n / shards)
  writers = [array_record_module.ArrayRecordWriter(os.path.join(dst, name), 'group_size:1')
             for name in names]
  written, skipped = 0, []

  def converted():  # in order, a chunk at a time (PIL decodes without holding the GIL)
    for start in range(0, n, 1024):
      yield from pool.map(_convert, [(source[i]['path'], max_size)
                                     for i in range(start, min(n, start + 1024))])

  for i, (data, why) in enumerate(converted()):
    rel = source.relpath(i)
    if data is None:
      skipped.append({'path': rel, 'reason': why})
      print(f'  skipped {rel}: {why}', flush=True)
      continue
    writers[min(written // per_shard, shards - 1)].write(
        records.encode(int(source.labels[i]), rel, data))
    written += 1
    if written % 10000 == 0:
      print(f'  {split}: {written}/{n}', flush=True)
  for w in writers:
    w.close()
  if not written:
    raise DataError(f'none of the {n} images under {source.root} can be read '
                    f'(first: {skipped[0]["path"]}: {skipped[0]["reason"]})')
  return {'files': names, 'num_examples': written, 'skipped': skipped}


def prepare(src: str, dst: str, shards: int = 8, max_size: int = 0, workers: int = 0) -> dict:
  """Write DIR/<split>.array_record-* and DIR/dataset.json; returns the json's content.
  src and dst may be bucket URLs. ArrayRecord writes local files only, so for a bucket dst
  each split's shards are written to a temporary local folder and then uploaded; dataset.json
  goes last, so a dst that has one is complete."""
  train, test = folder.load(src)
  paths.makedirs(dst)
  splits = {'train': train}
  if test is not None:
    splits[test.root.rstrip('/').rsplit('/', 1)[-1]] = test
  info = {'format': records.FORMAT, 'source': paths.absolute(src),
          'class_names': train.class_names, 'max_size': max_size, 'splits': {}}
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    for name, source in splits.items():
      print(f'{name}: {len(source)} files under {source.root}', flush=True)
      staging = (tempfile.TemporaryDirectory(prefix='dino_jax_prepare_')
                 if paths.is_remote(dst) else contextlib.nullcontext(dst))
      with staging as local:
        info['splits'][name] = entry = write_split(source, local, name, shards, max_size, pool)
        if source.left_out:  # special files and repeated folders, never opened
          entry['left_out'] = source.left_out
        if local != dst:
          for f in entry['files']:
            print(f'  uploading {f} to {dst}', flush=True)
            paths.upload(os.path.join(local, f), paths.join(dst, f))
      print(f'{name}: wrote {entry["num_examples"]} records in {len(entry["files"])} files, '
            f'skipped {len(entry["skipped"])}', flush=True)
  with paths.open_file(paths.join(dst, records.INFO), 'w') as f:
    json.dump(info, f, indent=1)
  return info


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--src', required=True, help='image folder (see folder:PATH)')
  parser.add_argument('--dst', required=True, help='output directory')
  parser.add_argument('--shards', type=int, default=8, help='ArrayRecord files per split')
  parser.add_argument('--max_size', type=int, default=0,
                      help='shrink so the longer side is at most this and store JPEG (0: keep '
                           'the original bytes)')
  parser.add_argument('--workers', type=int, default=0, help='threads (0: one per core)')
  args = parser.parse_args()
  try:
    prepare(args.src, args.dst, args.shards, args.max_size, args.workers)
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'done: use --config.data.source=arrayrecord:{args.dst}')


if __name__ == '__main__':
  main()
