"""One DINO / DINOv2 update as a pure function (state, batch) -> (state, metrics), jitted with
shardings.

Inside: multi-crop augmentation of the uint8 canvases; for DINOv2 the block masks of the global
crops; the teacher on the global crops (CLS targets, and patch targets at the masked positions);
the student on every crop (masked global crops; with model.pack_crops all crops as one packed
token matrix, else one backbone pass per resolution); the DINO loss (+ iBOT, + KoLeo), over
all prototypes at once or, with loss.prototype_chunk, in chunks of the prototype axis
(prototype_loss.py); the optimizer update; the teacher EMA and the center EMAs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dino_jax import augment, losses, masking, prototype_loss
from dino_jax.schedules import Schedules
from dino_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The objective, from config.loss (v1: only the DINO term with centering)."""
  center_momentum: float = 0.9
  centering: str = 'centering'  # | 'sinkhorn_knopp'
  koleo_weight: float = 0.0
  ibot_weight: float = 0.0
  mask: masking.MaskSpec | None = None  # needed when ibot_weight > 0
  prototype_chunk: int = 0  # prototypes per chunk of the head's last layer and loss; 0: all

  @classmethod
  def from_config(cls, config) -> 'LossSpec':
    l = config.loss
    grid = config.crops.global_size // config.model.patch_size
    return cls(center_momentum=l.center_momentum, centering=l.centering,
               koleo_weight=l.koleo_weight, ibot_weight=l.ibot_weight,
               mask=masking.MaskSpec((grid, grid), probability=l.mask_probability,
                                     ratio=tuple(l.mask_ratio)),
               prototype_chunk=l.prototype_chunk)


def _targets(spec: LossSpec, logits, center, temp, valid=None):
  """Teacher probabilities: centred softmax or Sinkhorn-Knopp."""
  if spec.centering == 'sinkhorn_knopp':
    return losses.sinkhorn_knopp(logits, temp, valid=valid)
  return losses.teacher_probs(logits, center, temp)


class Teacher(NamedTuple):
  """What the teacher gives one loss term: targets, the batch mean for its center, stats."""
  q: jax.Array  # (rows, K); chunk-major (n_chunks, rows, size) when chunked
  batch_mean: jax.Array  # (1, K) raw logits' mean over the (valid) rows
  stats: dict  # teacher_entropy, prototypes_used, logit_std


def _teacher(spec: LossSpec, head, x, center, temp, valid=None) -> Teacher:
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


def _batch_shards(sharding, n_rows: int) -> int:
  """Shards of a batch axis of n_rows under `sharding` (1 without one)."""
  return 1 if sharding is None else n_rows // sharding.shard_shape((n_rows,))[0]


def make(student_def: nnx.GraphDef, teacher_def: nnx.GraphDef, tx: optax.GradientTransformation,
         schedules: Schedules, aug: augment.AugmentConfig, *, dtype, loss: LossSpec,
         crop_sharding=None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The un-jitted step function; see `jit` for the compiled, sharded version.

  crop_sharding: a batch sharding the crops are constrained to, so every device runs the
  networks on its own rows whatever layout the crop-major concatenation got.
  """
  n_global = len(aug.global_crops)
  ibot = loss.ibot_weight > 0
  chunked = loss.prototype_chunk > 0
  constrain = ((lambda x: jax.lax.with_sharding_constraint(x, crop_sharding))
               if crop_sharding is not None else (lambda x: x))

  def student_backbone(student, global_crops, local_crops, masks, key):
    """(global crops' ViTOutput, CLS tokens of every crop, crop-major)."""
    k_g, k_l = jax.random.split(key)
    if local_crops is None:
      g_out = student.backbone(global_crops, key=k_g, masks=masks)
      return g_out, g_out.cls
    if student.backbone.cfg.pack_crops:
      rows = (global_crops.shape[0], local_crops.shape[0])
      shards = _batch_shards(crop_sharding, sum(rows))
      shards = shards if all(r % shards == 0 for r in rows) else 1
      g_out, l_out = student.backbone.packed([global_crops, local_crops], keys=[k_g, k_l],
                                             masks=[masks, None], shards=shards)
    else:
      g_out = student.backbone(global_crops, key=k_g, masks=masks)
      l_out = student.backbone(local_crops, key=k_l)
    return g_out, jnp.concatenate([g_out.cls, l_out.cls], axis=0)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    k_aug, k_drop, k_mask = jax.random.split(key, 3)
    global_crops, local_crops = augment.multicrop(k_aug, batch['image'], batch['hw'], aug, dtype)
    global_crops = constrain(global_crops)
    local_crops = constrain(local_crops) if local_crops is not None else None
    n_img = global_crops.shape[0]  # n_global * B rows, crop-major
    b = n_img // n_global
    temp = schedules.teacher_temp_at(state.step)
    s_temp = schedules.student_temp

    masks = idx = valid = weights = None
    if ibot:
      masks = masking.batch_masks(k_mask, n_img, loss.mask)
      idx, valid, weights = masking.gather_masked(masks, loss.mask.upper_bound(n_img))

    teacher = nnx.merge(teacher_def, state.teacher_params)
    t_out = teacher.backbone(global_crops)
    dino_t = _teacher(loss, teacher.head, t_out.cls, state.center, temp)
    if ibot:
      t_patches = t_out.patches.reshape(-1, t_out.patches.shape[-1])[idx]
      ibot_t = _teacher(loss, teacher.patch_head, t_patches, state.patch_center, temp, valid)

    def loss_fn(params):
      student = nnx.merge(student_def, params)
      g_out, cls = student_backbone(student, global_crops, local_crops, masks, k_drop)
      if chunked:
        n_crops = cls.shape[0] // b
        dino, aux = prototype_loss.cross_entropy(
            student.head.features(cls), student.head.last_layer.weight(), dino_t.q,
            prototype_loss.dino_pairs(n_global, n_crops, b), s_temp)
        stats = {'kl': -dino_t.stats['teacher_entropy'] - aux['cross_self'],
                 'student_entropy': aux['student_entropy']}
      else:
        s_logits = student.head(cls).astype(jnp.float32)
        dino = losses.cross_entropy_pairs(s_logits, dino_t.q, s_temp, n_global)
        stats = losses.distill_stats(s_logits, dino_t.q, s_temp, n_global)
        del stats['teacher_entropy']  # from the teacher pass, the same number
      terms = {'dino_loss': dino}
      total = terms['dino_loss']
      if loss.koleo_weight > 0:
        terms['koleo'] = sum(losses.koleo(g_out.cls[c * b:(c + 1) * b])
                             for c in range(n_global))
        total = total + loss.koleo_weight * terms['koleo']
      if ibot:
        s_patches = g_out.patches.reshape(-1, g_out.patches.shape[-1])[idx]
        if chunked:
          terms['ibot_loss'], _ = prototype_loss.cross_entropy(
              student.patch_head.features(s_patches), student.patch_head.last_layer.weight(),
              ibot_t.q, prototype_loss.row_pairs(weights, n_img), s_temp)
        else:
          s_patch_logits = student.patch_head(s_patches).astype(jnp.float32)
          terms['ibot_loss'] = losses.ibot_patch_loss(s_patch_logits, ibot_t.q, weights,
                                                      s_temp, n_img)
        total = total + loss.ibot_weight * terms['ibot_loss']
      return total, (terms, stats)

    (total, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = schedules.teacher_momentum(state.step)
    teacher_params = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher_params,
                                  params)
    center = losses.center_ema(state.center, dino_t.batch_mean, loss.center_momentum)
    patch_center = state.patch_center
    if ibot:
      patch_center = losses.center_ema(patch_center, ibot_t.batch_mean, loss.center_momentum)
      terms['masked_fraction'] = jnp.mean(masks)

    metrics = {'loss': total, **terms, 'grad_norm': optax.global_norm(grads),
               'param_norm': optax.global_norm(params),
               'teacher_param_norm': optax.global_norm(teacher_params),
               **schedules.values(state.step),
               'last_layer_grad_norm': optax.global_norm(grads['head']['last_layer']),
               **dino_t.stats, **stats,
               'center_norm': jnp.sqrt(jnp.mean(jnp.square(state.center)))}
    new_state = state.replace(step=state.step + 1, params=params, teacher_params=teacher_params,
                              opt_state=opt_state, center=center, patch_center=patch_center)
    return new_state, metrics

  return step


def jit(step_fn, state_shardings, batch_sharding, replicated):
  """Compile with explicit shardings; the old state is donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
