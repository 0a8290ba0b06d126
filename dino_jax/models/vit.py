"""Vision Transformer backbone as used by DINO and DINOv2 (pre-norm, cls token, learned pos-embed).

Weights and numerics follow the official DINO ViT: qkv bias, exact GELU, LayerNorm eps 1e-6,
stochastic depth rates linspace(0, rate) over blocks, N(0, 0.02) init for tokens and linears,
PyTorch's default uniform init for the patch convolution. Positional embeddings are resized to
other crop sizes with PyTorch bicubic semantics (A=-0.75, border clamp, the official +0.1
scale offset; models/pos_embed.py). The feed-forward layers live in models/ffn.py, attention and
its fused kernel in models/attention.py, the patch embeddings in models/stem.py.

`ViT.packed` runs crops of several sizes as one token matrix (models/packing.py): what is
token-wise runs once over all crops, attention per crop size. `ViTConfig.remat` names what a
block keeps for the backward pass (REMAT_POLICIES).

DINOv2 options (ViTConfig; all off by default, which is DINO v1): LayerScale on both residual
branches, register tokens ([CLS, registers, patches], registers get no pos-embed), a SwiGLU FFN
(hidden = ceil8(int(2/3 * mlp_ratio * D))), a learned mask token that replaces masked patch
embeddings before the pos-embed is added, and the register models' pos-embed resize (explicit
output size, PyTorch's antialiased bicubic).

DINOv3 options (also off by default): axial RoPE on the patch tokens instead of the learned
pos-embed (pos_embed='rope'; models/rope.py: base or min/max periods, per-axis coordinate
normalisation, training-time shift / jitter / rescale drawn per block and per crop size from
the call's key, none without one); the registers are DINOv3's storage tokens (after CLS; init
std `register_init_std`); separate final norms for CLS and storage tokens
(untie_cls_and_patch_norms: `cls_norm`) and for the local crops' CLS and storage tokens in
training (untie_global_and_local_cls_norm: `local_cls_norm`, used when a call says
local=True); the k third of the qkv bias masked to 0 (mask_k_bias) or no qkv bias at all
(qkv_bias=False, 7B); LayerNorm eps (ln_eps; DINOv3's 'layernormbf16' is 1e-5); SwiGLU hidden
width rounded up to `swiglu_align` (7B: 64). The DINOv3 sizes are in VARIANTS; VARIANT_FFNS
holds the FFN of those whose FFN is not the 4x MLP.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.models import attention, packing, rope, stem
from dino_jax.models.attention import Attention
from dino_jax.models.ffn import LayerScale, Mlp, SwiGLU, gelu, swiglu_hidden  # noqa: F401
from dino_jax.models.pos_embed import (interpolate_pos_embed, torch_bicubic_aa_matrix,  # noqa: F401
                                       torch_bicubic_matrix)

# name -> (width, depth, heads). Head dim is 64 for the paper's models.
VARIANTS: dict[str, tuple[int, int, int]] = {
    'vit_nano': (48, 4, 3),  # the CPU distillation recipe's student (configs/dinov3_distill.py)
    'vit_pico': (96, 4, 3),  # CPU recipe: a few minutes per epoch of CIFAR on 2 cores
    'vit_tiny': (192, 12, 3),
    'vit_small': (384, 12, 6),
    'vit_base': (768, 12, 12),
    'vit_large': (1024, 24, 16),
    'vit_giant2': (1536, 40, 24),  # DINOv2 ViT-g/14 (use ffn='swiglu')
    # DINOv3 (official hub constructors dinov3_vit{s16plus,l16plus,h16plus,7b16}); S/16, B/16
    # and L/16 are vit_small, vit_base and vit_large
    'vit_small_plus': (384, 12, 6),
    'vit_large_plus': (1024, 24, 16),
    'vit_huge_plus': (1280, 32, 20),
    'vit_7b': (4096, 40, 32),
}
# name -> (ffn, mlp_ratio, swiglu_align) of the variants whose FFN is not the 4x MLP; from_variant
# uses them unless given (DINOv3: 'swiglu' ratio 6, and 7B's 'swiglu64' ratio 3).
VARIANT_FFNS: dict[str, tuple[str, float, int]] = {
    'vit_small_plus': ('swiglu', 6.0, 8),
    'vit_large_plus': ('swiglu', 6.0, 8),
    'vit_huge_plus': ('swiglu', 6.0, 8),
    'vit_7b': ('swiglu', 3.0, 64),
}
FFNS = ('mlp', 'swiglu')
POS_EMBEDS = ('learned', 'rope')
# What a block keeps for the backward pass (config.model.remat): 'none' keeps every activation;
# 'block' keeps only the block's input and recomputes the rest; 'dots' keeps the outputs of
# the token-wise matrix products (qkv, proj, MLP; no batch dimensions) and recomputes
# attention, norms and activations.
REMAT_POLICIES = {'none': None, 'block': None,
                  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
PATCH_SIZES = (4, 8, 14, 16)
LN_EPS = 1e-6
_ROPE_STREAM = 0x526F5045  # fold_in constant of the RoPE augmentation keys ('RoPE')

_normal02 = attention.normal02


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  width: int
  depth: int
  heads: int
  patch_size: int
  img_size: int = 224
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  drop_path_uniform: bool = False  # same rate in every block (DINOv2) instead of linspace(0, r)
  layerscale: float = 0.0  # LayerScale init value (0: no LayerScale; DINOv2: 1e-5)
  n_registers: int = 0  # register tokens after CLS (DINOv2 *_reg models: 4)
  ffn: str = 'mlp'  # 'mlp' (fc1, GELU, fc2) | 'swiglu' (w12, SiLU gate, w3; DINOv2 ViT-g)
  mask_token: bool = False  # learned (1, D) token that `masks` put in place of patches
  interpolate_offset: float = 0.1  # pos-embed resize scale (n + offset)/S; 0: exact size n
  interpolate_antialias: bool = False  # antialiased bicubic (DINOv2 register models)
  remat: str = 'none'  # REMAT_POLICIES name (True/False: 'block'/'none', older configs)
  pack_crops: bool = False  # multi-crop passes as one packed token matrix (DINO.backbone_crops)
  stem: str = 'patch'  # patch embedding (models/stem.py): 'patch' (official) | 'conv' | 'shifted'
  # DINOv3 options (module docstring; models/rope.py):
  pos_embed: str = 'learned'  # 'learned' (DINO, DINOv2) | 'rope' (no pos_embed parameter)
  rope_base: float = 100.0  # periods base ** (4j / head_dim)
  rope_min_period: float = 0.0  # both > 0: geometric periods min..max instead of the base
  rope_max_period: float = 0.0
  rope_normalize: str = 'separate'  # coordinates / each axis ('separate'), the 'max' or 'min'
  rope_shift: float = 0.0  # training: + U[-s, s] per axis (0: off)
  rope_jitter: float = 0.0  # training: * exp(U[-ln j, ln j]) per axis (0: off)
  rope_rescale: float = 0.0  # training: * exp(U[-ln r, ln r]), both axes (0: off; DINOv3: 2)
  untie_cls_and_patch_norms: bool = False  # CLS + storage tokens through their own `cls_norm`
  untie_global_and_local_cls_norm: bool = False  # local crops' CLS + storage: `local_cls_norm`
  mask_k_bias: bool = False  # the k third of the qkv bias multiplied by 0 (DINOv3)
  qkv_bias: bool = True  # DINOv3 7B: False
  ln_eps: float = LN_EPS  # LayerNorm eps (DINOv3 'layernormbf16': 1e-5)
  swiglu_align: int = 8  # SwiGLU hidden width rounded up to a multiple of it (7B: 64)
  register_init_std: float = 1e-6  # N(0, std) init of the registers (DINOv3 storage: 0.02)

  def __post_init__(self):
    object.__setattr__(self, 'remat', remat_policy(self.remat))
    if self.ffn not in FFNS:
      raise ValueError(f'unknown ffn {self.ffn!r}; choose one of {FFNS}')
    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f'unknown pos_embed {self.pos_embed!r}; choose one of {POS_EMBEDS}')
    if self.pos_embed == 'rope':
      rope.periods(self.width // self.heads, self.rope_spec)  # raises for a bad head dim
      if self.rope_normalize not in rope.NORMALIZE:
        raise ValueError(f'unknown rope_normalize {self.rope_normalize!r}; choose one of '
                         f'{rope.NORMALIZE}')
    if self.stem not in stem.STEMS:
      raise ValueError(f'unknown stem {self.stem!r}; choose one of {stem.STEMS}')
    if self.n_registers < 0 or self.layerscale < 0:
      raise ValueError('n_registers and layerscale must be >= 0')

  @classmethod
  def from_variant(cls, arch: str, patch_size: int, **kw) -> 'ViTConfig':
    if arch not in VARIANTS:
      raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(VARIANTS)}')
    width, depth, heads = VARIANTS[arch]
    if arch in VARIANT_FFNS:
      ffn, ratio, align = VARIANT_FFNS[arch]
      kw = {'ffn': ffn, 'mlp_ratio': ratio, 'swiglu_align': align, **kw}
    return cls(width=width, depth=depth, heads=heads, patch_size=patch_size, **kw)

  @property
  def rope_spec(self) -> rope.Spec:
    return rope.Spec(self.rope_base, self.rope_min_period, self.rope_max_period,
                     self.rope_normalize, self.rope_shift, self.rope_jitter, self.rope_rescale)


def remat_policy(value) -> str:
  """A REMAT_POLICIES name; the bools of older configs are aliases (True: 'block')."""
  if isinstance(value, bool):
    return 'block' if value else 'none'
  if value not in REMAT_POLICIES:
    raise ValueError(f'unknown remat policy {value!r}; choose one of {sorted(REMAT_POLICIES)}')
  return value


class ViTOutput(NamedTuple):
  cls: jax.Array  # (B, D) after the final norm
  patches: jax.Array  # (B, N, D) after the final norm
  intermediates: tuple[jax.Array, ...]  # last n block outputs, each after the final norm
  attention: jax.Array | None  # (B, H, T, T) last block softmax attention, f32; T = 1+R+N
  registers: jax.Array | None = None  # (B, R, D) register tokens after the final norm


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: drop whole residual branches per sample, rescale survivors."""
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


def _ffn(cfg: ViTConfig, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.ffn == 'swiglu':
    return SwiGLU(cfg.width, swiglu_hidden(cfg.width, cfg.mlp_ratio, cfg.swiglu_align),
                  dtype=dtype, rngs=rngs)
  return Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), dtype=dtype, rngs=rngs)


class Block(nnx.Module):

  def __init__(self, cfg: ViTConfig, drop_path_rate: float, *, dtype, rngs: nnx.Rngs):
    dim = cfg.width
    self.drop_path_rate = drop_path_rate
    self.norm1 = nnx.LayerNorm(dim, epsilon=cfg.ln_eps, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, cfg.heads, dtype=dtype, rngs=rngs, qkv_bias=cfg.qkv_bias,
                          mask_k_bias=cfg.mask_k_bias)
    self.norm2 = nnx.LayerNorm(dim, epsilon=cfg.ln_eps, dtype=dtype, rngs=rngs)
    self.mlp = _ffn(cfg, dtype=dtype, rngs=rngs)
    self.ls1 = LayerScale(dim, cfg.layerscale) if cfg.layerscale else None
    self.ls2 = LayerScale(dim, cfg.layerscale) if cfg.layerscale else None

  def __call__(self, x, key=None, *, rope_tables=None, return_attention=False, layout=None):
    """x: (B, N, D) with one drop-path key, or packed (P * M, D) with its `layout` and one key
    per crop-size group (the keys of unpacked passes, so the same crops are dropped).
    rope_tables: the RoPE (sin, cos) of this block (one pair per group when packed) or None."""
    if layout is None:
      k1, k2 = jax.random.split(key) if key is not None else (None, None)
      drop = lambda y, k: drop_path(y, self.drop_path_rate, k)
    else:
      k1, k2 = zip(*[jax.random.split(k) for k in key]) if key is not None else (None, None)
      drop = lambda y, k: packing.drop_path(y, self.drop_path_rate, k, layout)
    y, attn = self.attn(self.norm1(x), rope_tables=rope_tables,
                        return_attention=return_attention, layout=layout)
    y = self.ls1(y) if self.ls1 is not None else y
    x = x + drop(y, k1)
    y = self.mlp(self.norm2(x))
    y = self.ls2(y) if self.ls2 is not None else y
    x = x + drop(y, k2)
    return x, attn


def _block_call(block: Block, x, key, rope_tables, layout):
  return block(x, key, rope_tables=rope_tables, layout=layout)


@functools.lru_cache(maxsize=None)
def _remat_block(policy: str):
  """The block call that recomputes in the backward pass what `policy` does not keep."""
  return nnx.remat(_block_call, policy=REMAT_POLICIES[policy], static_argnums=(4,))


class ViT(nnx.Module):
  """DINO / DINOv2 / DINOv3 ViT. Call with NHWC images (and optional patch masks); returns a
  ViTOutput."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    d, p = cfg.width, cfg.patch_size
    self.patch_embed = stem.make(cfg.stem, d, p, dtype=dtype, rngs=rngs)
    grid = cfg.img_size // p
    self.cls_token = nnx.Param(_normal02(rngs.params(), (1, 1, d)))
    # with RoPE the positions enter attention (models/rope.py): no learned embedding
    self.pos_embed = (nnx.Param(_normal02(rngs.params(), (1, 1 + grid * grid, d)))
                      if cfg.pos_embed == 'learned' else None)
    self.register_tokens = (nnx.Param(cfg.register_init_std * jax.random.normal(
        rngs.params(), (1, cfg.n_registers, d))) if cfg.n_registers else None)
    self.mask_token = nnx.Param(jnp.zeros((1, d), jnp.float32)) if cfg.mask_token else None
    rates = (np.full(cfg.depth, cfg.drop_path_rate) if cfg.drop_path_uniform
             else np.linspace(0.0, cfg.drop_path_rate, cfg.depth))
    self.blocks = nnx.List([Block(cfg, float(r), dtype=dtype, rngs=rngs) for r in rates])
    norm = lambda: nnx.LayerNorm(d, epsilon=cfg.ln_eps, dtype=dtype, rngs=rngs)
    self.norm = norm()  # every token, or only the patches when a CLS norm is untied
    self.cls_norm = norm() if cfg.untie_cls_and_patch_norms else None
    self.local_cls_norm = norm() if cfg.untie_global_and_local_cls_norm else None

  def tokens(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
    """Patch-embed NHWC images, put the mask token where `masks` (B, N) is True, add the
    (interpolated) positional embedding (none with RoPE), and insert the register tokens
    after CLS."""
    cfg = self.cfg
    b, h, w, _ = images.shape
    p = cfg.patch_size
    if h % p or w % p:
      raise ValueError(f'image size {h}x{w} is not divisible by patch size {p}')
    x = self.patch_embed(images.astype(self.dtype)).reshape(b, (h // p) * (w // p), -1)
    if masks is not None:
      if self.mask_token is None:
        raise ValueError('masks given but the model has no mask token (set mask_token=True)')
      if masks.shape != x.shape[:2]:
        raise ValueError(f'masks shape {masks.shape} != (batch, patches) {x.shape[:2]}')
      x = jnp.where(masks[..., None], self.mask_token[...].astype(self.dtype), x)
    d = x.shape[-1]
    if self.pos_embed is None:
      cls = self.cls_token[...]
    else:
      pos = self.pos_embed[...]
      pos_patch = interpolate_pos_embed(pos[:, 1:], h // p, w // p, cfg.interpolate_offset,
                                        cfg.interpolate_antialias)
      cls = self.cls_token[...] + pos[:, :1]
      x = x + pos_patch.astype(self.dtype)
    parts = [jnp.broadcast_to(cls, (b, 1, d)).astype(self.dtype)]
    if self.register_tokens is not None:
      parts.append(jnp.broadcast_to(self.register_tokens[...], (b, cfg.n_registers, d))
                   .astype(self.dtype))
    return jnp.concatenate(parts + [x], axis=1)

  def rope_tables(self, images: jax.Array, key: jax.Array | None) -> list:
    """The RoPE (sin, cos) tables of each block for a batch of `images` (None per block without
    RoPE). key: the coordinate augmentations' randomness, drawn anew for every block as the
    official model does (None: eval, no augmentation)."""
    cfg = self.cfg
    if cfg.pos_embed != 'rope':
      return [None] * len(self.blocks)
    gh, gw = images.shape[1] // cfg.patch_size, images.shape[2] // cfg.patch_size
    table = functools.partial(rope.tables, cfg.rope_spec, gh, gw, 1 + cfg.n_registers,
                              cfg.width // cfg.heads)
    if key is None or not cfg.rope_spec.augments:
      return [table()] * len(self.blocks)
    # a stream apart from the drop-path keys, which stay those of a model without RoPE
    keys = jax.random.split(jax.random.fold_in(key, _ROPE_STREAM), len(self.blocks))
    return [table(k) for k in keys]

  def __call__(self, images: jax.Array, *, key: jax.Array | None = None, n_last: int = 1,
               return_attention: bool = False, masks: jax.Array | None = None,
               local: bool = False) -> ViTOutput:
    """images: (B, H, W, 3) float, normalised. key: drop-path and RoPE-augmentation
    randomness (None = eval). masks: optional (B, N) bool over patches (row-major grid);
    True = use the mask token. local: these are local crops in training (their CLS and
    storage tokens take `local_cls_norm` when the model has one)."""
    x = self.tokens(images, masks)
    keys = (jax.random.split(key, len(self.blocks)) if key is not None
            else [None] * len(self.blocks))
    tables = self.rope_tables(images, key)
    outs, attn = [], None
    for i, (block, k, t) in enumerate(zip(self.blocks, keys, tables)):
      last = i == len(self.blocks) - 1
      if self.cfg.remat != 'none' and not (return_attention and last):
        x, a = _remat_block(self.cfg.remat)(block, x, k, t, None)
      else:
        x, a = block(x, k, rope_tables=t, return_attention=return_attention and last)
      if i >= len(self.blocks) - n_last:
        outs.append(x)
      attn = a if last else attn
    normed = [self.final_norm(o, local) for o in outs]
    return self._output(normed[-1], tuple(normed), attn)

  def final_norm(self, x: jax.Array, local: bool = False) -> jax.Array:
    """The final norm of (B, T, D) tokens: `norm` on all of them, or, with untied norms, on
    the patches only, with `local_cls_norm` (local crops in training) or `cls_norm` (else
    `norm`) on CLS and storage tokens."""
    if self.cls_norm is None and self.local_cls_norm is None:
      return self.norm(x)
    r = 1 + self.cfg.n_registers
    prefix_norm = self.norm
    if local and self.local_cls_norm is not None:
      prefix_norm = self.local_cls_norm
    elif self.cls_norm is not None:
      prefix_norm = self.cls_norm
    return jnp.concatenate([prefix_norm(x[:, :r]), self.norm(x[:, r:])], axis=1)

  def _output(self, x, intermediates, attn) -> ViTOutput:
    r = 1 + self.cfg.n_registers
    return ViTOutput(cls=x[:, 0], patches=x[:, r:], intermediates=intermediates,
                     attention=attn, registers=x[:, 1:r] if r > 1 else None)

  def packed(self, images: list[jax.Array], *, keys=None, masks=None, shards: int = 1,
             local=None) -> list[ViTOutput]:
    """The outputs of `self(images[g], key=keys[g], masks=masks[g], local=local[g])` for every
    crop-size group g, computed as one packed token matrix (models/packing.py): token-wise
    work once over all crops, attention per group (RoPE tables per group). shards: batch
    shards of the crops (1 on one device), so every device packs only its own rows. Returns
    the last block's output only (no attention maps)."""
    masks = masks or [None] * len(images)
    local = local or [False] * len(images)
    xs = [self.tokens(im, m) for im, m in zip(images, masks)]
    layout = packing.Layout(tuple(x.shape[:2] for x in xs), shards)
    x = layout.join(xs)
    per_block = ([jax.random.split(k, len(self.blocks)) for k in keys] if keys is not None
                 else None)
    group_tables = [self.rope_tables(im, keys[g] if keys is not None else None)
                    for g, im in enumerate(images)]
    rope_on = self.cfg.pos_embed == 'rope'
    for i, block in enumerate(self.blocks):
      k = tuple(ks[i] for ks in per_block) if per_block is not None else None
      t = tuple(ts[i] for ts in group_tables) if rope_on else None
      if self.cfg.remat != 'none':
        x, _ = _remat_block(self.cfg.remat)(block, x, k, t, layout)
      else:
        x, _ = block(x, k, rope_tables=t, layout=layout)
    if self.cls_norm is None and self.local_cls_norm is None:
      return [self._output(o, (o,), None) for o in layout.split(self.norm(x))]
    outs = [self.final_norm(o, g_local) for o, g_local in zip(layout.split(x), local)]
    return [self._output(o, (o,), None) for o in outs]
