"""Multi-head self-attention of the ViT blocks, and the fused kernel it runs on.

`Attention` projects tokens to q, k, v (one fused qkv linear, rows [q|k|v] head-major as in
PyTorch), rotates q and k of the patch tokens with RoPE when the model has it (models/rope.py),
and attends within each crop-size group of a packed token matrix (models/packing.py).
`KMaskedBiasLinear` is DINOv3's qkv projection with the k third of the bias masked out.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax.models import packing, rope

normal02 = nnx.initializers.normal(stddev=0.02)


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


class KMaskedBiasLinear(nnx.Linear):
  """The qkv projection of DINOv3's `mask_k_bias` (its LinearKMaskedBias): the bias is
  multiplied by a mask that is 0 on the k third of the outputs [D, 2D) and 1 elsewhere, so keys
  get no bias (that part of the parameter stays at its init and gets no gradient)."""

  def __call__(self, x):
    kernel, bias = self.kernel[...], self.bias[...]
    o = bias.shape[-1]
    mask = np.ones(o, np.float32)
    mask[o // 3: 2 * o // 3] = 0
    x, kernel, bias = self.promote_dtype((x, kernel, bias * mask.astype(bias.dtype)),
                                         dtype=self.dtype)
    y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    return y + bias


class Attention(nnx.Module):

  def __init__(self, dim: int, heads: int, *, dtype, rngs: nnx.Rngs, qkv_bias: bool = True,
               mask_k_bias: bool = False):
    self.heads = heads
    linear = KMaskedBiasLinear if mask_k_bias and qkv_bias else nnx.Linear
    self.qkv = linear(dim, 3 * dim, use_bias=qkv_bias, kernel_init=normal02, dtype=dtype,
                      rngs=rngs)
    self.proj = nnx.Linear(dim, dim, kernel_init=normal02, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, rope_tables=None, return_attention: bool = False,
               layout: packing.Layout | None = None):
    """x: (B, N, D) tokens of one crop size, or a packed (P * M, D) matrix with its `layout`:
    qkv and proj run over all tokens at once, attention within each crop-size group.
    rope_tables: RoPE (sin, cos) of the tokens (models/rope.py; one pair per group when
    packed), or None."""
    d = x.shape[-1]
    hd = d // self.heads
    qkv = self.qkv(x)
    if layout is not None:
      tables = rope_tables if rope_tables is not None else [None] * len(layout.groups)
      out = [self._attend(g, hd, t) for g, t in zip(layout.split(qkv), tables)]
      return self.proj(layout.join(out)), None
    if not return_attention:
      return self.proj(self._attend(qkv, hd, rope_tables)), None
    # The exact path that also returns the f32 softmax maps (visualisation).
    b, n, _ = x.shape
    q, k, v = self._heads(qkv, hd, rope_tables)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (hd ** -0.5)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn.astype(v.dtype), v).reshape(b, n, d)
    return self.proj(out), attn

  def _heads(self, qkv, hd, rope_tables=None):
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, self.heads, hd)  # rows [q|k|v], head-major, as PyTorch
    # one split (its gradient one concatenation), not three slices (three zero-padded sums)
    q, k, v = (t.reshape(b, n, self.heads, hd) for t in jnp.split(qkv, 3, axis=2))
    if rope_tables is not None:
      q, k = rope.apply(q, *rope_tables), rope.apply(k, *rope_tables)
    return q, k, v

  def _attend(self, qkv, hd, rope_tables=None):
    """(B, N, 3D) qkv of one crop size -> (B, N, D), through the fused kernel where the
    platform has one (cuDNN on GPUs)."""
    b, n, _ = qkv.shape
    q, k, v = self._heads(qkv, hd, rope_tables)
    return fused_attention(q, k, v, hd ** -0.5).reshape(b, n, self.heads * hd)
