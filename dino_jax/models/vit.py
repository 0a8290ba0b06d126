"""Vision Transformer backbone as used by DINO and DINOv2 (pre-norm, cls token, learned pos-embed).

Weights and numerics follow the official DINO ViT: qkv bias, exact GELU, LayerNorm eps 1e-6,
stochastic depth rates linspace(0, rate) over blocks, N(0, 0.02) init for tokens and linears,
PyTorch's default uniform init for the patch convolution. Positional embeddings are resized to
other crop sizes with PyTorch bicubic semantics (A=-0.75, border clamp, the official +0.1
scale offset), computed as two small resampling matrices.

DINOv2 options (ViTConfig; all off by default, which is DINO v1): LayerScale on both residual
branches, register tokens ([CLS, registers, patches], registers get no pos-embed), a SwiGLU FFN
(hidden = ceil8(int(2/3 * mlp_ratio * D))), a learned mask token that replaces masked patch
embeddings before the pos-embed is added, and the register models' pos-embed resize (explicit
output size, PyTorch's antialiased bicubic).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# name -> (width, depth, heads). Head dim is 64 for the paper's models.
VARIANTS: dict[str, tuple[int, int, int]] = {
    'vit_pico': (96, 4, 3),  # CPU recipe: a few minutes per epoch of CIFAR on 2 cores
    'vit_tiny': (192, 12, 3),
    'vit_small': (384, 12, 6),
    'vit_base': (768, 12, 12),
    'vit_large': (1024, 24, 16),
    'vit_giant2': (1536, 40, 24),  # DINOv2 ViT-g/14 (use ffn='swiglu')
}
FFNS = ('mlp', 'swiglu')
PATCH_SIZES = (4, 8, 14, 16)
LN_EPS = 1e-6

_normal02 = nnx.initializers.normal(stddev=0.02)


def _torch_conv_init(fan_in: int):
  """PyTorch's default Conv2d init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


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
  remat: bool = False  # recompute each block's activations in the backward pass

  def __post_init__(self):
    if self.ffn not in FFNS:
      raise ValueError(f'unknown ffn {self.ffn!r}; choose one of {FFNS}')
    if self.n_registers < 0 or self.layerscale < 0:
      raise ValueError('n_registers and layerscale must be >= 0')

  @classmethod
  def from_variant(cls, arch: str, patch_size: int, **kw) -> 'ViTConfig':
    if arch not in VARIANTS:
      raise ValueError(f'unknown arch {arch!r}; choose one of {sorted(VARIANTS)}')
    width, depth, heads = VARIANTS[arch]
    return cls(width=width, depth=depth, heads=heads, patch_size=patch_size, **kw)


class ViTOutput(NamedTuple):
  cls: jax.Array  # (B, D) after the final norm
  patches: jax.Array  # (B, N, D) after the final norm
  intermediates: tuple[jax.Array, ...]  # last n block outputs, each after the final norm
  attention: jax.Array | None  # (B, H, T, T) last block softmax attention, f32; T = 1+R+N
  registers: jax.Array | None = None  # (B, R, D) register tokens after the final norm


def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
  """(out_size, in_size) matrix of torch F.interpolate(mode='bicubic', align_corners=False).

  With an explicit scale_factor torch samples src = (dst + 0.5) / scale_factor - 0.5 and uses
  the cubic convolution kernel with A = -0.75, clamping indices at the border, no antialias.
  """
  a = -0.75

  def kernel(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

  m = np.zeros((out_size, in_size), np.float64)
  for dst in range(out_size):
    src = (dst + 0.5) / scale_factor - 0.5
    base = math.floor(src)
    frac = src - base
    for k in range(-1, 3):
      idx = min(max(base + k, 0), in_size - 1)
      m[dst, idx] += kernel(frac - k)
  return m


def torch_bicubic_aa_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
  """(out_size, in_size) matrix of torch F.interpolate(mode='bicubic', antialias=True).

  PyTorch's antialiased path follows PIL: the cubic kernel with A = -0.5, widened by the
  downscale factor s = 1/scale_factor when s > 1, truncated at the border and renormalised.
  Weights are computed in float32, as PyTorch does for float32 inputs (parity to ~1e-7).
  """
  f = np.float32
  a = f(-0.5)

  def kernel(t):
    t = np.abs(t).astype(f)
    return np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, f(0))).astype(f)

  scale = f(1.0 / scale_factor)
  support = f(2.0) * max(scale, f(1.0))
  inv = f(1.0) / scale if scale >= 1.0 else f(1.0)
  m = np.zeros((out_size, in_size), f)
  for dst in range(out_size):
    center = scale * (f(dst) + f(0.5))
    lo = max(int(center - support + f(0.5)), 0)
    hi = min(int(center + support + f(0.5)), in_size)
    wts = kernel((np.arange(lo, hi).astype(f) - center + f(0.5)) * inv)
    total = f(0)
    for w in wts:  # sequential float32 sum, as torch
      total = f(total + w)
    m[dst, lo:hi] = wts / total if total != 0 else wts
  return m


def interpolate_pos_embed(pos_patch: jax.Array, h: int, w: int, offset: float = 0.1,
                          antialias: bool = False) -> jax.Array:
  """Resize (1, S*S, D) patch pos-embeds to an h x w grid as the official code does.

  offset > 0: torch scale_factor (n + offset) / S (DINO v1, DINOv2 without registers);
  offset 0: an explicit output size, scale n / S. antialias: DINOv2 register models.
  """
  n = pos_patch.shape[1]
  s = int(math.isqrt(n))
  if s * s != n:
    raise ValueError(f'pos_embed holds {n} patch positions, not a square grid')
  if h == s and w == s:
    return pos_patch
  matrix = torch_bicubic_aa_matrix if antialias else torch_bicubic_matrix
  my = matrix(s, h, (h + offset) / s)
  mx = matrix(s, w, (w + offset) / s)
  grid = pos_patch.reshape(s, s, -1)
  out = jnp.einsum('ys,xt,std->yxd', jnp.asarray(my, jnp.float32), jnp.asarray(mx, jnp.float32),
                   grid.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(1, h * w, -1).astype(pos_patch.dtype)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth: drop whole residual branches per sample, rescale survivors."""
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


# Fused attention. On GPUs in 16-bit dtypes the cuDNN flash kernel is used where it accepts
# the shape; some cuDNN/JAX versions refuse odd sequence lengths (ViT's 197 and 37 tokens) when
# training, so tokens are padded to a multiple of ATTENTION_PAD with the padding masked out
# through per-example sequence lengths. Which padding cuDNN accepts is found once per shape by
# tracing its gradient apart (`_cudnn_padding`): a refusal raised inside the step's own trace
# could surface outside any try (under remat or scan the forward rule runs later). Where cuDNN
# accepts no padding, or is missing, XLA's softmax(QK^T)V runs.
# DINO_JAX_ATTENTION=xla|cudnn|auto (default auto) forces a path, e.g. to compare speeds.
ATTENTION_PAD = (8, 64)


def _forced_attention() -> str:
  forced = os.environ.get('DINO_JAX_ATTENTION', 'auto')
  if forced not in ('auto', 'xla', 'cudnn'):
    raise ValueError(f'DINO_JAX_ATTENTION={forced!r}: expected auto, xla or cudnn')
  return forced


def attention_implementation(dtype) -> str:
  """'cudnn' on GPUs in 16-bit dtypes (unless DINO_JAX_ATTENTION=xla), else 'xla'."""
  forced = _forced_attention()
  if forced != 'auto':
    return forced
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return 'cudnn' if half and jax.default_backend() == 'gpu' else 'xla'


def padded_attention(q, k, v, scale: float, multiple: int, implementation: str):
  """dot_product_attention over tokens padded to `multiple`; padded keys are masked out and
  padded queries dropped, so the result equals unpadded attention."""
  b, n = q.shape[:2]
  pad = (-n) % multiple
  if pad == 0:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  widths = ((0, 0), (0, pad), (0, 0), (0, 0))
  q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
  lengths = jnp.full((b,), n, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :n]


@functools.lru_cache(maxsize=None)
def _cudnn_padding(shape: tuple[int, ...], dtype) -> tuple[int | None, str]:
  """(the first padding multiple, of 1 and ATTENTION_PAD, for which cuDNN traces attention
  over (B, N, H, D) inputs of `shape` with its gradient, or None; the last refusal)."""
  x = jax.ShapeDtypeStruct(shape, dtype)
  refusal = ''
  for multiple in (1,) + tuple(m for m in ATTENTION_PAD if shape[1] % m):
    loss = lambda q, k, v, m=multiple: padded_attention(q, k, v, 1.0, m, 'cudnn').astype(
        jnp.float32).sum()
    try:
      jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
      return multiple, ''
    except (NotImplementedError, RuntimeError, ValueError) as e:  # refused, or no cuDNN
      refusal = f'{type(e).__name__}: {e}'.splitlines()[0]
  return None, refusal


def fused_attention(q, k, v, scale: float):
  """softmax(q k^T * scale) v for (B, N, H, D) inputs through the fastest available kernel."""
  if attention_implementation(q.dtype) == 'cudnn':
    multiple, refusal = _cudnn_padding(tuple(q.shape), jnp.dtype(q.dtype))
    if multiple is not None:
      return padded_attention(q, k, v, scale, multiple, 'cudnn')
    if _forced_attention() == 'cudnn':
      raise ValueError(f'DINO_JAX_ATTENTION=cudnn, but cuDNN takes no attention over '
                       f'{tuple(q.shape)} {q.dtype} ({refusal}); unset it to fall back to XLA')
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='xla')


class Attention(nnx.Module):

  def __init__(self, dim: int, heads: int, *, dtype, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=_normal02, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, kernel_init=_normal02, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, return_attention: bool = False):
    b, n, d = x.shape
    hd = d // self.heads
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd)  # rows [q|k|v], head-major, as PyTorch
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if not return_attention:  # fused kernel where the platform has one (cuDNN on GPUs)
      out = fused_attention(q, k, v, hd ** -0.5)
      return self.proj(out.reshape(b, n, d)), None
    # The exact path that also returns the f32 softmax maps (visualisation).
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (hd ** -0.5)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn.astype(v.dtype), v).reshape(b, n, d)
    return self.proj(out), attn


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), as PyTorch's nn.GELU writes it: 0.5 x (1 + erf(x / sqrt 2)).

  Same function as jax.nn.gelu(approximate=False) (within 2e-6), which goes through erfc: XLA
  evaluates erfc with an exponential and range selects but erf as one rational polynomial, so
  this form is about 2x faster on CPUs. The derivative Phi(x) + x phi(x) is given directly."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
  return x * cdf, (cdf + x * pdf) * dx


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


class Mlp(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden, kernel_init=_normal02, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, kernel_init=_normal02, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(gelu(self.fc1(x)))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
  """DINOv2's SwiGLU hidden width: 2/3 of the MLP width, rounded up to a multiple of 8."""
  return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLU(nnx.Module):
  """w3(silu(a) * b) with [a | b] = w12(x): the first half of w12 is the gate."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.w12 = nnx.Linear(dim, 2 * hidden, kernel_init=_normal02, dtype=dtype, rngs=rngs)
    self.w3 = nnx.Linear(hidden, dim, kernel_init=_normal02, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    a, b = jnp.split(self.w12(x), 2, axis=-1)
    return self.w3(jax.nn.silu(a) * b)


class LayerScale(nnx.Module):
  """Per-channel scale of a residual branch, gamma initialised to `init`."""

  def __init__(self, dim: int, init: float):
    self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


def _ffn(cfg: ViTConfig, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.ffn == 'swiglu':
    return SwiGLU(cfg.width, swiglu_hidden(cfg.width, cfg.mlp_ratio), dtype=dtype, rngs=rngs)
  return Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), dtype=dtype, rngs=rngs)


class Block(nnx.Module):

  def __init__(self, cfg: ViTConfig, drop_path_rate: float, *, dtype, rngs: nnx.Rngs):
    dim = cfg.width
    self.drop_path_rate = drop_path_rate
    self.norm1 = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, cfg.heads, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
    self.mlp = _ffn(cfg, dtype=dtype, rngs=rngs)
    self.ls1 = LayerScale(dim, cfg.layerscale) if cfg.layerscale else None
    self.ls2 = LayerScale(dim, cfg.layerscale) if cfg.layerscale else None

  def __call__(self, x, key=None, *, return_attention=False):
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    y, attn = self.attn(self.norm1(x), return_attention=return_attention)
    y = self.ls1(y) if self.ls1 is not None else y
    x = x + drop_path(y, self.drop_path_rate, k1)
    y = self.mlp(self.norm2(x))
    y = self.ls2(y) if self.ls2 is not None else y
    x = x + drop_path(y, self.drop_path_rate, k2)
    return x, attn


@nnx.remat
def _remat_block(block: Block, x, key):
  """A block whose activations are recomputed in the backward pass (ViTConfig.remat)."""
  return block(x, key)


class ViT(nnx.Module):
  """DINO / DINOv2 ViT. Call with NHWC images (and optional patch masks); returns a ViTOutput."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    d, p = cfg.width, cfg.patch_size
    self.patch_embed = nnx.Conv(3, d, kernel_size=(p, p), strides=(p, p), padding='VALID',
                                dtype=dtype, kernel_init=_torch_conv_init(3 * p * p),
                                bias_init=_torch_conv_init(3 * p * p), rngs=rngs)
    grid = cfg.img_size // p
    self.cls_token = nnx.Param(_normal02(rngs.params(), (1, 1, d)))
    self.pos_embed = nnx.Param(_normal02(rngs.params(), (1, 1 + grid * grid, d)))
    self.register_tokens = (nnx.Param(1e-6 * jax.random.normal(
        rngs.params(), (1, cfg.n_registers, d))) if cfg.n_registers else None)
    self.mask_token = nnx.Param(jnp.zeros((1, d), jnp.float32)) if cfg.mask_token else None
    rates = (np.full(cfg.depth, cfg.drop_path_rate) if cfg.drop_path_uniform
             else np.linspace(0.0, cfg.drop_path_rate, cfg.depth))
    self.blocks = nnx.List([Block(cfg, float(r), dtype=dtype, rngs=rngs) for r in rates])
    self.norm = nnx.LayerNorm(d, epsilon=LN_EPS, dtype=dtype, rngs=rngs)

  def tokens(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
    """Patch-embed NHWC images, put the mask token where `masks` (B, N) is True, add the
    (interpolated) positional embedding, and insert the register tokens after CLS."""
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
    pos = self.pos_embed[...]
    pos_patch = interpolate_pos_embed(pos[:, 1:], h // p, w // p, cfg.interpolate_offset,
                                      cfg.interpolate_antialias)
    d = x.shape[-1]
    parts = [jnp.broadcast_to(self.cls_token[...] + pos[:, :1], (b, 1, d)).astype(self.dtype)]
    if self.register_tokens is not None:
      parts.append(jnp.broadcast_to(self.register_tokens[...], (b, cfg.n_registers, d))
                   .astype(self.dtype))
    return jnp.concatenate(parts + [x + pos_patch.astype(self.dtype)], axis=1)

  def __call__(self, images: jax.Array, *, key: jax.Array | None = None, n_last: int = 1,
               return_attention: bool = False, masks: jax.Array | None = None) -> ViTOutput:
    """images: (B, H, W, 3) float, normalised. key: drop-path randomness (None = eval).
    masks: optional (B, N) bool over patches (row-major grid); True = use the mask token."""
    x = self.tokens(images, masks)
    keys = (jax.random.split(key, len(self.blocks)) if key is not None
            else [None] * len(self.blocks))
    outs, attn = [], None
    for i, (block, k) in enumerate(zip(self.blocks, keys)):
      last = i == len(self.blocks) - 1
      if self.cfg.remat and not (return_attention and last):
        x, a = _remat_block(block, x, k)
      else:
        x, a = block(x, k, return_attention=return_attention and last)
      if i >= len(self.blocks) - n_last:
        outs.append(x)
      attn = a if last else attn
    normed = [self.norm(o) for o in outs]
    r = 1 + self.cfg.n_registers
    return ViTOutput(cls=normed[-1][:, 0], patches=normed[-1][:, r:],
                     intermediates=tuple(normed), attention=attn,
                     registers=normed[-1][:, 1:r] if r > 1 else None)
