"""Patch embeddings: how a ViT turns an NHWC image into its grid of patch tokens.

'patch' (DINO, DINOv2, DINOv3 and every released checkpoint): one p x p convolution with
stride p, a linear map of each patch's pixels.

'conv' (an option for small images and small data; Xiao et al. 2021, "Early convolutions help
transformers see better"): log2(p) 3 x 3 convolutions of stride 2, each followed by a
LayerNorm over channels and a GELU, widths doubling up to the model width, then a 1 x 1
convolution to the width. Same (B, H/p, W/p, D) grid as 'patch', so everything after the
embedding (pos-embed, masking, registers, packing) is unchanged; each token is a nonlinear
feature of its patch (and of a one-pixel-per-stage border around it) instead of a linear one.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.ffn import gelu

STEMS = ('patch', 'conv')
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


def make(stem: str, width: int, patch_size: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  """The patch embedding named `stem`: NHWC images -> (B, H/p, W/p, width)."""
  if stem == 'patch':
    return _conv(3, width, patch_size, patch_size, 'VALID', dtype, rngs)
  if stem == 'conv':
    return ConvStem(width, patch_size, dtype=dtype, rngs=rngs)
  raise ValueError(f'unknown stem {stem!r}; choose one of {STEMS}')
