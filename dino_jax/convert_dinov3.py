"""The released DINOv3 ViTs: their official and Hugging Face transformers key layouts, as names,
the architecture read off the weights, and the checks of the official buffers.

convert.py reads and writes the tensors (every key and shape checked); this module says which
official or HF key a Flax parameter path has in a DINOv3 file and what the file's architecture
is. Facts used (github:facebookresearch/dinov3: dinov3/models/vision_transformer.py,
dinov3/layers/{attention,ffn_layers,rope_position_encoding,layer_scale}.py,
dinov3/hub/backbones.py; github:huggingface/transformers: models/dinov3_vit/modeling_dinov3_vit.py
and conversion_mapping.py):

- official names as DINOv2's (`patch_embed.proj`, `blocks.{i}.norm1/attn.qkv/attn.proj/ls1.gamma/
  norm2/mlp/ls2.gamma`, `norm`), plus `storage_tokens` (1, R, D) (our `register_tokens`, after
  CLS), `mask_token` (1, D), `cls_norm` / `local_cls_norm` (untied final norms), no pos_embed;
- SwiGLU is three Linears `mlp.w1`, `mlp.w2`, `mlp.w3` with w3(silu(w1 x) * w2 x): our `w12`
  is [w1 | w2] along its outputs; hidden width ceil_align(int(int(D * ratio) * 2 / 3)),
  align 8 ('swiglu', ratio 6: S+, L+, H+) or 64 ('swiglu64', ratio 3: 7B);
- buffers (not parameters): `rope_embed.periods` (D_head / 4,) = base ** (4 j / D_head) (or
  geometric min..max), and with mask_k_bias `blocks.{i}.attn.qkv.bias_mask` (3D,): 1 on q and v,
  0 on the k third; both are checked against the config and skipped on import, written on
  export (the official model loads strict);
- the released models: patch 16, 4 storage tokens, RoPE base 100, 'separate' coordinate
  normalisation, training rescale 2, LayerScale 1e-5, 'layernormbf16' = LayerNorm eps 1e-5,
  mask_k_bias; 7B: width 4096 / 32 heads (head dim 128), no qkv bias, untied local CLS norm;
  S/S+ and L/L+ share width, depth and heads: the FFN comes from the keys and shapes;
- HF `DINOv3ViTModel` files: `embeddings.{cls_token, mask_token (1, 1, D), register_tokens,
  patch_embeddings.{weight,bias}}`, `layer.{i}.` (transformers >= 5 names it `model.layer.{i}.`
  and renames on load; both are read, `layer.` is written) with `norm1`, `attention.{q,k,v,o}_proj`
  (no k bias: the masked key bias is left out), `layer_scale{1,2}.lambda1`, `norm2`, `mlp.
  {up,down}_proj` (MLP) or `mlp.{gate,up,down}_proj` (SwiGLU w1, w2, w3), final `norm`; no
  buffers (RoPE inv_freq is not saved), no untied CLS norms (the local one is training only and
  left out on export; a model with `cls_norm` cannot be written in it).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from dino_jax.errors import DinoJaxError
from dino_jax.models import ViTConfig, rope
from dino_jax.models.ffn import swiglu_hidden

PERIODS = 'rope_embed.periods'
HEADS_BY_WIDTH = {4096: 32}  # 7B (head dim 128); every other DINOv3 ViT has head dim 64
SWIGLUS = ((6.0, 8), (3.0, 64), (4.0, 8))  # (ratio, align): S+/L+/H+, 7B, DINOv2-g-like

_HF = (  # (official key, HF key); {i}: block index, {p}: weight or bias
    ('cls_token', 'embeddings.cls_token'),
    ('mask_token', 'embeddings.mask_token'),
    ('storage_tokens', 'embeddings.register_tokens'),
    ('patch_embed.proj.{p}', 'embeddings.patch_embeddings.{p}'),
    ('blocks.{i}.norm1.{p}', 'layer.{i}.norm1.{p}'),
    ('blocks.{i}.attn.qkv.{p}', tuple(f'layer.{{i}}.attention.{n}_proj.{{p}}' for n in 'qkv')),
    ('blocks.{i}.attn.proj.{p}', 'layer.{i}.attention.o_proj.{p}'),
    ('blocks.{i}.ls1.gamma', 'layer.{i}.layer_scale1.lambda1'),
    ('blocks.{i}.norm2.{p}', 'layer.{i}.norm2.{p}'),
    ('blocks.{i}.mlp.fc1.{p}', 'layer.{i}.mlp.up_proj.{p}'),
    ('blocks.{i}.mlp.fc2.{p}', 'layer.{i}.mlp.down_proj.{p}'),
    ('blocks.{i}.mlp.w1.{p}', 'layer.{i}.mlp.gate_proj.{p}'),
    ('blocks.{i}.mlp.w2.{p}', 'layer.{i}.mlp.up_proj.{p}'),
    ('blocks.{i}.mlp.w3.{p}', 'layer.{i}.mlp.down_proj.{p}'),
    ('blocks.{i}.ls2.gamma', 'layer.{i}.layer_scale2.lambda1'),
    ('norm.{p}', 'norm.{p}'),
)
_HF_PATTERNS = [(re.compile(off.replace('.', r'\.').replace('{i}', r'(?P<i>\d+)')
                            .replace('{p}', '(?P<p>weight|bias)') + '$'), hf) for off, hf in _HF]


class DinoV3LayoutError(DinoJaxError, ValueError):
  """A DINOv3 file whose buffers or FFN do not fit any model this converter builds."""


def layout_of(sd: dict) -> str | None:
  """'official' or 'hf' for a DINOv3 ViT state_dict, None for any other (DINO, DINOv2)."""
  keys = set(sd)
  if PERIODS in keys or 'storage_tokens' in keys or (
      'patch_embed.proj.weight' in keys and 'pos_embed' not in keys):
    return 'official'
  if 'embeddings.patch_embeddings.weight' in keys or any(
      k.startswith(('layer.', 'model.layer.')) for k in keys):
    return 'hf'
  return None


def normalize_hf(sd: dict) -> tuple[dict, tuple[str, ...]]:
  """transformers >= 5's `model.layer.{i}.` -> the files' `layer.{i}.`."""
  out = {}
  for k, v in sd.items():
    name = k[len('model.'):] if k.startswith('model.layer.') else k
    if name in out:
      raise DinoV3LayoutError(f'two checkpoint keys map to {name!r} (second: {k!r})')
    out[name] = np.asarray(v)
  return out, ()


def _need(sd, key):
  if key not in sd:
    raise DinoV3LayoutError(f'checkpoint has no {key!r}: not a DINOv3 ViT state_dict '
                            f'(first keys: {sorted(sd)[:5]})')
  return sd[key]


def _ffn_fields(width: int, hidden: int, swiglu: bool) -> dict:
  if not swiglu:
    return {'ffn': 'mlp', 'mlp_ratio': hidden / width}
  ratios = list(SWIGLUS) + [(hidden * 1.5 / width, 8)]
  for ratio, align in ratios:
    if swiglu_hidden(width, ratio, align) == hidden:
      return {'ffn': 'swiglu', 'mlp_ratio': ratio, 'swiglu_align': align}
  raise DinoV3LayoutError(f'SwiGLU hidden width {hidden} at width {width} fits none of the '
                          f'DINOv3 FFNs (ratio, align) {[r for r in SWIGLUS]}')


def infer_vit_config(sd: dict, layout: str, **overrides) -> ViTConfig:
  """The ViTConfig of a DINOv3 state_dict (official or HF names) from its keys and shapes."""
  hf = layout == 'hf'
  name = lambda off, h: h if hf else off
  patch_w = _need(sd, name('patch_embed.proj.weight', 'embeddings.patch_embeddings.weight'))
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  blocks = r'layer\.(\d+)\.' if hf else r'blocks\.(\d+)\.'
  depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(blocks, k))), default=-1)
  storage = sd.get(name('storage_tokens', 'embeddings.register_tokens'))
  b0 = 'layer.0.' if hf else 'blocks.0.'
  swiglu = b0 + ('mlp.gate_proj.weight' if hf else 'mlp.w1.weight') in sd
  hidden_key = b0 + ('mlp.up_proj.weight' if hf else ('mlp.w1.weight' if swiglu else
                                                       'mlp.fc1.weight'))
  ffn = _ffn_fields(width, _need(sd, hidden_key).shape[0], swiglu) if depth else {}
  q_bias = b0 + ('attention.q_proj.bias' if hf else 'attn.qkv.bias')
  mask_k_bias = (q_bias in sd and b0 + 'attention.k_proj.bias' not in sd if hf
                 else b0 + 'attn.qkv.bias_mask' in sd)
  heads = HEADS_BY_WIDTH.get(width, max(width // 64, 1))
  if not hf and PERIODS in sd:
    heads = max(width // (4 * sd[PERIODS].shape[0]), 1)
  fields = dict(
      width=width, depth=depth, heads=heads, patch_size=patch, img_size=14 * patch,
      layerscale=1e-5 if b0 + ('layer_scale1.lambda1' if hf else 'ls1.gamma') in sd else 0.0,
      n_registers=0 if storage is None else storage.shape[1],
      mask_token=name('mask_token', 'embeddings.mask_token') in sd,
      pos_embed='rope', rope_base=100.0, rope_normalize='separate', rope_rescale=2.0,
      untie_cls_and_patch_norms='cls_norm.weight' in sd,
      untie_global_and_local_cls_norm='local_cls_norm.weight' in sd,
      mask_k_bias=mask_k_bias, qkv_bias=q_bias in sd, ln_eps=1e-5, register_init_std=0.02,
      **ffn)
  fields.update(overrides)
  cfg = ViTConfig(**fields)
  if not hf and PERIODS in sd:
    cfg = _fit_periods(cfg, np.asarray(sd[PERIODS], np.float32), 'rope_base' in overrides)
  return cfg


def _fit_periods(cfg: ViTConfig, periods: np.ndarray, given: bool) -> ViTConfig:
  """cfg, or cfg with the geometric min..max periods of the file, whichever the buffer matches;
  else an error naming both."""
  hd = cfg.width // cfg.heads
  fits = lambda c: (periods.shape == (hd // 4,) and
                    np.allclose(rope.periods(hd, c.rope_spec), periods, rtol=1e-5, atol=0))
  if fits(cfg):
    return cfg
  if not given and periods.size > 1 and periods[0] > 0:
    geo = dataclasses.replace(cfg, rope_min_period=float(periods[0]),
                              rope_max_period=float(periods[-1]))
    if fits(geo):
      return geo
  raise DinoV3LayoutError(
      f'{PERIODS} {np.array2string(periods[:4], precision=4)}... (shape {periods.shape}) is '
      f'not the RoPE of this config (head dim {hd}, base {cfg.rope_base}): '
      f'{np.array2string(rope.periods(hd, cfg.rope_spec)[:4], precision=4)}...')


def bias_mask(width: int) -> np.ndarray:
  """The official `bias_mask` of a masked-k-bias qkv: 1 on q and v, 0 on the k third."""
  mask = np.ones(3 * width, np.float32)
  mask[width:2 * width] = 0
  return mask


def buffers(cfg: ViTConfig) -> dict:
  """The official model's buffers for `cfg`: RoPE periods, and the qkv bias masks."""
  out = {PERIODS: rope.periods(cfg.width // cfg.heads, cfg.rope_spec)}
  if cfg.mask_k_bias and cfg.qkv_bias:
    out.update({f'blocks.{i}.attn.qkv.bias_mask': bias_mask(cfg.width)
                for i in range(cfg.depth)})
  return out


def check_buffers(sd: dict, cfg: ViTConfig, layout: str) -> dict:
  """sd without its buffers, each checked against `cfg` (a wrong or missing one raises)."""
  if layout == 'hf':
    return sd
  want = buffers(cfg)
  for k, v in want.items():
    got = np.asarray(_need(sd, k), np.float32)
    if got.shape != v.shape or not (np.array_equal(got, v) or (
        k == PERIODS and np.allclose(got, v, rtol=1e-5, atol=0))):
      raise DinoV3LayoutError(f'buffer {k!r} of shape {got.shape} is not what the config '
                              f'implies (shape {v.shape}; bias_mask: 1 on q, v and 0 on k)')
  stray = [k for k in sd if k.endswith('.bias_mask') and k not in want]
  if stray:
    raise DinoV3LayoutError(f'{stray[0]}: a masked k bias in only some blocks')
  return {k: v for k, v in sd.items() if k not in want}


def _official(key: str):
  if key == 'register_tokens':
    return 'storage_tokens'
  if m := re.match(r'^(blocks\.\d+\.mlp\.)w12\.(weight|bias)$', key):
    return tuple(f'{m.group(1)}{w}.{m.group(2)}' for w in ('w1', 'w2'))
  return key


def _hf(key: str, cfg: ViTConfig):
  for pattern, hf in _HF_PATTERNS:
    if m := pattern.match(key):
      fill = lambda t, g=m.groupdict(): t.format(**g)
      if isinstance(hf, tuple):
        parts = tuple(map(fill, hf))
        if key.endswith('.bias') and cfg.mask_k_bias:  # the masked k bias is not stored
          parts = (parts[0], None, parts[2])
        return parts
      return fill(hf)
  raise DinoV3LayoutError(f'the Hugging Face DINOv3 layout has no place for {key!r}; use the '
                          f'official layout')


def key_fn(cfg: ViTConfig, layout: str, torch_key):
  """key_of(flax name, head_nlayers) -> (key or keys, layout) in a DINOv3 file's layout, from
  convert.torch_key (DINOv2 names); a None key: a part the layout does not store (zeros)."""
  def key_of(flax_name: str, head_nlayers: int = 3):
    key, lay = torch_key(flax_name, head_nlayers)
    key = _official(key)
    if layout == 'hf':
      key = tuple(_hf(k, cfg) for k in key) if isinstance(key, tuple) else _hf(key, cfg)
      lay = 'token3' if flax_name == 'mask_token' else lay
    return key, lay
  return key_of


def for_export(backbone: dict, cfg: ViTConfig, layout: str, has_head: bool) -> tuple[dict, dict]:
  """(the backbone to write, extra tensors: the official buffers) of a DINOv3 export."""
  if layout == 'official':
    return backbone, buffers(cfg)
  if has_head:
    raise DinoV3LayoutError('the Hugging Face DINOv3 layout has no DINO head: export without it')
  if cfg.untie_cls_and_patch_norms:
    raise DinoV3LayoutError('the Hugging Face DINOv3 layout has no untied CLS norm (cls_norm): '
                            'use the official layout')
  return {k: v for k, v in backbone.items() if k != 'local_cls_norm'}, {}  # training only
