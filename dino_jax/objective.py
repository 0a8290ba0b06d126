"""The training objective: a list of terms, each a pure function, summed with weights from
config.loss.

`Objective` is the spec (from the config). The teacher's side, outside the gradient:
`teacher_targets` turns the teacher's outputs into targets (centred softmax or Sinkhorn-Knopp,
over all prototypes at once or, with loss.prototype_chunk, in chunks: prototype_loss.py).
The student's side, inside the gradient: each term of `TERMS` reads the student's outputs and
the targets (`Inputs`) and returns (value, statistics); `total` sums weight x value over the
terms the config enables (weight > 0) and returns (total, {metric name: value}, statistics).

Terms: DINO's cross-entropy between the teacher's and the student's CLS distributions over
every (global target, other crop) pair (DINOv3: the local-crop pairs optionally reweighted by
a scheduled weight); KoLeo on the student's global CLS tokens (DINOv2); iBOT's cross-entropy
on the masked patch tokens (DINOv2); Gram anchoring (DINOv3): the MSE between the Gram
matrices of the student's and a frozen Gram teacher's L2-normalised patch tokens on the global
crops (`gram_targets` resizes the Gram teacher's feature map to the student's grid). A new term
is one function here and one row of `TERMS` (its weight a field of `Objective`, read from the
config); a weight that follows a schedule comes per step in `Inputs.weights`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import losses, masking, prototype_loss
from dino_jax.models.pos_embed import (torch_bicubic_aa_matrix, torch_bicubic_matrix,
                                       torch_bilinear_matrix)
from dino_jax.models.vit import ViTOutput


GRAM_RESIZES = ('bicubic', 'bilinear')


@dataclasses.dataclass(frozen=True)
class GramSpec:
  """DINOv3's Gram anchoring term, from config.gram (official keys in parentheses)."""
  weight: float = 1.0  # the final weight (gram.loss_weight / loss_weight_schedule.end)
  normalized: bool = True  # L2-normalise the patch tokens first (gram.normalized)
  img_level: bool = True  # one Gram matrix per image, else over the batch (gram.img_level)
  remove_neg: bool = False  # (gram.remove_neg)
  remove_only_teacher_neg: bool = False  # (gram.remove_only_teacher_neg)
  ema_teacher: bool = False  # the EMA teacher's patch tokens are the targets (gram.ema_teacher)
  teacher_size: int = 0  # the Gram teacher's crop size (crops.gram_teacher_crops_size)
  resize: str = 'bicubic'  # (gram.global_teacher_resize_method)
  antialias: bool = False  # (gram.global_teacher_resize_antialias)
  patch_size: int = 16

  @classmethod
  def from_config(cls, config) -> 'GramSpec | None':
    g = config.get('gram')
    if g is None or g.weight <= 0:
      return None
    return cls(weight=g.weight, normalized=g.normalized, img_level=g.img_level,
               remove_neg=g.remove_neg, remove_only_teacher_neg=g.remove_only_teacher_neg,
               ema_teacher=g.ema_teacher,
               teacher_size=g.teacher_size or config.crops.global_size, resize=g.resize,
               antialias=g.antialias, patch_size=config.model.patch_size)


@dataclasses.dataclass(frozen=True)
class Objective:
  """The objective, from config.loss (v1: only the DINO term with centering)."""
  center_momentum: float = 0.9
  centering: str = 'centering'  # | 'sinkhorn_knopp'
  koleo_weight: float = 0.0
  ibot_weight: float = 0.0
  mask: masking.MaskSpec | None = None  # needed when ibot_weight > 0
  prototype_chunk: int = 0  # prototypes per chunk of the head's last layer and loss; 0: all
  gram: GramSpec | None = None  # DINOv3's Gram anchoring (None: off, no Gram teacher)
  # DINOv3's dino.reweight_dino_local_loss: the local-crop DINO pairs weighted by
  # Inputs.weights['dino_local'] (a schedule of the step)
  dino_local_reweight: bool = False

  @classmethod
  def from_config(cls, config) -> 'Objective':
    l = config.loss
    grid = config.crops.global_size // config.model.patch_size
    return cls(center_momentum=l.center_momentum, centering=l.centering,
               koleo_weight=l.koleo_weight, ibot_weight=l.ibot_weight,
               mask=masking.MaskSpec((grid, grid), probability=l.mask_probability,
                                     ratio=tuple(l.mask_ratio)),
               prototype_chunk=l.prototype_chunk, gram=GramSpec.from_config(config),
               dino_local_reweight=(l.get('dino_local_weight', 1.0) != 1 or
                                    bool(tuple(l.get('dino_local_weight_schedule', ())))))

  @property
  def terms(self) -> tuple['Term', ...]:
    """The terms this objective sums: those of `TERMS` with a weight above 0, in order."""
    return tuple(t for t in TERMS if t.weight(self) > 0)

  @property
  def ibot(self) -> bool:
    """Whether the student sees masked global crops and the patch head is trained."""
    return self.ibot_weight > 0

  @property
  def gram_teacher(self) -> bool:
    """Whether the run carries a Gram teacher (its own parameters in the TrainState)."""
    return self.gram is not None and not self.gram.ema_teacher


# The teacher's side ------------------------------------------------------------------------


class Teacher(NamedTuple):
  """What the teacher gives one loss term: targets, the batch mean for its center, stats."""
  q: jax.Array  # (rows, K); chunk-major (n_chunks, rows, size) when chunked
  batch_mean: jax.Array  # (1, K) raw logits' mean over the (valid) rows
  stats: dict  # teacher_entropy, prototypes_used, logit_std


class Masked(NamedTuple):
  """The masked patch tokens of the global crops, a static-size gather (`masking.gather_masked`)."""
  idx: jax.Array  # (upper_bound,) flat indices into the n_global * B * N patch tokens
  valid: jax.Array  # (upper_bound,) bool, False for padding rows
  weights: jax.Array  # (upper_bound,) 1 / (masked count of the token's image), 0 for padding


class Targets(NamedTuple):
  """The teacher's targets for the terms: DINO's on the CLS tokens, iBOT's on the masked
  patch tokens (None without iBOT)."""
  dino: Teacher
  ibot: Teacher | None


def masked_rows(patches: jax.Array, masked: Masked) -> jax.Array:
  """(upper_bound, D) tokens at the masked positions of (n, N, D) patch tokens."""
  return patches.reshape(-1, patches.shape[-1])[masked.idx]


def _targets(spec: Objective, logits, center, temp, valid=None):
  """Teacher probabilities: centred softmax or Sinkhorn-Knopp."""
  if spec.centering == 'sinkhorn_knopp':
    return losses.sinkhorn_knopp(logits, temp, valid=valid)
  return losses.teacher_probs(logits, center, temp)


def _teacher(spec: Objective, head, x, center, temp, valid=None) -> Teacher:
  """Targets for the rows x (CLS tokens or masked patch tokens) through the teacher's head."""
  if spec.prototype_chunk and spec.centering == 'centering':
    return Teacher(*prototype_loss.centered_targets(head.features(x), head.last_layer.weight(),
                                                    center, temp, spec.prototype_chunk, valid))
  t = jax.lax.stop_gradient(head(x).astype(jnp.float32))
  q = _targets(spec, t, center, temp, valid)
  mean = (jnp.mean(t, axis=0, keepdims=True) if valid is None
          else losses.masked_mean(t, valid))
  stats = {'teacher_entropy': losses.entropy(q),
           **{k: v for k, v in losses.collapse_stats(t, center, q).items() if k != 'center_norm'}}
  if spec.prototype_chunk:  # Sinkhorn-Knopp needs every logit: only the student is chunked
    q = prototype_loss.to_chunks(q, prototype_loss.chunking(q.shape[1], spec.prototype_chunk)[0])
  return Teacher(q, mean, stats)


def teacher_targets(spec: Objective, teacher, out: ViTOutput, center, patch_center, temp,
                    masked: Masked | None) -> Targets:
  """The targets of every term from the teacher's backbone output on the global crops.

  teacher: the merged teacher (its heads: head, patch_head); center, patch_center: the
  state's centers (patch_center used with iBOT only); masked: the masked tokens (iBOT).
  """
  cls_t = _teacher(spec, teacher.head, out.cls, center, temp)
  patch_t = None
  if spec.ibot:
    patch_t = _teacher(spec, teacher.patch_head, masked_rows(out.patches, masked), patch_center,
                       temp, masked.valid)
  return Targets(cls_t, patch_t)


def _resize_matrix(spec: GramSpec, n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of torch F.interpolate(size=n_out, align_corners=False) along one
  axis: bicubic (A = -0.75, border clamp; antialiased: PIL's widened A = -0.5 kernel) or
  bilinear (models/pos_embed.py)."""
  if spec.resize == 'bicubic':
    matrix = torch_bicubic_aa_matrix if spec.antialias else torch_bicubic_matrix
    return matrix(n_in, n_out, n_out / n_in)
  return torch_bilinear_matrix(n_in, n_out)


def gram_targets(spec: GramSpec, patches: jax.Array, grid: int) -> jax.Array:
  """The Gram teacher's patch tokens (images, n * n, D) on the student's grid x grid (f32, no
  gradient): its square feature map resized as the official code does when n != grid."""
  patches = jax.lax.stop_gradient(patches).astype(jnp.float32)
  n = int(round(patches.shape[1] ** 0.5))
  if n * n != patches.shape[1]:
    raise ValueError(f'the Gram teacher gave {patches.shape[1]} patch tokens, not a square grid')
  if n == grid:
    return patches
  m = jnp.asarray(_resize_matrix(spec, n, grid), jnp.float32)
  fmap = patches.reshape(patches.shape[0], n, n, patches.shape[-1])
  out = jnp.einsum('yi,xj,bijd->byxd', m, m, fmap, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(patches.shape[0], grid * grid, patches.shape[-1])


# The student's side: the terms ----------------------------------------------------------


class Inputs(NamedTuple):
  """What the terms read. Rows are crop-major, the n_global global crops first."""
  student: object  # the merged student: its heads (head, patch_head)
  global_out: ViTOutput  # the student backbone on the global crops: cls (n_global * B, D),
  #                        patches (n_global * B, N, D)
  cls: jax.Array  # (n_crops * B, D) CLS tokens of every crop, global then local
  targets: Targets
  masked: Masked | None  # the masked tokens (iBOT)
  n_global: int
  student_temp: float
  gram_patches: jax.Array | None = None  # (n_global * B, N, D) Gram targets (`gram_targets`)
  weights: dict | None = None  # {term name: this step's weight} for scheduled weights;
  #                              'dino_local': the local-crop DINO pairs' weight


def dino(spec: Objective, x: Inputs) -> tuple[jax.Array, dict]:
  """DINO: mean over (global target i, student crop v != i) pairs of the batch-mean
  H(q_i, softmax(s_v / temp)); stats kl, student_entropy over the global crops."""
  t, head = x.targets.dino, x.student.head
  b = x.global_out.cls.shape[0] // x.n_global
  local_weight = x.weights['dino_local'] if spec.dino_local_reweight else None
  if spec.prototype_chunk:
    n_crops = x.cls.shape[0] // b
    coef = prototype_loss.dino_pairs(x.n_global, n_crops, b)
    if local_weight is not None:
      coef = coef * jnp.where(jnp.arange(n_crops) >= x.n_global, local_weight,
                              1.0)[None, :, None]
    value, aux = prototype_loss.cross_entropy(
        head.features(x.cls), head.last_layer.weight(), t.q, coef, x.student_temp)
    return value, {'kl': -t.stats['teacher_entropy'] - aux['cross_self'],
                   'student_entropy': aux['student_entropy']}
  s_logits = head(x.cls).astype(jnp.float32)
  value = losses.cross_entropy_pairs(s_logits, t.q, x.student_temp, x.n_global, local_weight)
  stats = losses.distill_stats(s_logits, t.q, x.student_temp, x.n_global)
  del stats['teacher_entropy']  # from the teacher pass, the same number
  return value, stats


def koleo(spec: Objective, x: Inputs) -> tuple[jax.Array, dict]:
  """KoLeo: the sum over global crops of the KoLeo loss of that crop's B CLS tokens."""
  del spec
  cls = x.global_out.cls
  b = cls.shape[0] // x.n_global
  return sum(losses.koleo(cls[c * b:(c + 1) * b]) for c in range(x.n_global)), {}


def ibot(spec: Objective, x: Inputs) -> tuple[jax.Array, dict]:
  """iBOT: the per-image mean over masked tokens of H(q_j, softmax(s_j / temp)), averaged
  over all global crops."""
  head = x.student.patch_head
  rows = masked_rows(x.global_out.patches, x.masked)
  n_images = x.global_out.cls.shape[0]
  if spec.prototype_chunk:
    value, _ = prototype_loss.cross_entropy(
        head.features(rows), head.last_layer.weight(), x.targets.ibot.q,
        prototype_loss.row_pairs(x.masked.weights, n_images), x.student_temp)
    return value, {}
  logits = head(rows).astype(jnp.float32)
  return losses.ibot_patch_loss(logits, x.targets.ibot.q, x.masked.weights, x.student_temp,
                                n_images), {}


def gram(spec: Objective, x: Inputs) -> tuple[jax.Array, dict]:
  """Gram anchoring: `losses.gram_loss` between the student's patch tokens on the global crops
  (masked as the student saw them, after the final norm, before any head) and the Gram
  targets."""
  g = spec.gram
  return losses.gram_loss(x.global_out.patches, x.gram_patches, normalized=g.normalized,
                          img_level=g.img_level, remove_neg=g.remove_neg,
                          remove_only_teacher_neg=g.remove_only_teacher_neg), {}


class Term(NamedTuple):
  """One term: its metric name, its weight in the spec (0: off), its function."""
  name: str
  weight: Callable[[Objective], float]
  value: Callable[[Objective, Inputs], tuple[jax.Array, dict]]


TERMS = (  # summed in this order; DINO's weight is 1, the others' are relative to it
    Term('dino_loss', lambda spec: 1.0, dino),
    Term('koleo', lambda spec: spec.koleo_weight, koleo),
    Term('ibot_loss', lambda spec: spec.ibot_weight, ibot),
    Term('gram_loss', lambda spec: spec.gram.weight if spec.gram is not None else 0.0, gram),
)


def total(spec: Objective, x: Inputs) -> tuple[jax.Array, dict, dict]:
  """(sum of weight x value over spec.terms, {name: value}, the terms' statistics); a term's
  weight is x.weights[name] where the step gives one (a schedule), else its spec weight."""
  values, stats, loss = {}, {}, None
  scheduled = x.weights or {}
  for term in spec.terms:
    value, term_stats = term.value(spec, x)
    values[term.name] = value
    stats.update(term_stats)
    weighted = scheduled.get(term.name, term.weight(spec)) * value
    loss = weighted if loss is None else loss + weighted
  return loss, values, stats
