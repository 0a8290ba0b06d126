"""Patch embeddings: how a ViT turns an NHWC image into its grid of patch tokens.

'patch' (DINO, DINOv2, DINOv3 and every released checkpoint): one p x p convolution with
stride p, a linear map of each patch's pixels.

'conv' (an option for small images and small data; Xiao et al. 2021, "Early convolutions help
transformers see better"): log2(p) 3 x 3 convolutions of stride 2, each followed by a
LayerNorm over channels and a GELU, widths doubling up to the model width, then a 1 x 1
convolution to the width. Same (B, H/p, W/p, D) grid as 'patch', so everything after the
embedding (pos-embed, masking, registers, packing) is unchanged; each token is a nonlinear
feature of its patch (and of a one-pixel-per-stage border around it) instead of a linear one.

'shifted' (another small-data option; Lee et al. 2021, "Vision Transformer for Small-Size
Datasets", shifted patch tokenization): the image and four copies shifted by half a patch
along the diagonals (zero padding: the mean colour after normalisation) are concatenated on
channels, cut into p x p patches, LayerNorm-ed over each patch vector (5 * 3 * p * p values)
and mapped linearly to the width. Each token then sees its patch and half of each neighbour,
at the cost of a 5x larger (and still small) embedding matrix.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.ffn import gelu

STEMS = ('patch', 'conv', 'shifted')
LN_EPS = 1e-6


def torch_conv_init(fan_in: int):
  """PyTorch's default Conv2d init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def conv_widths(width: int, patch_size: int) -> tuple[int, ...]:
  """Output channels of the stride-2 stages of the 'conv' stem: width / 2^(n-1), ..., width
  for n = log2(patch_size) stages (ViT-pico/8: 24, 48, 96)."""
  n = int(math.log2(patch_size))
  if 2 ** n != patch_size or n < 1:
    raise ValueError(f"stem 'conv' needs a power-of-two patch size, got {patch_size}")
  return tuple(max(width >> (n - 1 - i), 8) for i in range(n))


def _conv(cin: int, cout: int, k: int, stride: int, padding, dtype, rngs) -> nnx.Conv:
  init = torch_conv_init(cin * k * k)
  return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=padding,
                  dtype=dtype, kernel_init=init, bias_init=init, rngs=rngs)


class ConvStem(nnx.Module):
  """log2(p) x [3x3 conv stride 2, LayerNorm, GELU], then a 1x1 conv to `width`."""

  def __init__(self, width: int, patch_size: int, *, dtype, rngs: nnx.Rngs):
    widths = conv_widths(width, patch_size)
    cins = (3,) + widths[:-1]
    self.convs = nnx.List([_conv(ci, co, 3, 2, ((1, 1), (1, 1)), dtype, rngs)
                           for ci, co in zip(cins, widths)])
    self.norms = nnx.List([nnx.LayerNorm(co, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
                           for co in widths])
    self.proj = _conv(widths[-1], width, 1, 1, 'VALID', dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv, norm in zip(self.convs, self.norms):
      x = gelu(norm(conv(x)))  # exact GELU, written as the ViT's MLP writes it
    return self.proj(x)


class ShiftedPatchStem(nnx.Module):
  """Shifted patch tokenization: [x, 4 diagonal half-patch shifts] -> patches -> LN -> linear."""

  def __init__(self, width: int, patch_size: int, *, dtype, rngs: nnx.Rngs):
    self.patch_size = patch_size
    n_in = 5 * 3 * patch_size * patch_size
    self.norm = nnx.LayerNorm(n_in, epsilon=LN_EPS, dtype=dtype, rngs=rngs)
    init = torch_conv_init(n_in)
    self.proj = nnx.Linear(n_in, width, dtype=dtype, kernel_init=init, bias_init=init,
                           rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p, s = self.patch_size, self.patch_size // 2
    padded = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
    # copy (dy, dx) holds x[i + dy, j + dx] at (i, j), zero outside the image
    copies = [x] + [padded[:, s + dy:s + dy + h, s + dx:s + dx + w]
                    for dy, dx in ((-s, -s), (-s, s), (s, -s), (s, s))]
    x = jnp.concatenate(copies, axis=-1)  # (B, H, W, 5C)
    x = x.reshape(b, h // p, p, w // p, p, 5 * c).transpose(0, 1, 3, 2, 4, 5)
    return self.proj(self.norm(x.reshape(b, h // p, w // p, p * p * 5 * c)))


def make(stem: str, width: int, patch_size: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  """The patch embedding named `stem`: NHWC images -> (B, H/p, W/p, width)."""
  if stem == 'patch':
    return _conv(3, width, patch_size, patch_size, 'VALID', dtype, rngs)
  if stem == 'conv':
    return ConvStem(width, patch_size, dtype=dtype, rngs=rngs)
  if stem == 'shifted':
    return ShiftedPatchStem(width, patch_size, dtype=dtype, rngs=rngs)
  raise ValueError(f'unknown stem {stem!r}; choose one of {STEMS}')
