"""DINO loss and centering as pure functions. All math in float32.

Rows are crop-major: student_logits is (n_crops * B, K) ordered [crop0 x B, crop1 x B, ...];
teacher_logits is (n_global * B, K) for the global crops only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def teacher_probs(teacher_logits: jax.Array, center: jax.Array, teacher_temp) -> jax.Array:
  """softmax((t - center) / temp), with no gradient (the teacher is a target)."""
  t = (teacher_logits.astype(jnp.float32) - center) / teacher_temp
  return jax.lax.stop_gradient(jax.nn.softmax(t, axis=-1))


def cross_entropy_pairs(student_logits: jax.Array, targets: jax.Array, student_temp,
                        n_global: int, local_weight=None) -> jax.Array:
  """Mean over (global target i, student view v != i) pairs of batch-mean H(q_i, p_v).

  local_weight (DINOv3's dino.reweight_dino_local_loss): the pairs of local views v >= n_global
  count local_weight times in the sum (the count of pairs stays the plain one)."""
  n_rows, k = targets.shape
  b = n_rows // n_global
  n_crops = student_logits.shape[0] // b
  if n_crops * b != student_logits.shape[0] or n_global * b != n_rows:
    raise ValueError(f'student rows {student_logits.shape[0]} and teacher rows {n_rows} are not '
                     f'multiples of one batch of {b} with {n_global} global crops')
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  logp = logp.reshape(n_crops, b, k)
  q = targets.reshape(n_global, b, k)
  # ce[i, v] = batch-mean of -sum_k q_i log p_v
  ce = -jnp.einsum('ibk,vbk->iv', q, logp, precision=jax.lax.Precision.HIGHEST) / b
  not_self = jnp.arange(n_global)[:, None] != jnp.arange(n_crops)[None, :]
  if local_weight is not None:
    ce = ce * jnp.where(jnp.arange(n_crops) >= n_global, local_weight, 1.0)[None, :]
  return jnp.sum(jnp.where(not_self, ce, 0.0)) / jnp.sum(not_self)


def center_ema(center: jax.Array, batch_mean: jax.Array, momentum=0.9) -> jax.Array:
  """center * momentum + batch_mean * (1 - momentum): the update of both centers."""
  return center * momentum + batch_mean * (1.0 - momentum)


def entropy(p: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the rows of a probability matrix."""
  return -jnp.mean(jnp.sum(p * jnp.log(jnp.clip(p, 1e-30)), axis=-1))


def distill_stats(student_logits, targets, student_temp, n_global: int = 2
                  ) -> dict[str, jax.Array]:
  """Monitoring numbers: teacher entropy and KL(teacher || student) over the global crops
  (targets: the teacher probabilities, `teacher_probs` or `sinkhorn_knopp`).

  Falling teacher entropy with KL near 0 is collapse to one prototype; entropy stuck at log K
  is collapse to uniform.
  """
  q = targets
  logp = jax.nn.log_softmax(student_logits[:q.shape[0]].astype(jnp.float32) / student_temp, -1)
  kl = jnp.mean(jnp.sum(q * (jnp.log(jnp.clip(q, 1e-30)) - logp), axis=-1))
  return {'teacher_entropy': entropy(q), 'kl': kl,
          'student_entropy': entropy(jnp.exp(logp))}


def collapse_stats(teacher_logits, center, targets) -> dict[str, jax.Array]:
  """Collapse diagnostics of the teacher's output (float32, monitoring only).

  prototypes_used: exp(entropy of the batch-mean target), the effective number of prototypes
    the batch uses (K when every prototype is used evenly, 1 when one takes everything).
  logit_std: root mean square over prototypes of the across-batch standard deviation of the raw
    teacher logits: how much the teacher's output depends on the image. Divided by the
    teacher temperature it is the spread the softmax sees; when it falls far below the
    temperature the targets go uniform whatever the center does.
  center_norm: root mean square of the center's entries, on the same scale as logit_std.
  """
  t = teacher_logits.astype(jnp.float32)
  p_mean = jnp.mean(targets, axis=0, keepdims=True)
  return {'prototypes_used': jnp.exp(entropy(p_mean)),
          'logit_std': jnp.sqrt(jnp.mean(jnp.var(t, axis=0))),
          'center_norm': jnp.sqrt(jnp.mean(jnp.square(center)))}


# DINOv2 additions ------------------------------------------------------------------------


def sinkhorn_knopp(teacher_logits: jax.Array, teacher_temp, n_iters: int = 3,
                   valid: jax.Array | None = None) -> jax.Array:
  """Teacher targets by Sinkhorn-Knopp (DINOv2's alternative to centering), rows sum to 1.

  Q = exp(t / temp) over the (global) batch, normalised to total mass 1, then `n_iters` times:
  every prototype (column) to mass 1/K, every sample (row) to mass 1/B; returned times B.
  Rows where `valid` is False (padding) take no part and come back as zeros. The global max is
  subtracted before exp (a constant factor that the first normalisation removes) and empty
  sums are guarded, so large logits give finite targets where the official fp32 code
  overflows or divides 0 by 0.
  """
  t = teacher_logits.astype(jnp.float32) / teacher_temp
  keep = jnp.ones(t.shape[0], bool) if valid is None else valid
  t = jnp.where(keep[:, None], t, -jnp.inf)
  q = jnp.exp(t - jnp.max(t))
  b = jnp.sum(keep).astype(jnp.float32)
  k = t.shape[1]
  tiny = jnp.finfo(jnp.float32).tiny  # a prototype no sample reaches keeps mass 0, not NaN
  q = q / jnp.sum(q)
  for _ in range(n_iters):
    q = q / jnp.maximum(jnp.sum(q, axis=0, keepdims=True), tiny) / k
    q = q / jnp.maximum(jnp.sum(q, axis=1, keepdims=True), tiny) / b
  return jax.lax.stop_gradient(q * b)


def koleo(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Kozachenko-Leonenko entropy estimator loss: -mean_i log(||x_i - x_nn(i)|| + eps) on
  L2-normalised rows, nn(i) the most similar other row (DINOv2's regulariser)."""
  x = x.astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  sim = jnp.dot(x, x.T, precision=jax.lax.Precision.HIGHEST)
  sim = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, sim)
  nn = jax.lax.stop_gradient(jnp.argmax(sim, axis=1))
  dist = jnp.linalg.norm(x - x[nn] + eps, axis=-1)  # torch PairwiseDistance adds eps
  return -jnp.mean(jnp.log(dist + eps))


def ibot_patch_loss(student_logits: jax.Array, targets: jax.Array, weights: jax.Array,
                    student_temp, n_images: int) -> jax.Array:
  """iBOT masked-patch loss: sum_j w_j H(targets_j, softmax(s_j / temp)) / n_images.

  Rows are the masked tokens (padding rows carry weight 0); w_j = 1 / (masked count of token
  j's image), so this is the per-image mean over masked tokens averaged over all n_images
  global crops (unmasked images count in the denominator).
  """
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  ce = -jnp.sum(targets * logp, axis=-1)
  return jnp.sum(ce * weights) / n_images


def update_patch_center(center: jax.Array, patch_logits: jax.Array, valid: jax.Array,
                        momentum=0.9) -> jax.Array:
  """EMA of the mean teacher logit over the valid (masked) tokens."""
  return center_ema(center, masked_mean(patch_logits, valid), momentum)


def masked_mean(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """(1, K) mean of the rows where `valid` (f32; 0 when none is)."""
  return (jnp.sum(jnp.where(valid[:, None], logits.astype(jnp.float32), 0.0), axis=0,
                  keepdims=True) / jnp.maximum(jnp.sum(valid), 1))


# DINOv3 addition -------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis (torch F.normalize's form)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def gram_loss(student_patches: jax.Array, teacher_patches: jax.Array, *, normalized: bool = True,
              img_level: bool = True, remove_neg: bool = False,
              remove_only_teacher_neg: bool = False) -> jax.Array:
  """DINOv3's Gram anchoring loss: the mean squared difference between the Gram matrices
  (patch-to-patch inner products) of the student's and the teacher's patch tokens.

  Both inputs (images, N, D). normalized: each token L2-normalised first (cosine
  similarities). img_level: one N x N Gram matrix per image; otherwise one over all the
  images' tokens together (the whole global batch here). remove_neg: negative similarities
  of both set to 0; remove_only_teacher_neg: only the teacher's (what the official code ends
  up doing: it zeroes the student's entries where the already-zeroed teacher's are negative,
  i.e. none). The mean runs over every entry of the Gram matrices. float32; the teacher is a
  target (no gradient)."""
  s = student_patches.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_patches.astype(jnp.float32))
  if normalized:
    s, t = l2_normalize(s), l2_normalize(t)
  if not img_level:
    s, t = s.reshape(1, -1, s.shape[-1]), t.reshape(1, -1, t.shape[-1])
  gram = lambda x: jnp.einsum('bnd,bmd->bnm', x, x, precision=jax.lax.Precision.HIGHEST)
  gs, gt = gram(s), gram(t)
  if remove_neg or remove_only_teacher_neg:
    gt = jnp.where(gt < 0, 0.0, gt)
  if remove_neg:
    gs = jnp.where(gs < 0, 0.0, gs)
  return jnp.mean(jnp.square(gs - gt))
