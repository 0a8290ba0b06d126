"""Trained models for users: load, extract features and attention, export to one file.

    model, config = dino_jax.load_model('/path/to/workdir')          # teacher ViT, newest step
    images = inference.preprocess([np.asarray(PIL.Image.open(p)) for p in paths], size=224)
    out = model(images, return_attention=True)   # ViTOutput: cls, patches, attention

CLI: python -m dino_jax.inference export --path=WORKDIR --out=teacher.msgpack [--which=student]
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, serialization

from dino_jax import checkpointing, config_file, convert, image_ops, models, paths
from dino_jax.convert import ModelFileError  # a weights file that cannot be read: names it
from dino_jax.data.pipeline import to_canvas
from dino_jax.data.sources import as_rgb

EXPORT_FORMAT = 'dino_jax.backbone.v1'


def _network(config: ml_collections.ConfigDict, dtype) -> tuple[nnx.GraphDef, dict]:
  """Graphdef and abstract params (ShapeDtypeStructs) of the teacher network of `config`."""
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: models.build(config, teacher=True, dtype=dtype)))
  return graphdef, abstract.to_pure_dict()


def load_model(path: str, which: str = 'teacher', step: int | None = None, *,
               with_head: bool = False, dtype=None):
  """A ready NNX model and its config from a workdir, a WORKDIR/checkpoints/<step> directory,
  a file written by `export`, or official weights converted to .safetensors by
  `python -m dino_jax.convert import`.

  Returns (ViT backbone, config); with_head=True returns the whole DINO network (backbone +
  projection head) instead. Weights land on the default device (CPU or accelerator).
  dtype: compute dtype (default: the run's config.dtype).

  A file is checked before use: every tensor's name and shape against the model of its own
  config (CheckpointMismatchError naming the file and the tensor); a truncated, corrupt or
  foreign file raises ModelFileError naming the file. The file is only read.
  """
  if paths.isfile(path):
    if with_head:
      raise ValueError(f'{path} is an exported backbone: it has no head')
    if path.endswith('.safetensors'):
      return _load_converted(path, dtype)
    return _load_exported(path, dtype)
  saved, step = checkpointing.read_config(path, step)
  config = config_file.from_saved(saved)
  graphdef, abstract = _network(config, dtype or config.dtype)
  params, _ = checkpointing.restore_params(path, abstract, which=which, step=step)
  network = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
  return (network if with_head else network.backbone), config


def export(path: str, out: str, which: str = 'teacher', step: int | None = None) -> str:
  """Write the backbone of a checkpoint's teacher (or student) and its config to one msgpack
  file that `load_model(out)` reads back. Returns `out`."""
  saved, step = checkpointing.read_config(path, step)
  config = config_file.from_saved(saved)
  _, abstract = _network(config, config.dtype)
  params, _ = checkpointing.restore_params(path, abstract, which=which, step=step)
  return write_export(params['backbone'], saved, out, which, step)


def write_export(backbone: dict, saved_config: dict, out: str, which: str = 'teacher',
                 step: int = 0) -> str:
  """Write backbone params and the run config (as a dict) to the msgpack file `out`."""
  blob = serialization.msgpack_serialize({
      'format': EXPORT_FORMAT, 'which': which, 'step': step, 'config': json.dumps(saved_config),
      'params': jax.tree.map(np.asarray, backbone)})
  if paths.is_remote(out):  # a bucket object is written whole or not at all
    with paths.open_file(out, 'wb') as f:
      f.write(blob)
    return out
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(blob)
  os.replace(tmp, out)
  return out


def _load_converted(path: str, dtype):
  """Official weights converted by `python -m dino_jax.convert import`, with a config that
  holds their architecture and the official evaluation view (224 px, crop 0.875)."""
  c = convert.load_converted(path)
  model = convert.build_backbone(c, dtype=jnp.dtype(dtype or jnp.float32))
  config = ml_collections.ConfigDict({
      'model': convert.model_fields(c), 'dtype': str(jnp.dtype(dtype or jnp.float32)),
      'crops': {'global_size': 224, 'eval_crop_fraction': 0.875},
      'data': {'canvas_size': 256}})
  return model, config


def _read_export(path: str) -> dict:
  """The contents of a file written by `export`, checked to be one."""
  try:
    data = paths.read_bytes(path)
  except OSError as e:
    raise ModelFileError(f'{path}: cannot read it ({e.strerror or e})') from None
  try:
    blob = serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except
    raise ModelFileError(f'{path} is not a dino_jax export file (not msgpack, or truncated: '
                         f'{convert.error_line(e)})') from None
  if not isinstance(blob, dict) or blob.get('format') != EXPORT_FORMAT:
    raise ModelFileError(f'{path} is not a dino_jax export file (format {EXPORT_FORMAT}); '
                         f'official weights load after `python -m dino_jax.convert import`')
  try:
    blob['config'] = config_file.from_saved(json.loads(blob['config']))
  except Exception as e:  # pylint: disable=broad-except  # any damage to the saved config
    raise ModelFileError(f'{path}: damaged dino_jax export (its config: '
                         f'{convert.error_line(e)})') from None
  if not isinstance(blob.get('params'), dict):
    raise ModelFileError(f'{path}: damaged dino_jax export (no parameter tree)')
  return blob


def read_config(path: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The run config of a workdir, a checkpoint step directory or an exported file."""
  if paths.isfile(path):
    return _read_export(path)['config']
  saved, _ = checkpointing.read_config(path, step)
  return config_file.from_saved(saved)


def _load_exported(path: str, dtype):
  blob = _read_export(path)
  config = blob['config']
  backbone = nnx.eval_shape(
      lambda: models.build(config, teacher=True, dtype=dtype or config.dtype)).backbone
  backbone_def, abstract = nnx.split(backbone)
  ref = abstract.to_pure_dict()
  params = blob['params']
  what = f'{path} (against the model of its own config)'
  # by tensor name first (missing, unexpected, shape), then the tree as nnx.merge needs it
  convert.check_tensors(params, ref, what)
  checkpointing.check_fits(params, ref, what)
  return nnx.merge(backbone_def, jax.tree.map(jnp.asarray, params)), config


def preprocess(images, size: int = 224, crop_fraction: float = 0.875,
               dtype=jnp.float32) -> jax.Array:
  """uint8 RGB (or grayscale) images of any sizes -> (B, size, size, 3) normalised arrays: the
  evaluation view (shorter side resized to size / crop_fraction, centre crop), bicubic."""
  canvas_size = max(max(np.shape(im)[:2]) for im in images)
  canvases, hws = zip(*(to_canvas(as_rgb(np.asarray(im)), canvas_size) for im in images))
  return image_ops.center_view(jnp.asarray(np.stack(canvases)), jnp.asarray(np.stack(hws)),
                               size, crop_fraction, dtype)


def cls_attention(output) -> jax.Array:
  """(B, heads, h*w) last-block attention of the CLS token to each patch (registers dropped)
  from a ViTOutput computed with return_attention=True."""
  n_patches = output.patches.shape[1]
  return output.attention[:, :, 0, -n_patches:]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m dino_jax.inference')
  sub = parser.add_subparsers(dest='command', required=True)
  ex = sub.add_parser('export', help='write a checkpoint backbone to one msgpack file')
  ex.add_argument('--path', required=True, help='workdir or WORKDIR/checkpoints/<step>')
  ex.add_argument('--out', required=True)
  ex.add_argument('--which', default='teacher', choices=('teacher', 'student'))
  ex.add_argument('--step', type=int, default=None)
  args = parser.parse_args(argv)
  out = export(args.path, args.out, which=args.which, step=args.step)
  print(f'wrote {out} ({paths.size(out) / 2**20:.1f} MiB)')


if __name__ == '__main__':
  main()
