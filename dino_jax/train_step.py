"""One DINO / DINOv2 update as a pure function (state, batch) -> (state, metrics), jitted with
shardings.

Inside: multi-crop augmentation of the uint8 canvases; for DINOv2 the block masks of the global
crops; the teacher on the global crops (CLS targets, and patch targets at the masked positions);
the student on every crop (masked global crops, one backbone pass per resolution); the DINO
loss (+ iBOT, + KoLeo); the optimizer update; the teacher EMA and the center EMAs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dino_jax import augment, losses, masking
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

  @classmethod
  def from_config(cls, config) -> 'LossSpec':
    l = config.loss
    grid = config.crops.global_size // config.model.patch_size
    return cls(center_momentum=l.center_momentum, centering=l.centering,
               koleo_weight=l.koleo_weight, ibot_weight=l.ibot_weight,
               mask=masking.MaskSpec((grid, grid), probability=l.mask_probability,
                                     ratio=tuple(l.mask_ratio)))


def _targets(spec: LossSpec, logits, center, temp, valid=None):
  """Teacher probabilities: centred softmax or Sinkhorn-Knopp."""
  if spec.centering == 'sinkhorn_knopp':
    return losses.sinkhorn_knopp(logits, temp, valid=valid)
  return losses.teacher_probs(logits, center, temp)


def make(student_def: nnx.GraphDef, teacher_def: nnx.GraphDef, tx: optax.GradientTransformation,
         schedules: Schedules, aug: augment.AugmentConfig, *, dtype, loss: LossSpec,
         crop_sharding=None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The un-jitted step function; see `jit` for the compiled, sharded version.

  crop_sharding: a batch sharding the crops are constrained to, so every device runs the
  networks on its own rows whatever layout the crop-major concatenation got.
  """
  n_global = len(aug.global_crops)
  ibot = loss.ibot_weight > 0
  constrain = ((lambda x: jax.lax.with_sharding_constraint(x, crop_sharding))
               if crop_sharding is not None else (lambda x: x))

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    k_aug, k_drop, k_mask = jax.random.split(key, 3)
    global_crops, local_crops = augment.multicrop(k_aug, batch['image'], batch['hw'], aug, dtype)
    global_crops = constrain(global_crops)
    local_crops = constrain(local_crops) if local_crops is not None else None
    n_img = global_crops.shape[0]  # n_global * B rows, crop-major
    b = n_img // n_global
    temp = schedules.teacher_temp_at(state.step)

    masks = idx = valid = weights = None
    if ibot:
      masks = masking.batch_masks(k_mask, n_img, loss.mask)
      idx, valid, weights = masking.gather_masked(masks, loss.mask.upper_bound(n_img))

    teacher = nnx.merge(teacher_def, state.teacher_params)
    t_out = teacher.backbone(global_crops)
    t_logits = jax.lax.stop_gradient(teacher.head(t_out.cls).astype(jnp.float32))
    targets = _targets(loss, t_logits, state.center, temp)
    if ibot:
      t_patches = t_out.patches.reshape(-1, t_out.patches.shape[-1])[idx]
      t_patch_logits = jax.lax.stop_gradient(
          teacher.patch_head(t_patches).astype(jnp.float32))
      patch_targets = _targets(loss, t_patch_logits, state.patch_center, temp, valid)

    def loss_fn(params):
      student = nnx.merge(student_def, params)
      k_g, k_l = jax.random.split(k_drop)
      g_out = student.backbone(global_crops, key=k_g, masks=masks)
      cls = [g_out.cls]
      if local_crops is not None:
        cls.append(student.backbone(local_crops, key=k_l).cls)
      s_logits = student.head(jnp.concatenate(cls, axis=0)).astype(jnp.float32)
      terms = {'dino_loss': losses.cross_entropy_pairs(s_logits, targets,
                                                       schedules.student_temp, n_global)}
      total = terms['dino_loss']
      if loss.koleo_weight > 0:
        terms['koleo'] = sum(losses.koleo(g_out.cls[c * b:(c + 1) * b])
                             for c in range(n_global))
        total = total + loss.koleo_weight * terms['koleo']
      if ibot:
        s_patches = g_out.patches.reshape(-1, g_out.patches.shape[-1])[idx]
        s_patch_logits = student.patch_head(s_patches).astype(jnp.float32)
        terms['ibot_loss'] = losses.ibot_patch_loss(s_patch_logits, patch_targets, weights,
                                                    schedules.student_temp, n_img)
        total = total + loss.ibot_weight * terms['ibot_loss']
      return total, (s_logits, terms)

    (total, (s_logits, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = schedules.teacher_momentum(state.step)
    teacher_params = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher_params,
                                  params)
    center = losses.update_center(state.center, t_logits, loss.center_momentum)
    patch_center = state.patch_center
    if ibot:
      patch_center = losses.update_patch_center(patch_center, t_patch_logits, valid,
                                                loss.center_momentum)
      terms['masked_fraction'] = jnp.mean(masks)

    metrics = {'loss': total, **terms, 'grad_norm': optax.global_norm(grads),
               'param_norm': optax.global_norm(params),
               'teacher_param_norm': optax.global_norm(teacher_params),
               **schedules.values(state.step),
               'last_layer_grad_norm': optax.global_norm(grads['head']['last_layer']),
               **losses.distill_stats(s_logits, targets, schedules.student_temp, n_global),
               **losses.collapse_stats(t_logits, state.center, targets)}
    new_state = state.replace(step=state.step + 1, params=params, teacher_params=teacher_params,
                              opt_state=opt_state, center=center, patch_center=patch_center)
    return new_state, metrics

  return step


def jit(step_fn, state_shardings, batch_sharding, replicated):
  """Compile with explicit shardings; the old state is donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
