"""Checksums of a pytree's arrays that do not depend on how the arrays are laid out.

A checkpoint stores one checksum per array beside the arrays; a restore recomputes them and a
mismatch marks the checkpoint damaged (a flipped byte that the file format reads back without
complaint would otherwise resume a run from corrupt values).

Each array's bits are read as 32-bit words w_i (16- and 8-bit types widened). The checksum is
two 32-bit sums, sum_i mix(w_i + c * i + s) mod 2^32 for two seeds s, where mix is MurmurHash3's
32-bit finaliser (a bijection) and i is the flat index. Integer sums wrap, so they are exact and
independent of the order of summation: any sharding, device count or host gives the same value,
and it runs where the arrays live (one jitted reduction per save, no transfer). Any change of one
word changes its term and hence the sum; several changes cancel with probability ~2^-64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import sharding

_SEEDS = (0x243F6A88, 0x85A308D3)
_STRIDE = np.uint32(0x9E3779B1)


def _mix(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words, one per element."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = x.dtype.itemsize * 8
  if bits > 32:
    raise TypeError(f'checksum: {x.dtype} arrays are not supported (64-bit types are off)')
  word = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
  return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
  w = _words(jnp.asarray(x)).reshape(-1)
  i = jnp.arange(w.shape[0], dtype=jnp.uint32)
  return jnp.stack([jnp.sum(_mix(w + i * _STRIDE + np.uint32(s)), dtype=jnp.uint32)
                    for s in _SEEDS])


@jax.jit
def _checksums(leaves):
  return [_array_checksum(x) for x in leaves]


def tree_checksums(tree) -> dict[str, str]:
  """{leaf path (e.g. 'params/head/mlp/0/kernel'): 16 hex digits} for every array leaf."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_checksums([x for _, x in flat]))
  return {sharding.path_name(p): f'{int(a):08x}{int(b):08x}' for (p, _), (a, b) in zip(flat, sums)}


def mismatches(tree, expected: dict[str, str]) -> list[str]:
  """Leaf paths whose checksum differs from `expected` (or that one side lacks)."""
  actual = tree_checksums(tree)
  return sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
