"""Packed crops: the tokens of crops of several sizes held as one token matrix.

The student sees 2 global and n local crops, two token counts (197 and 37 for ViT-S/16 at 224
and 96 px). Packed, every token-wise part of a block (LayerNorm, qkv, proj, MLP, LayerScale,
drop-path) runs once over all crops' tokens, one matrix product per kernel instead of one per
crop size, and only attention is split: each crop-size group is reshaped back to
(n_crops * B, T, D) and attended on its own, so attention stays within each crop with exactly
the shapes (and the cuDNN padding) of one pass per size, and no flop goes to the zero blocks
of a block-diagonal mask over the concatenated sequence.

Layout: a (P * M, D) matrix, P the number of batch shards: the rows of shard p are contiguous
and hold its own crops of every group, group after group (crops p * n/P ... (p+1) * n/P - 1 of
a group of n crops, each T tokens), so packing and unpacking never move data between devices.
A group's crops come back in their original order: (P, n/P * T, D) reshaped to (n, T, D)
undoes the packing exactly. The matrix is 2-D on purpose: on XLA's CPU backend the gradient of
a 2-layer MLP (width 192 -> 768 -> 192) over 5,712 tokens took 101 ms as a (1, M, D) input,
59 ms as (M, D) and 61 ms as two (B, T, D) groups (fastest of 30 runs each, loaded machine).
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static shape of a packed token matrix: ((rows, tokens) per group, batch shards)."""
  groups: tuple[tuple[int, int], ...]
  shards: int = 1

  def __post_init__(self):
    for n, _ in self.groups:
      if n % self.shards:
        raise ValueError(f'{n} crops do not split over {self.shards} batch shards')

  @property
  def sizes(self) -> tuple[int, ...]:
    """Tokens of each group in one shard's row of the packed matrix."""
    return tuple(n // self.shards * t for n, t in self.groups)

  def join(self, xs) -> jax.Array:
    """[(n_g, T_g, ...) per group] -> (P * M, ...)."""
    p, rest = self.shards, xs[0].shape[2:]
    return jnp.concatenate([x.reshape(p, s, *rest) for x, s in zip(xs, self.sizes)],
                           axis=1).reshape(p * sum(self.sizes), *rest)

  def split(self, x: jax.Array) -> list[jax.Array]:
    """(P * M, ...) -> [(n_g, T_g, ...) per group]. One split, not a slice per group: its
    gradient is one concatenation, where slices' would be a zero-padded full-size array per
    group, summed."""
    x = x.reshape(self.shards, -1, *x.shape[1:])
    parts = jnp.split(x, list(itertools.accumulate(self.sizes))[:-1], axis=1)
    return [part.reshape(n, t, *x.shape[2:]) for part, (n, t) in zip(parts, self.groups)]

  def per_token(self, values) -> jax.Array:
    """[(n_g,) per-crop values per group] -> (P * M,): each crop's value on its tokens."""
    p = self.shards
    return jnp.concatenate([jnp.repeat(v.reshape(p, n // p), t, axis=1)
                            for v, (n, t) in zip(values, self.groups)], axis=1).reshape(-1)


def drop_path(x: jax.Array, rate: float, keys, layout: Layout) -> jax.Array:
  """Stochastic depth on a packed (P * M, D) matrix: the per-crop draws of `vit.drop_path` for
  each group (same key, same shape, so the same crops are dropped), spread over the tokens."""
  if keys is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  masks = [jax.random.bernoulli(k, keep, (n, 1, 1)).reshape(n)
           for k, (n, _) in zip(keys, layout.groups)]
  return jnp.where(layout.per_token(masks)[..., None], x / keep, 0).astype(x.dtype)
