"""Model files: the one place that reads and writes model weights.

    model, config = dino_jax.load_model('/path/to/workdir')          # teacher ViT, newest step
    model, config = dino_jax.load_model('teacher.safetensors')       # an exported file

Sources: a workdir or WORKDIR/checkpoints/<step> (through checkpointing, the only orbax user)
and our one file format: .safetensors, tensors under Flax paths ('backbone.*', 'head.*',
'center'), as metadata the architecture (ViTConfig, head sizes) and a run's config (JSON).
`inference export` and `convert import` write it; older msgpack exports are still read.
A run's architecture comes from `models.vit_config` / `models.build` only. Every tensor is
checked before use (CheckpointMismatchError naming file and tensor); an unreadable file raises
ModelFileError naming it. Files are only read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, serialization

from dino_jax import checkpointing, config_file, models, paths
from dino_jax.errors import DinoJaxError, error_line
from dino_jax.models import DINOHead, VARIANTS, ViT, ViTConfig
from dino_jax.models.vit import VARIANT_FFNS

FORMAT = 'dino_jax.weights/1'
OLD_SAFETENSORS = 'dino_jax.convert/1'  # converted official weights, before exports joined
OLD_MSGPACK = 'dino_jax.backbone.v1'  # `inference export` before it wrote .safetensors


class ModelFileError(DinoJaxError, ValueError):
  """A file that cannot be read as model weights: truncated, corrupt, or not a model file of
  the kind its name or metadata says. The message names the file."""


class HeadConfig(NamedTuple):
  out_dim: int
  hidden_dim: int
  bottleneck_dim: int
  nlayers: int


class Weights(NamedTuple):
  """A model in memory: what a model file holds."""
  vit: ViTConfig
  backbone: dict  # nested Flax params of the ViT
  head_config: HeadConfig | None = None
  head: dict | None = None  # nested Flax params of the DINOHead, when there is one
  center: np.ndarray | None = None  # (1, K) DINO loss center
  ignored: tuple[str, ...] = ()  # official checkpoint keys deliberately left out (ibot_head.*)
  config: dict | None = None  # the run config (training runs; None for official weights)


# ---------------------------------------------------------------------------------------------
# Small helpers shared with convert.py

def check_regular(path) -> None:
  """A FIFO, socket or device is refused unopened (reading a FIFO would block forever)."""
  if paths.is_remote(path):
    return
  kind = paths.special_kind(os.stat(path).st_mode)
  if kind:
    raise ModelFileError(f'{path}: not a regular file (a {kind})')


def unreadable(path, kind: str, e: BaseException) -> ModelFileError:
  return ModelFileError(f'{path}: cannot be read as {kind} (truncated or corrupt? '
                        f'{error_line(e)})')


def in_safetensors(path, fn):
  """fn(safe_open handle) for a local .safetensors file; a damaged one raises ModelFileError."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  check_regular(path)
  try:
    with safe_open(os.fspath(path), framework='numpy') as f:
      return fn(f)
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # SafetensorError is no ValueError
    raise unreadable(path, 'a .safetensors file', e) from None


def flat(tree: dict) -> dict:
  """{'blocks.0.attn.qkv.kernel': leaf, ...} of a nested params dict."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'.'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path): v
          for path, v in leaves}


def unflat(flat_dict: dict) -> dict:
  tree: dict = {}
  for name, v in flat_dict.items():
    *parents, leaf = name.split('.')
    node = tree
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[int(leaf) if leaf.isdigit() else leaf] = v
  return tree


def shape_str(shape) -> str:
  return str(tuple(int(s) for s in shape))


# ---------------------------------------------------------------------------------------------
# Architecture <-> modules and configs

def arch_name(cfg: ViTConfig) -> str | None:
  """The VARIANTS name of (width, depth, heads), if any; of two with those sizes (DINOv3 S and
  S+, L and L+), the one whose VARIANT_FFNS entry is the model's FFN."""
  names = [n for n, v in VARIANTS.items() if v == (cfg.width, cfg.depth, cfg.heads)]
  ffn = (cfg.ffn, cfg.mlp_ratio, cfg.swiglu_align)
  return next((n for n in names if VARIANT_FFNS.get(n) == ffn),
              next((n for n in names if n not in VARIANT_FFNS), None))


_DINOV3_FIELDS = ('pos_embed', 'rope_base', 'rope_min_period', 'rope_max_period', 'rope_normalize',
                  'rope_shift', 'rope_jitter', 'rope_rescale', 'untie_cls_and_patch_norms',
                  'untie_global_and_local_cls_norm', 'mask_k_bias', 'qkv_bias', 'ln_eps',
                  'register_init_std')


def model_fields(w: Weights) -> dict:
  """The `config.model` fields that describe official weights (arch None if not a variant)."""
  v = w.vit
  fields = {'arch': arch_name(v), 'patch_size': v.patch_size, 'img_size': v.img_size,
            'width': v.width, 'depth': v.depth, 'heads': v.heads, 'mlp_ratio': v.mlp_ratio,
            'layerscale': v.layerscale, 'n_registers': v.n_registers, 'ffn': v.ffn,
            'mask_token': v.mask_token, 'interpolate_offset': v.interpolate_offset,
            'interpolate_antialias': v.interpolate_antialias}
  if v.pos_embed == 'rope':  # DINOv3 (config.model names are ViTConfig's)
    fields.update({k: getattr(v, k) for k in _DINOV3_FIELDS})
  if w.head_config is not None:
    h = w.head_config
    fields.update(out_dim=h.out_dim, head_hidden_dim=h.hidden_dim,
                  head_bottleneck_dim=h.bottleneck_dim, head_layers=h.nlayers)
  return fields


def config_of(w: Weights) -> ml_collections.ConfigDict:
  """The config of a model file: its run's, or for official weights their architecture and the
  official evaluation view (224 px, crop 0.875)."""
  if w.config is not None:
    return config_file.from_saved(w.config)
  return ml_collections.ConfigDict({
      'model': model_fields(w), 'dtype': 'float32',
      'crops': {'global_size': 224, 'eval_crop_fraction': 0.875}, 'data': {'canvas_size': 256}})


def abstract_params(module_fn) -> dict:
  return nnx.state(nnx.eval_shape(module_fn), nnx.Param).to_pure_dict()


def head_module(width: int, h: HeadConfig, dtype=jnp.float32) -> DINOHead:
  return DINOHead(width, h.out_dim, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim,
                  nlayers=h.nlayers, dtype=dtype, rngs=nnx.Rngs(0))


def head_config(head: dict) -> HeadConfig:
  """The sizes of a DINOHead from its params (a head built by `models.build`)."""
  mlp = head['mlp']
  bottleneck, out_dim = np.shape(head['last_layer']['weight_v'])
  hidden = np.shape(mlp[0]['kernel'])[1] if len(mlp) > 1 else 0
  return HeadConfig(int(out_dim), int(hidden), int(bottleneck), len(mlp))


def _merged(module_fn, params: dict):
  graphdef, _ = nnx.split(nnx.eval_shape(module_fn))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def build_backbone(w: Weights, dtype=jnp.float32) -> ViT:
  """A ready Flax ViT holding the weights (on the default device)."""
  return _merged(lambda: ViT(w.vit, dtype=dtype, rngs=nnx.Rngs(0)), w.backbone)


def build_head(w: Weights, dtype=jnp.float32) -> DINOHead:
  if w.head is None:
    raise ValueError('this checkpoint has no head (hub files are backbone-only)')
  return _merged(lambda: head_module(w.vit.width, w.head_config, dtype), w.head)


# ---------------------------------------------------------------------------------------------
# Checks

def check_tensors(loaded: dict, expected: dict, what: str) -> None:
  """Raise CheckpointMismatchError, naming `what` (the file) and the tensor, unless `loaded`
  (arrays) has exactly the tensors of `expected` (arrays or ShapeDtypeStructs), each with its
  shape and a floating dtype. Both are {dotted name: leaf} dicts or nested dicts."""
  loaded, expected = flat(loaded), flat(expected)
  missing, extra = checkpointing.key_diff(loaded, expected)
  listed = lambda names: ', '.join(repr(n) for n in names[:3]) + (
      f' and {len(names) - 3} more' if len(names) > 3 else '')
  mismatch = checkpointing.CheckpointMismatchError
  if missing:
    raise mismatch(
        f'{what}: no tensor {listed(missing)}, which the model needs (shape '
        f'{shape_str(expected[missing[0]].shape)}{" for the first" if len(missing) > 1 else ""})')
  if extra:
    raise mismatch(f'{what}: unexpected tensor {listed(extra)}, which the model has no place for')
  checkpointing.check_fits(loaded, {k: expected[k] for k in loaded}, what)  # names each shape
  for k, v in loaded.items():
    if not np.issubdtype(np.asarray(v).dtype, np.floating):
      raise mismatch(f'{what}: tensor {k!r} holds {np.asarray(v).dtype}, not floating-point '
                     f'weights')


def expected_tensors(vit: ViTConfig, head: HeadConfig | None, center) -> dict:
  """{file tensor name: ShapeDtypeStruct} of a model file of this architecture."""
  expected = {'backbone.' + k: v for k, v in flat(abstract_params(
      lambda: ViT(vit, rngs=nnx.Rngs(0)))).items()}
  if head is not None:
    expected.update({'head.' + k: v for k, v in flat(abstract_params(
        lambda: head_module(vit.width, head))).items()})
  if center is not None:  # optional: (1, K), K the head's output size when there is a head
    k = head.out_dim if head is not None else int(np.size(center))
    expected['center'] = jax.ShapeDtypeStruct((1, k), np.float32)
  return expected


# ---------------------------------------------------------------------------------------------
# Training runs

def network(config: ml_collections.ConfigDict, dtype) -> tuple[nnx.GraphDef, dict]:
  """Graphdef and abstract params (ShapeDtypeStructs) of the teacher network of `config`."""
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: models.build(config, teacher=True, dtype=dtype)))
  return graphdef, abstract.to_pure_dict()


def from_workdir(path: str, step: int | None = None, which: str = 'teacher',
                 with_config: bool = False) -> Weights:
  """The teacher (or student) of a workdir's checkpoint (default: the newest) or of a
  WORKDIR/checkpoints/<step> directory, with its head and center; with_config: and the run's
  config (else the file written from it describes only the architecture, as official weights
  do, and loads with the official evaluation view)."""
  saved, step = checkpointing.read_config(path, step)
  config = config_file.from_saved(saved)
  _, abstract = network(config, jnp.float32)
  key = {'teacher': 'teacher_params', 'student': 'params'}.get(which)
  if key is None:
    raise ValueError(f"which={which!r}: choose 'teacher' or 'student'")
  center = jax.ShapeDtypeStruct((1, config.model.out_dim), jnp.float32)
  parts, _ = checkpointing.restore_parts(path, {key: abstract, 'center': center}, step)
  params = jax.tree.map(np.asarray, parts[key])
  return Weights(models.vit_config(config, teacher=True), params['backbone'],
                 head_config(params['head']), params['head'], np.asarray(parts['center']),
                 config=saved if with_config else None)


def load_model(path: str, which: str = 'teacher', step: int | None = None, *,
               with_head: bool = False, dtype=None):
  """A ready NNX model and its config from a workdir, a WORKDIR/checkpoints/<step> directory,
  or a model file (`python -m dino_jax.inference export`, `python -m dino_jax.convert import`).

  Returns (ViT backbone, config); with_head=True returns the whole DINO network (backbone +
  projection head) of a checkpoint instead. Weights land on the default device (CPU or
  accelerator). dtype: compute dtype (default: the config's dtype; float32 for official weights).
  """
  if paths.isfile(path):
    if with_head:
      raise ValueError(f'{path} is an exported backbone: it has no head')
    w = read_file(path)
    config = config_of(w)
    if w.config is None:  # official weights: the config says the dtype they are loaded in
      config.dtype = str(jnp.dtype(dtype or config.dtype))
    return build_backbone(w, jnp.dtype(dtype or config.dtype)), config
  saved, step = checkpointing.read_config(path, step)
  config = config_file.from_saved(saved)
  graphdef, abstract = network(config, dtype or config.dtype)
  params, _ = checkpointing.restore_params(path, abstract, which=which, step=step)
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
  return (model if with_head else model.backbone), config


def read_config(path: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config of a workdir, a checkpoint step directory or a model file."""
  if paths.isfile(path):
    return config_of(read_file(path))
  saved, _ = checkpointing.read_config(path, step)
  return config_file.from_saved(saved)


def export(path: str, out: str, which: str = 'teacher', step: int | None = None) -> str:
  """Write the backbone of a checkpoint's teacher (or student) and its run config to the model
  file `out`, which `load_model(out)` reads back. Returns `out`."""
  w = from_workdir(path, step, which, with_config=True)
  save(w._replace(head_config=None, head=None, center=None), out,
       source=f'{which} of {path}' + ('' if step is None else f' at step {step}'))
  return out


# ---------------------------------------------------------------------------------------------
# The file

def save(w: Weights, path: str | os.PathLike, source: str = '') -> None:
  """Write `w` as one .safetensors file (a bucket URL too): tensors under Flax paths, the
  architecture and the run config as metadata."""
  from safetensors import numpy as st  # pylint: disable=import-outside-toplevel
  tensors = {'backbone.' + k: np.ascontiguousarray(v) for k, v in flat(w.backbone).items()}
  if w.head is not None:
    tensors.update({'head.' + k: np.ascontiguousarray(v) for k, v in flat(w.head).items()})
  if w.center is not None:
    tensors['center'] = np.ascontiguousarray(w.center)
  meta = {'format': FORMAT, 'vit': json.dumps(dataclasses.asdict(w.vit)),
          'head': json.dumps(w.head_config._asdict() if w.head_config else None),
          'source': source}
  if w.config is not None:
    meta['config'] = json.dumps(w.config)
  path = os.fspath(path)
  if paths.is_remote(path):  # a bucket object is written whole or not at all
    with paths.open_file(path, 'wb') as f:
      f.write(st.save(tensors, metadata=meta))
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  st.save_file(tensors, tmp, metadata=meta)
  os.replace(tmp, path)


def _is_safetensors(path: str) -> bool:
  """By name, or by content: an 8-byte header length that fits the file, then a JSON '{'."""
  if path.endswith('.safetensors'):
    return True
  try:
    with paths.open_file(path, 'rb') as f:
      head = f.read(9)
    size = paths.size(path)
  except OSError as e:
    raise ModelFileError(f'{path}: cannot read it ({e.strerror or e})') from None
  return len(head) == 9 and head[8:] == b'{' and int.from_bytes(head[:8], 'little') <= size - 8


def _safetensors_contents(path: str) -> tuple[dict, dict | None]:
  """(metadata, tensors or None when the file is not ours) of a .safetensors file."""
  ours = lambda meta: meta.get('format') in (FORMAT, OLD_SAFETENSORS)
  if not paths.is_remote(path):
    return in_safetensors(path, lambda f: (f.metadata() or {}, {
        k: f.get_tensor(k) for k in f.keys()} if ours(f.metadata() or {}) else None))
  from safetensors import numpy as st  # pylint: disable=import-outside-toplevel
  data = paths.read_bytes(path)
  try:
    n = int.from_bytes(data[:8], 'little')
    meta = json.loads(data[8:8 + n]).get('__metadata__') or {}
    return meta, st.load(data) if ours(meta) else None
  except Exception as e:  # pylint: disable=broad-except
    raise unreadable(path, 'a .safetensors file', e) from None


def is_model_file(path) -> bool:
  """Whether `path` is a .safetensors file in our format (not an official checkpoint)."""
  path = os.fspath(path)
  check_regular(path)
  return _is_safetensors(path) and _safetensors_contents(path)[1] is not None


def read_file(path: str | os.PathLike) -> Weights:
  """The checked contents of a model file (ours, or a msgpack of an older `inference export`)."""
  path = os.fspath(path)
  check_regular(path)
  if not _is_safetensors(path):
    return _read_msgpack(path)
  meta, tensors = _safetensors_contents(path)
  if tensors is None:
    raise ModelFileError(f'{path}: not a dino_jax converted model or export (metadata format '
                         f'{meta.get("format")!r}); convert official weights with '
                         f'`python -m dino_jax.convert import`')
  try:
    vit = ViTConfig(**json.loads(meta['vit']))
    head = json.loads(meta['head'])
    head = HeadConfig(**head) if head else None
    config = json.loads(meta['config']) if 'config' in meta else None
    if config is not None:
      config_file.from_saved(config)
    expected = expected_tensors(vit, head, tensors.get('center'))
  except Exception as e:  # pylint: disable=broad-except  # any metadata that builds no model
    raise ModelFileError(f'{path}: damaged dino_jax metadata ({error_line(e)})') from None
  check_tensors(tensors, expected, f'{path} (against the model its metadata describes)')
  part = lambda p: unflat({k[len(p):]: v for k, v in tensors.items() if k.startswith(p)})
  return Weights(vit, part('backbone.'), head, part('head.') if head else None,
                 tensors.get('center'), config=config)


def _read_msgpack(path: str) -> Weights:
  """A backbone file written by `inference export` before it wrote .safetensors."""
  try:
    blob = serialization.msgpack_restore(paths.read_bytes(path))
  except Exception as e:  # pylint: disable=broad-except
    raise ModelFileError(f'{path} is not a dino_jax export file (not msgpack, or truncated: '
                         f'{error_line(e)})') from None
  if not isinstance(blob, dict) or blob.get('format') != OLD_MSGPACK:
    raise ModelFileError(f'{path} is not a dino_jax export file (format {OLD_MSGPACK}); '
                         f'official weights load after `python -m dino_jax.convert import`')
  try:
    saved = json.loads(blob['config'])
    vit = models.vit_config(config_file.from_saved(saved), teacher=True)
  except Exception as e:  # pylint: disable=broad-except  # any damage to the saved config
    raise ModelFileError(f'{path}: damaged dino_jax export (its config: '
                         f'{error_line(e)})') from None
  params = blob.get('params')
  if not isinstance(params, dict):
    raise ModelFileError(f'{path}: damaged dino_jax export (no parameter tree)')
  ref = abstract_params(lambda: ViT(vit, rngs=nnx.Rngs(0)))
  what = f'{path} (against the model of its own config)'
  check_tensors(params, ref, what)  # by tensor name: missing, unexpected, shape, dtype
  # the tree as nnx.merge needs it, rebuilt from the checked names as read_file does
  return Weights(vit, unflat(flat(params)), config=saved)
