"""DINO projection head: MLP -> L2 normalise -> weight-normalised prototypes (no bias).

Parameter layout mirrors the official head transposed to Flax's (in, out) convention:
`last_layer.weight_v` is (bottleneck, K) and `last_layer.weight_g` is (1, K), so that the
official (K, 256) / (K, 1) tensors convert by a transpose. With `norm_last_layer` the optimizer
never updates g (it stays 1) and the last layer is cosine similarity to K unit prototypes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models import vit

_normal02 = nnx.initializers.normal(stddev=0.02)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis, as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
  return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class WeightNormLinear(nnx.Module):
  """y = x @ (g * v / ||v||), the norm taken per output column (PyTorch weight_norm, dim=0)."""

  def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(in_dim)  # torch's default Linear init, kept by the official head
    self.weight_v = nnx.Param(jax.random.uniform(rngs.params(), (in_dim, out_dim), jnp.float32,
                                                 -bound, bound))
    self.weight_g = nnx.Param(jnp.ones((1, out_dim), jnp.float32))

  def weight(self) -> jax.Array:
    """The (in, out) float32 matrix g * v / ||v||: the prototypes as columns."""
    v = self.weight_v[...]
    return self.weight_g[...] * v / jnp.linalg.norm(v, axis=0, keepdims=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.weight().astype(x.dtype)


class DINOHead(nnx.Module):

  def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048,
               bottleneck_dim: int = 256, nlayers: int = 3, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if nlayers < 1:
      raise ValueError(f'head nlayers must be >= 1, got {nlayers}')
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    self.mlp = nnx.List([nnx.Linear(a, b, kernel_init=_normal02, dtype=dtype, rngs=rngs)
                         for a, b in zip(dims[:-1], dims[1:])])
    self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The L2-normalised bottleneck the prototypes are matched against (the last layer's
    input; `prototype_loss` takes these with `last_layer.weight()` to work in chunks)."""
    for i, layer in enumerate(self.mlp):
      x = layer(x)
      if i < len(self.mlp) - 1:
        x = vit.gelu(x)
    return l2_normalize(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.last_layer(self.features(x))
