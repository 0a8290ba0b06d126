"""The DINO and iBOT cross-entropies over K prototypes, in chunks of the prototype axis.

With K = 65536 the student's logits are the biggest activation of a DINO step (1,536 rows x
65,536 x 4 bytes = 400 MB for 128 images and 12 crops), and the plain path (losses.py) passes
them, the teacher's and their softmaxes through several f32 buffers and again in the backward
pass. Here the last layer's matrix product, the teacher softmax, the student log-softmax and
the cross-entropy run together over column chunks (`config.loss.prototype_chunk` prototypes at
a time), keeping per-row statistics only:

- teacher (`centered_targets`): pass 1 takes each row's max m and z = sum exp(u - m) of
  u = (t - center) / temp online (a rising max rescales z), the batch mean for the center
  update and the logit variance; pass 2 recomputes each chunk's logits and writes the targets
  q = exp(u - m) / z (as a softmax does: subtracting a rounded log-sum-exp of a large u would
  cost digits), with the entropy and batch-mean-target statistics of `losses.distill_stats` /
  `collapse_stats`. q, (rows x K) f32, is the one full-width array kept: the student needs it;
- student (`cross_entropy`): one pass takes each row's max, z and the cross terms, all as sums
  of (s - m) so that no two large sums cancel; the backward pass (a custom VJP) recomputes each
  chunk's logits from the bottleneck features, so no (rows x K) array of the student exists.

Sinkhorn-Knopp targets need every logit of the batch at once: with them the teacher runs the
plain path and only the student is chunked. Matrix products take the compute dtype (bf16 on
accelerators) with f32 accumulation; every statistic is f32. In f32 the results equal the
plain path's within float rounding (tests/test_prototype_loss.py). Targets are held
chunk-major, (n_chunks, rows, chunk).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dino_jax import losses

_HIGHEST = jax.lax.Precision.HIGHEST


def chunking(k: int, chunk: int) -> tuple[int, int]:
  """(chunk size, number of chunks) for K prototypes; chunk <= 0 or >= K is one chunk."""
  size = k if chunk <= 0 or chunk >= k else chunk
  if k % size:
    raise ValueError(f'prototype chunk {chunk} does not divide the {k} prototypes')
  return size, k // size


def to_chunks(x: jax.Array, size: int) -> jax.Array:
  """(rows, K) -> (K / size, rows, size)."""
  return x.reshape(x.shape[0], -1, size).transpose(1, 0, 2)


def from_chunks(x: jax.Array) -> jax.Array:
  """(n_chunks, rows, size) -> (rows, K)."""
  return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


def _logits(feats, w, i, size):
  """f32 logits of prototypes [i * size, (i + 1) * size): a compute-dtype product, f32 sums."""
  wc = jax.lax.dynamic_slice_in_dim(w, i * size, size, axis=1).astype(feats.dtype)
  return jnp.dot(feats, wc, preferred_element_type=jnp.float32)


def _chunk_of(x, i, size):
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


class Targets(NamedTuple):
  q: jax.Array  # (n_chunks, rows, size) teacher probabilities, f32
  batch_mean: jax.Array  # (1, K) mean raw teacher logit over the (valid) rows
  stats: dict  # teacher_entropy, prototypes_used, logit_std (monitoring, all rows)


def centered_targets(feats: jax.Array, w: jax.Array, center: jax.Array, temp, chunk: int,
                     valid: jax.Array | None = None) -> Targets:
  """softmax((feats @ w - center) / temp) in chunks, as `losses.teacher_probs`, with the
  batch mean for `losses.center_ema` (over the `valid` rows when given, as
  `losses.update_patch_center`) and the teacher statistics of the plain path."""
  feats, w = jax.lax.stop_gradient(feats), jax.lax.stop_gradient(w)
  n, k = feats.shape[0], w.shape[1]
  size, count = chunking(k, chunk)

  def scaled(i):
    t = _logits(feats, w, i, size)
    return t, (t - _chunk_of(center, i, size)) / temp

  def pass1(carry, i):
    m, z, var_sum = carry
    t, u = scaled(i)
    m_new = jnp.maximum(m, jnp.max(u, axis=-1))
    z = z * jnp.exp(m - m_new) + jnp.sum(jnp.exp(u - m_new[:, None]), axis=-1)
    mean = jnp.mean(t, axis=0) if valid is None else losses.masked_mean(t, valid)[0]
    return (m_new, z, var_sum + jnp.sum(jnp.var(t, axis=0))), mean

  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
          jnp.zeros((), jnp.float32))
  (m, z, var_sum), means = jax.lax.scan(pass1, init, jnp.arange(count))

  def pass2(carry, i):
    plogp, pbar_logp = carry
    _, u = scaled(i)
    q = jnp.exp(u - m[:, None]) / z[:, None]  # as softmax: no rounding of a large lse
    pbar = jnp.mean(q, axis=0)
    return (plogp + jnp.sum(q * jnp.log(jnp.clip(q, 1e-30))),
            pbar_logp + jnp.sum(pbar * jnp.log(jnp.clip(pbar, 1e-30)))), q

  zero = jnp.zeros((), jnp.float32)
  (plogp, pbar_logp), q = jax.lax.scan(pass2, (zero, zero), jnp.arange(count))
  stats = {'teacher_entropy': -plogp / n, 'prototypes_used': jnp.exp(-pbar_logp),
           'logit_std': jnp.sqrt(var_sum / k)}
  return Targets(q, means.reshape(1, k), stats)


def dino_pairs(n_global: int, n_crops: int, batch: int) -> jax.Array:
  """(n_global, n_crops, B) weights of `losses.cross_entropy_pairs`: every (global target i,
  student view v != i) pair, each image's term over B and the pairs' count."""
  not_self = jnp.arange(n_global)[:, None] != jnp.arange(n_crops)[None, :]
  w = not_self / (batch * jnp.sum(not_self))
  return jnp.broadcast_to(w[:, :, None], (n_global, n_crops, batch)).astype(jnp.float32)


def row_pairs(weights: jax.Array, n_images: int) -> jax.Array:
  """(1, 1, rows) weights of `losses.ibot_patch_loss`: row j against target j, w_j / n."""
  return (weights / n_images).astype(jnp.float32)[None, None, :]


def cross_entropy(feats: jax.Array, w: jax.Array, q: jax.Array, coef: jax.Array,
                  temp: float) -> tuple[jax.Array, dict]:
  """sum_{i, v, m} coef[i, v, m] H(q[i, m], softmax(feats[v, m] @ w / temp)).

  feats: (n_views * M, E) student bottleneck features, view-major; w: (E, K) f32 prototypes;
  q: (n_chunks, n_targets * M, size) targets from `centered_targets` or `to_chunks`; coef:
  (n_targets, n_views, M) from `dino_pairs` or `row_pairs`. Gradients reach feats and w
  (q and coef are targets). Also returns, without gradient, over the first n_targets views
  (the student's own global crops, row-aligned with the targets): 'cross_self', the mean of
  sum_k q log p, and 'student_entropy', the mean entropy of p.
  """
  return _cross_entropy(feats, w, jax.lax.stop_gradient(q), coef, temp)


def _student_pass(feats, w, q, coef, temp):
  """Forward statistics per student row, taken online with the running max m: z = sum e^(s-m),
  and the sums x = sum_k r (s - m), d = sum_k q (s - m) (own targets) and a = sum_k e^(s-m)
  (s - m) (entropy), each moved to a new max as it rises. Shifted by m, no sum cancels
  against another (sum r s and sum r lse would, both near |s| >> the loss)."""
  n_t, n_v, m_rows = coef.shape
  count, _, size = q.shape

  def body(carry, i):
    m, z, x, r_sum, a, d, sq = carry
    s = (_logits(feats, w, i, size) / temp).reshape(n_v, m_rows, size)
    qi = q[i].reshape(n_t, m_rows, size)
    r = jnp.einsum('ivm,imk->vmk', coef, qi, precision=_HIGHEST)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    shift = jnp.where(jnp.isfinite(m), m - m_new, 0.0)  # <= 0; nothing summed yet: 0
    scale = jnp.exp(shift)
    sm = s - m_new[..., None]
    e = jnp.exp(sm)
    own = (slice(None, n_t),)
    return (m_new, z * scale + jnp.sum(e, axis=-1),
            x + r_sum * shift + jnp.sum(r * sm, axis=-1), r_sum + jnp.sum(r, axis=-1),
            scale[own] * (a + shift[own] * z[own]) + jnp.sum(e[own] * sm[own], axis=-1),
            d + sq * shift[own] + jnp.sum(qi * sm[own], axis=-1),
            sq + jnp.sum(qi, axis=-1)), None

  f32 = jnp.float32
  rows_v, rows_t = jnp.zeros((n_v, m_rows), f32), jnp.zeros((n_t, m_rows), f32)
  init = (jnp.full((n_v, m_rows), -jnp.inf, f32), rows_v, rows_v, rows_v, rows_t, rows_t, rows_t)
  (m, z, x, r_sum, a, d, sq), _ = jax.lax.scan(body, init, jnp.arange(count))
  log_z = jnp.log(z)  # log-sum-exp - m
  loss = jnp.sum(r_sum * log_z - x)  # sum r (lse - s)
  aux = {'cross_self': jnp.mean(d - log_z[:n_t] * sq),  # sum q log p = sum q (s - m - log z)
         'student_entropy': jnp.mean(log_z[:n_t] - a / z[:n_t])}
  return loss, aux, m, z, r_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cross_entropy(feats, w, q, coef, temp):
  loss, aux, _, _, _ = _student_pass(feats, w, q, coef, temp)
  return loss, aux


def _fwd(feats, w, q, coef, temp):
  loss, aux, m, z, r_sum = _student_pass(feats, w, q, coef, temp)
  return (loss, aux), (feats, w, q, coef, m, z, r_sum)


def _bwd(temp, res, cts):
  """d loss / d s[v, m, k] = (p[v, m, k] r_sum[v, m] - r[v, m, k]) / temp with
  r = sum_i coef[i, v, m] q[i, m, k], each chunk's logits recomputed; the statistics in aux
  carry no gradient."""
  feats, w, q, coef, m, z, r_sum = res
  g = cts[0]
  n_t, n_v, m_rows = coef.shape
  count, _, size = q.shape

  def body(carry, i):
    dfeats, dw = carry
    s = (_logits(feats, w, i, size) / temp).reshape(n_v, m_rows, size)
    r = jnp.einsum('ivm,imk->vmk', coef, q[i].reshape(n_t, m_rows, size), precision=_HIGHEST)
    p = jnp.exp(s - m[..., None]) / z[..., None]
    ds = (g / temp) * (p * r_sum[..., None] - r)
    ds = ds.reshape(n_v * m_rows, size).astype(feats.dtype)
    wc = jax.lax.dynamic_slice_in_dim(w, i * size, size, axis=1).astype(feats.dtype)
    dfeats = dfeats + jnp.dot(ds, wc.T, preferred_element_type=jnp.float32)
    dwc = jnp.dot(feats.T, ds, preferred_element_type=jnp.float32)
    return (dfeats, jax.lax.dynamic_update_slice_in_dim(dw, dwc, i * size, axis=1)), None

  init = (jnp.zeros(feats.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
  (dfeats, dw), _ = jax.lax.scan(body, init, jnp.arange(count))
  return (dfeats.astype(feats.dtype), dw.astype(w.dtype), jnp.zeros_like(q),
          jnp.zeros_like(coef))


_cross_entropy.defvjp(_fwd, _bwd)
