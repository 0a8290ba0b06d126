"""Official DINO / DINOv2 PyTorch weights <-> dino_jax Flax params.

Reads (never unpickling arbitrary objects): DINO v1 hub backbones (`dino_deitsmall16_pretrain.pth`
...), DINO v1 full training checkpoints (`student` / `teacher` / `dino_loss.center`), DINOv2 hub
backbones with or without registers (S/B/L/g, patch 14), DINOv2 training checkpoints with
chunked blocks (`blocks.<chunk>.<i>.`), the Hugging Face transformers layout of DINOv2 and
DINOv2 with registers (`model.safetensors`, `pytorch_model.bin`; convert_hf.py holds its
names), the released DINOv3 ViTs in the official and the transformers layout
(convert_dinov3.py: names, architecture, buffer checks), and `.safetensors` files of any of
these layouts. The layout is detected from the keys; the architecture is inferred from the
weights unless given; every key and shape is checked.

Writes: our model file (dino_jax/weights.py: `.safetensors`, Flax parameter paths, the
architecture as metadata) that `dino_jax.load_model` and `load` turn into a ready Flax module,
and Flax params back in the official (or, `--layout hf`, the transformers) key layout as a
PyTorch `.pth` state_dict or `.safetensors`. This module holds the official key tables and
reading; model files are weights.py's.

  python -m dino_jax.convert import dino_deitsmall16_pretrain.pth vits16.safetensors
  python -m dino_jax.convert import dino_vitbase16_pretrain_full_checkpoint.pth b16.safetensors --key student
  python -m dino_jax.convert import dinov2-small/model.safetensors dinov2_vits14.safetensors
  python -m dino_jax.convert import dinov3_vits16_pretrain_lvd1689m-08c60483.pth v3s16.safetensors
  python -m dino_jax.convert export vits16.safetensors vits16_official.pth
  python -m dino_jax.convert export vits14.safetensors model.safetensors --layout hf
  python -m dino_jax.convert export WORKDIR teacher.safetensors   # a dino_jax training run
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import sys

import jax
import numpy as np
from flax import nnx

from dino_jax import convert_dinov3, convert_hf, paths, weights
from dino_jax.errors import DinoJaxError
from dino_jax.models import ViT, ViTConfig
from dino_jax.weights import HeadConfig, Weights, flat, unflat

HEAD_DIM = 64  # every official DINO / DINOv2 ViT; pass heads= for other models
HEAD_PREFIXES = ('head.', 'dino_head.')  # v1 full checkpoints / DINOv2 training checkpoints
IGNORED_PREFIXES = ('ibot_head.',)  # DINOv2's separate iBOT head: no place in this model


class CheckpointError(DinoJaxError, ValueError):
  """A checkpoint that does not fit the model: a missing key, a shape or a layout mismatch."""


class UnsafeCheckpointError(DinoJaxError, ValueError):
  """The file holds pickled objects that are not plain tensors and containers."""


# ---------------------------------------------------------------------------------------------
# Reading files safely

def read_file(path: str | os.PathLike) -> dict:
  """The checkpoint object at `path`: .safetensors without torch, .pth with weights_only."""
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    return weights.in_safetensors(path, lambda f: {k: f.get_tensor(k) for k in f.keys()})
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f'{path}: reading a PyTorch .pth file needs torch (pip install '
                      f"'dino_jax[torch]'); .safetensors files need no torch") from None
  weights.check_regular(path)
  # argparse.Namespace is a plain attribute bag: the v1 full checkpoints pickle their `args`.
  with torch.serialization.safe_globals([argparse.Namespace]):
    try:
      obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UnsafeCheckpointError(
          f'{path}: refusing to load: the file pickles objects other than tensors and plain '
          f'containers, and unpickling them could run arbitrary code ({first})') from None
    except FileNotFoundError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # zip / EOF errors of a cut file
      raise weights.unreadable(path, 'a PyTorch checkpoint', e) from None
  return _to_numpy(obj)


def _to_numpy(obj):
  import torch  # pylint: disable=import-outside-toplevel
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
  if isinstance(obj, dict):
    return {k: _to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_numpy(v) for v in obj)
  return obj


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts -> one flat state_dict in the hub key layout (+ 'head.*')

def _is_state_dict(obj) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(v, np.ndarray) for v in obj.values())


def select(obj: dict, key: str = 'teacher') -> tuple[dict, np.ndarray | None]:
  """(state_dict, center) from any supported checkpoint layout, `key` choosing teacher/student.

  Layouts: a bare state_dict (hub files); {'teacher': sd, 'student': sd, 'dino_loss':
  {'center'}} (DINO v1 full; DINOv2 teacher_checkpoint.pth); {'model': {'teacher.*'...}}.
  """
  center = None
  if isinstance(obj.get('dino_loss'), dict):
    center = obj['dino_loss'].get('center')
  if _is_state_dict(obj):
    return obj, center
  if key in obj and isinstance(obj[key], dict):
    return obj[key], center
  if isinstance(obj.get('model'), dict):
    sd = {k[len(key) + 1:]: v for k, v in obj['model'].items() if k.startswith(key + '.')}
    if sd:
      return sd, center
  found = sorted(k for k, v in obj.items() if isinstance(v, dict))
  raise CheckpointError(f'no {key!r} weights in this checkpoint; its dict entries are {found}')


def normalize_keys(sd: dict) -> tuple[dict, tuple[str, ...]]:
  """Strip 'module.' / 'backbone.', map 'dino_head.' to 'head.', un-chunk 'blocks.c.i.'.

  Returns the renamed state_dict and the keys left out on purpose (ibot_head.*).
  """
  out, ignored = {}, []
  for k, v in sd.items():
    name = k
    for prefix in ('module.', 'backbone.'):
      name = name[len(prefix):] if name.startswith(prefix) else name
    if name.startswith(IGNORED_PREFIXES):
      ignored.append(k)
      continue
    if name.startswith('dino_head.'):
      name = 'head.' + name[len('dino_head.'):]
    name = re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', name)  # chunked -> flat
    if name in out:
      raise CheckpointError(f'two checkpoint keys map to {name!r} (second: {k!r})')
    out[name] = np.asarray(v)
  return out, tuple(ignored)


# ---------------------------------------------------------------------------------------------
# Architecture from the weights

def _need(sd: dict, key: str) -> np.ndarray:
  if key not in sd:
    raise CheckpointError(f'checkpoint has no {key!r}: not a DINO/DINOv2 ViT state_dict '
                   f'(first keys: {sorted(sd)[:5]})')
  return sd[key]


def infer_vit_config(sd: dict, **overrides) -> ViTConfig:
  """ViTConfig (width, depth, heads, patch, pos-embed size, DINOv2 options) from the weights.

  heads = width / 64 as in every official model; any field can be given in `overrides`.
  """
  patch_w = _need(sd, 'patch_embed.proj.weight')
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r'blocks\.(\d+)\.', k))),
                  default=-1)
  n_pos = _need(sd, 'pos_embed').shape[1] - 1
  grid = math.isqrt(n_pos)
  n_registers = sd['register_tokens'].shape[1] if 'register_tokens' in sd else 0
  swiglu = 'blocks.0.mlp.w12.weight' in sd
  mlp_ratio = 4.0 if swiglu or depth == 0 else sd['blocks.0.mlp.fc1.weight'].shape[0] / width
  fields = dict(
      width=width, depth=depth, heads=max(width // HEAD_DIM, 1), patch_size=patch,
      img_size=grid * patch, mlp_ratio=mlp_ratio,
      layerscale=1e-5 if 'blocks.0.ls1.gamma' in sd else 0.0,  # value comes from the file
      n_registers=n_registers, ffn='swiglu' if swiglu else 'mlp',
      mask_token='mask_token' in sd,
      # DINOv2 register models resize to an exact size with antialiasing; the others use
      # the +0.1 scale-factor offset of DINO v1.
      interpolate_offset=0.0 if n_registers else 0.1, interpolate_antialias=bool(n_registers))
  fields.update(overrides)
  return ViTConfig(**fields)


def infer_head_config(sd: dict) -> HeadConfig | None:
  """DINOHead sizes from 'head.*' keys (None when the checkpoint has no head)."""
  if not any(k.startswith('head.') for k in sd):
    return None
  v = _need(sd, 'head.last_layer.weight_v')
  if 'head.mlp.weight' in sd:  # nlayers=1: a single Linear, no Sequential
    return HeadConfig(v.shape[0], 0, v.shape[1], 1)
  idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r'head\.mlp\.(\d+)\.weight', k))})
  hidden = sd['head.mlp.0.weight'].shape[0] if len(idx) > 1 else 0
  return HeadConfig(out_dim=v.shape[0], hidden_dim=hidden, bottleneck_dim=v.shape[1],
                    nlayers=len(idx))


# ---------------------------------------------------------------------------------------------
# The name table: Flax path -> official key, and the layout change between them

_RULES = (  # (Flax pattern, official replacement, layout); the first match wins
    (r'^patch_embed\.kernel$', 'patch_embed.proj.weight', 'conv'),
    (r'^patch_embed\.bias$', 'patch_embed.proj.bias', 'same'),
    (r'^(.*norm\d?)\.scale$', r'\1.weight', 'same'),  # LayerNorms
    (r'^(.*)\.kernel$', r'\1.weight', 'linear'),  # Linears
    (r'^(head\.last_layer\.weight_[gv])$', r'\1', 'linear'),  # (1, K) / (b, K) -> (K, 1) / (K, b)
    (r'^(.*)$', r'\1', 'same'),  # tokens, pos_embed, biases, LayerScale gammas
)


def torch_key(flax_name: str, head_nlayers: int = 3) -> tuple[str, str]:
  """(official key, layout) of a Flax parameter path. Layouts: 'same', 'linear' (transpose a
  2-D (in, out) kernel to (out, in)), 'conv' (HWIO -> OIHW)."""
  # The head's Linear i sits at Sequential index 2i (GELUs between); nlayers=1: a bare Linear.
  name = re.sub(r'^head\.mlp\.(\d+)\.', lambda m: 'head.mlp.' if head_nlayers == 1
                else f'head.mlp.{2 * int(m.group(1))}.', flax_name)
  for pattern, repl, layout in _RULES:
    if m := re.match(pattern, name):
      return m.expand(repl), layout
  raise AssertionError(flax_name)


def _to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
  return {'same': lambda a: a, 'linear': lambda a: a.T, 'token3': lambda a: a[:, None],
          'conv': lambda a: a.transpose(3, 2, 0, 1)}[layout](np.asarray(x))


def _from_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
  return {'same': lambda a: a, 'linear': lambda a: a.T, 'token3': lambda a: a[:, 0],
          'conv': lambda a: a.transpose(2, 3, 1, 0)}[layout](np.asarray(x))


def _torch_shape(shape, layout: str) -> tuple[int, ...]:
  s = tuple(shape)
  return {'same': s, 'linear': s[::-1], 'conv': s[3:] + s[2:3] + s[:2],
          'token3': s[:1] + (1,) + s[1:]}[layout]


def hf_key(flax_name: str, head_nlayers: int = 3) -> tuple[str | tuple[str, ...], str]:
  """torch_key in the Hugging Face layout (convert_hf): a tuple of keys where the tensor is
  split along the torch layout's axis 0 (qkv -> query, key, value)."""
  key, layout = torch_key(flax_name, head_nlayers)
  hf = convert_hf.to_hf(key)
  if hf is None:
    raise CheckpointError(f'the Hugging Face DINOv2 layout has no place for {flax_name!r} '
                          f'({key!r} in the official layout); use the official layout')
  return hf, layout


def _import(sd: dict, abstract: dict, prefix: str, head_nlayers: int = 3,
            key_of=torch_key) -> tuple[dict, set]:
  """Flax params shaped like `abstract` from the state_dict (official keys, or those of
  `key_of`); returns (params, keys used). A missing key or a shape mismatch raises naming the
  key and both shapes; a None part of a split key is one the layout does not store: zeros."""
  out, used = {}, set()
  for name, leaf in flat(abstract).items():
    key, layout = key_of(prefix + name, head_nlayers)
    keys = key if isinstance(key, tuple) else (key,)
    whole = _torch_shape(leaf.shape, layout)
    want = (whole[0] // len(keys),) + whole[1:]  # each part of a split tensor
    for k in keys:
      if k is None:
        continue
      if k not in sd:
        raise CheckpointError(f'checkpoint has no {k!r}, which the model needs (shape '
                              f'{weights.shape_str(want)})')
      if tuple(sd[k].shape) != want:
        raise CheckpointError(f'shape mismatch for {k!r}: the checkpoint has '
                              f'{weights.shape_str(sd[k].shape)}, the model expects '
                              f'{weights.shape_str(want)}')
    x = (np.concatenate([np.zeros(want, np.float32) if k is None else sd[k] for k in keys])
         if len(keys) > 1 else sd[key])
    out[name] = np.ascontiguousarray(_from_torch_layout(x, layout), dtype=np.float32)
    used.update(k for k in keys if k is not None)
  return unflat(out), used


def vit_from_state_dict(sd: dict, cfg: ViTConfig, key_of=torch_key) -> tuple[dict, set]:
  return _import(sd, weights.abstract_params(lambda: ViT(cfg, rngs=nnx.Rngs(0))), '',
                 key_of=key_of)


def head_from_state_dict(sd: dict, width: int, hcfg: HeadConfig) -> tuple[dict, set]:
  abstract = weights.abstract_params(lambda: weights.head_module(width, hcfg))
  params, used = _import(sd, {'head': abstract}, '', hcfg.nlayers)
  return params['head'], used


def to_state_dict(backbone: dict, head: dict | None = None, head_nlayers: int = 3,
                  key_of=torch_key) -> dict:
  """Flax params -> official state_dict (numpy, f32): hub backbone keys, plus 'head.*' keys
  (DINO v1 layout) when `head` is given; key_of=hf_key: the Hugging Face layout."""
  names = flat(backbone)
  if head is not None:
    names.update({'head.' + k: v for k, v in flat(head).items()})
  out = {}
  for name, v in names.items():
    key, layout = key_of(name, head_nlayers)
    x = _to_torch_layout(np.asarray(v, np.float32), layout)
    keys, parts = (key, np.split(x, len(key))) if isinstance(key, tuple) else ((key,), (x,))
    out.update((k, np.ascontiguousarray(p)) for k, p in zip(keys, parts) if k is not None)
  return out


# ---------------------------------------------------------------------------------------------
# Whole conversions

def convert(path_or_obj, *, key: str = 'teacher', with_head: bool = True,
            **vit_overrides) -> Weights:
  """Convert an official checkpoint (path, or an already-read object) into Flax params. Every
  key and shape is checked; a mismatch raises CheckpointError naming the key (and the file)."""
  if not isinstance(path_or_obj, (str, os.PathLike)):
    return _convert(path_or_obj, key, with_head, vit_overrides)
  obj = read_file(path_or_obj)
  try:
    return _convert(obj, key, with_head, vit_overrides)
  except (CheckpointError, convert_dinov3.DinoV3LayoutError) as e:
    raise CheckpointError(f'{e} (in {os.fspath(path_or_obj)})') from None


def _convert(obj, key: str, with_head: bool, vit_overrides: dict) -> Weights:
  if not isinstance(obj, dict):
    raise CheckpointError(f'the checkpoint holds a {type(obj).__name__}, not a dict of '
                          f'tensors')
  raw, center = select(obj, key)
  v3 = convert_dinov3.layout_of(raw)  # a DINOv3 ViT: 'official' | 'hf' | None (convert_dinov3)
  hf = v3 is None and convert_hf.is_hf(raw)  # transformers' DINOv2 layout: its names, no head
  sd, ignored = (convert_dinov3.normalize_hf if v3 == 'hf' else
                 convert_hf.normalize_keys if hf else normalize_keys)(raw)
  if v3:
    vit = convert_dinov3.infer_vit_config(sd, v3, **vit_overrides)
    sd = convert_dinov3.check_buffers(sd, vit, v3)  # RoPE periods, k-bias masks: not params
    key_of = convert_dinov3.key_fn(vit, v3, torch_key)
  else:
    if hf:
      for k in ('patch_embed.proj.weight', 'pos_embed'):
        _need(sd, convert_hf.to_hf(k))
    vit = infer_vit_config(convert_hf.official_view(sd) if hf else sd, **vit_overrides)
    key_of = hf_key if hf else torch_key
  backbone, used = vit_from_state_dict(sd, vit, key_of)
  hcfg = infer_head_config(sd) if with_head else None
  head = None
  if hcfg is not None:
    head, used_head = head_from_state_dict(sd, vit.width, hcfg)
    used |= used_head
  elif not with_head:
    ignored += tuple(k for k in sd if k.startswith('head.'))
    used |= {k for k in sd if k.startswith('head.')}
  extra = sorted(set(sd) - used)
  if extra:
    raise CheckpointError(f'checkpoint keys the model has no place for: {extra[:8]}'
                     + (f' and {len(extra) - 8} more' if len(extra) > 8 else ''))
  if center is not None:
    center = np.asarray(center, np.float32).reshape(1, -1)
  return Weights(vit, backbone, hcfg, head, center, ignored)


def load(path: str | os.PathLike, dtype=np.float32) -> ViT:
  """A Flax ViT from one of our model files or directly from an official checkpoint."""
  w = weights.read_file(path) if weights.is_model_file(path) else convert(path)
  return weights.build_backbone(w, dtype)


def export(backbone: dict, path: str | os.PathLike, head: dict | None = None,
           head_nlayers: int = 3, layout: str = 'official', vit: ViTConfig | None = None) -> dict:
  """Write Flax params in the official key layout (or layout='hf': transformers' Dinov2Model
  / Dinov2WithRegistersModel): .safetensors, or a .pth state_dict that the official ViT (the
  HF model) loads with strict=True (backbone only, as the hub files). A RoPE `vit` (DINOv3):
  its official layout with buffers, or transformers' DINOv3ViTModel. Returns it."""
  extra, key_of = {}, {'official': torch_key, 'hf': hf_key}[layout]
  if vit is None and 'patch_embed' in backbone and 'pos_embed' not in backbone:
    raise ValueError('a model without pos_embed (DINOv3, RoPE): pass its ViTConfig as vit=')
  if vit is not None and vit.pos_embed == 'rope':
    backbone, extra = convert_dinov3.for_export(backbone, vit, layout, head is not None)
    key_of = convert_dinov3.key_fn(vit, layout, torch_key)
  elif why := layout == 'hf' and convert_hf.cannot_hold(flat(backbone), head is not None):
    raise ValueError(why)
  sd = {**to_state_dict(backbone, head, head_nlayers, key_of), **extra}
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file(sd, path, metadata={'format': 'pt'} if layout == 'hf' else None)  # transformers
  else:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError("writing a .pth file needs torch (pip install 'dino_jax[torch]'); "
                        'write .safetensors instead') from None
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, path)
  return sd


# ---------------------------------------------------------------------------------------------
# Command line

def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dino_jax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='cmd', required=True)
  imp = sub.add_parser('import', help='official or Hugging Face .pth/.bin/.safetensors -> '
                       'dino_jax .safetensors')
  imp.add_argument('src')
  imp.add_argument('dst', help='output .safetensors')
  imp.add_argument('--key', default='teacher', choices=('teacher', 'student'),
                   help='network to take from a full training checkpoint')
  imp.add_argument('--no-head', action='store_true', help='drop the projection head')
  imp.add_argument('--heads', type=int, help='attention heads (default: width / 64; official '
                   'DINOv3 files: from their RoPE periods)')
  exp = sub.add_parser('export', help='dino_jax model -> official layout (.pth/.safetensors)')
  exp.add_argument('src', help='a file written by `import`, or a dino_jax training workdir')
  exp.add_argument('dst', help='.pth (PyTorch state_dict) or .safetensors')
  exp.add_argument('--step', type=int, help='checkpoint step of a workdir (default: latest)')
  exp.add_argument('--with-head', action='store_true',
                   help="also write the head as 'head.*' (DINO v1 full-checkpoint names)")
  exp.add_argument('--layout', default='official', choices=('official', 'hf'),
                   help='official (hub) keys, or hf: Hugging Face transformers Dinov2Model '
                        '(/WithRegisters) keys, DINOv3ViTModel keys for a DINOv3 model')
  args = parser.parse_args(argv)
  try:
    if args.cmd == 'import':
      overrides = {'heads': args.heads} if args.heads else {}
      c = convert(args.src, key=args.key, with_head=not args.no_head, **overrides)
      weights.save(c, args.dst, source=os.path.basename(args.src))
      n = sum(v.size for v in jax.tree.leaves((c.backbone, c.head)))
      print(f'{args.src} -> {args.dst}: {weights.model_fields(c)}, {n:,} parameters'
            + (f', center {c.center.shape}' if c.center is not None else '')
            + (f'; left out {len(c.ignored)} keys ({c.ignored[0]} ...)' if c.ignored else ''))
    else:
      is_workdir = paths.is_remote(args.src) or os.path.isdir(args.src)  # local or gs:// workdir
      c = weights.from_workdir(args.src, args.step) if is_workdir else weights.read_file(args.src)
      sd = export(c.backbone, args.dst, c.head if args.with_head else None,
                  c.head_config.nlayers if c.head_config else 3, args.layout, c.vit)
      print(f'{args.src} -> {args.dst}: {len(sd)} tensors in the {args.layout} layout')
  except (ValueError, ImportError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
