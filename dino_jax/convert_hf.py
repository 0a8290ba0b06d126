"""The Hugging Face transformers key layout of DINOv2 and DINOv2 with registers, as names.

transformers' `Dinov2Model` and `Dinov2WithRegistersModel` (`model.safetensors`,
`pytorch_model.bin`) hold the same network as the official hub files under other names; this
module maps the official keys that convert.py reads and writes to theirs and back, and
nothing else (convert.py checks keys and shapes and raises). Facts used, from
github:huggingface/transformers (models/dinov2/modeling_dinov2.py,
dinov2_with_registers/modeling_dinov2_with_registers.py and their convert_*_to_hf.py):

- the official fused `attn.qkv` Linear (3D, D) is three Linears `attention.attention.query`,
  `.key`, `.value`: its rows [0, D), [D, 2D), [2D, 3D), in that order, as are the bias's;
- SwiGLU `mlp.w12` / `mlp.w3` are `mlp.weights_in` / `mlp.weights_out`, same shapes (the
  first half of weights_in's output goes through SiLU and gates the second);
- every HF layer has LayerScale (`layer_scale1.lambda1`, the official `ls1.gamma`); the
  mask token is (1, D) in both layouts; `Dinov2WithRegistersModel` always has a mask token;
- `*ForImageClassification` files prefix the backbone with `dinov2.` or
  `dinov2_with_registers.` and add `classifier.*` (a linear head: left out and reported);
- pos-embed resizing: HF's Dinov2 resizes to the exact token grid (bicubic, no antialias),
  the official non-register models by the scale factor (n + 0.1) / N (`interpolate_offset`
  0.1); with registers both resize to the exact grid with antialiasing. A converted model keeps
  the official numerics (convert.infer_vit_config), so it matches the official model.
"""
from __future__ import annotations

import collections
import re

PREFIXES = ('dinov2.', 'dinov2_with_registers.')  # *ForImageClassification's backbone
IGNORED_PREFIXES = ('classifier.',)  # *ForImageClassification's linear head
QKV = ('query', 'key', 'value')

_NAMES = (  # (official key, HF key); {i}: block index, {p}: weight or bias
    ('cls_token', 'embeddings.cls_token'),
    ('mask_token', 'embeddings.mask_token'),
    ('register_tokens', 'embeddings.register_tokens'),
    ('pos_embed', 'embeddings.position_embeddings'),
    ('patch_embed.proj.{p}', 'embeddings.patch_embeddings.projection.{p}'),
    ('blocks.{i}.norm1.{p}', 'encoder.layer.{i}.norm1.{p}'),
    ('blocks.{i}.attn.qkv.{p}', tuple(f'encoder.layer.{{i}}.attention.attention.{n}.{{p}}'
                                      for n in QKV)),
    ('blocks.{i}.attn.proj.{p}', 'encoder.layer.{i}.attention.output.dense.{p}'),
    ('blocks.{i}.ls1.gamma', 'encoder.layer.{i}.layer_scale1.lambda1'),
    ('blocks.{i}.norm2.{p}', 'encoder.layer.{i}.norm2.{p}'),
    ('blocks.{i}.mlp.fc1.{p}', 'encoder.layer.{i}.mlp.fc1.{p}'),
    ('blocks.{i}.mlp.fc2.{p}', 'encoder.layer.{i}.mlp.fc2.{p}'),
    ('blocks.{i}.mlp.w12.{p}', 'encoder.layer.{i}.mlp.weights_in.{p}'),
    ('blocks.{i}.mlp.w3.{p}', 'encoder.layer.{i}.mlp.weights_out.{p}'),
    ('blocks.{i}.ls2.gamma', 'encoder.layer.{i}.layer_scale2.lambda1'),
    ('norm.{p}', 'layernorm.{p}'),
)


def _pattern(template: str) -> re.Pattern:
  return re.compile(template.replace('.', r'\.').replace('{i}', r'(?P<i>\d+)')
                    .replace('{p}', '(?P<p>weight|bias)') + '$')


_OFFICIAL = [(_pattern(off), hf) for off, hf in _NAMES]
_HF = [(_pattern(h), off, j) for off, hf in _NAMES
       for j, h in enumerate(hf if isinstance(hf, tuple) else (hf,))]


def to_hf(official_key: str) -> str | tuple[str, ...] | None:
  """The HF key of an official key; a tuple where the official tensor is the HF ones
  concatenated along axis 0 (qkv); None where the HF layout has no such tensor (a head)."""
  for pattern, hf in _OFFICIAL:
    if m := pattern.match(official_key):
      fill = lambda t, g=m.groupdict(): t.format(**g)
      return tuple(map(fill, hf)) if isinstance(hf, tuple) else fill(hf)
  return None


def to_official(hf_key: str) -> tuple[str, int] | None:
  """(official key, part index within it) of an HF key; None if the key has no official name."""
  for pattern, official, part in _HF:
    if m := pattern.match(hf_key):
      return official.format(**m.groupdict()), part
  return None


def _strip(key: str) -> str:
  return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)


def is_hf(sd: dict) -> bool:
  """Whether a flat state_dict is in the HF layout (its keys name embeddings/encoder.layer)."""
  return any(_strip(k).startswith(('embeddings.', 'encoder.layer.')) for k in sd)


def normalize_keys(sd: dict) -> tuple[dict, tuple[str, ...]]:
  """Strip the `dinov2.` / `dinov2_with_registers.` prefix, leave out `classifier.*`.

  Returns the renamed state_dict (HF names) and the keys left out on purpose. Two keys that
  would get one name keep theirs, so the prefixed one is reported as a key with no place.
  """
  count = collections.Counter(map(_strip, sd))
  out, ignored = {}, []
  for k, v in sd.items():
    name = _strip(k) if count[_strip(k)] == 1 else k
    if name.startswith(IGNORED_PREFIXES):
      ignored.append(k)
    else:
      out[name] = v
  return out, tuple(ignored)


def official_view(sd: dict) -> dict:
  """The tensors of an HF state_dict under their official names, for reading the architecture
  off them (convert.infer_vit_config); split tensors (q, k, v) are left out."""
  view = {}
  for k, v in sd.items():
    named = to_official(k)
    if named is not None and to_hf(named[0]) == k:
      view[named[0]] = v
  return view


def cannot_hold(flax_names, has_head: bool) -> str | None:
  """Why the HF layout cannot hold a model with these Flax parameter names (None: it can)."""
  if has_head:
    return 'the Hugging Face DINOv2 layout has no DINO head: export without it'
  if 'blocks.0.norm1.scale' in flax_names and 'blocks.0.ls1.gamma' not in flax_names:
    return ('every Hugging Face DINOv2 layer has LayerScale (layer_scale1.lambda1) and this '
            'model has none (a DINO v1 ViT): use the official layout')
  return None
