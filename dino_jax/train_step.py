"""One DINO / DINOv2 update as a pure function (state, batch) -> (state, metrics), jitted with
shardings.

Inside: multi-crop augmentation of the uint8 canvases; for DINOv2 the block masks of the global
crops; the teacher on the global crops and its targets (objective.teacher_targets: CLS targets,
and patch targets at the masked positions); the student on every crop (DINO.backbone_crops:
masked global crops; with model.pack_crops all crops as one packed token matrix, else one
backbone pass per resolution); the objective's terms summed (objective.py: DINO, + KoLeo,
+ iBOT); the optimizer update; the teacher EMA and the center EMAs.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dino_jax import augment, losses, masking, objective
from dino_jax.schedules import Schedules
from dino_jax.state import TrainState


def make(student_def: nnx.GraphDef, teacher_def: nnx.GraphDef, tx: optax.GradientTransformation,
         schedules: Schedules, aug: augment.AugmentConfig, *, dtype, loss: objective.Objective,
         crop_sharding=None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The un-jitted step function; see `jit` for the compiled, sharded version.

  crop_sharding: a batch sharding the crops are constrained to, so every device runs the
  networks on its own rows whatever layout the crop-major concatenation got.
  """
  n_global = len(aug.global_crops)
  ibot = loss.ibot
  constrain = ((lambda x: jax.lax.with_sharding_constraint(x, crop_sharding))
               if crop_sharding is not None else (lambda x: x))

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    k_aug, k_drop, k_mask = jax.random.split(key, 3)
    global_crops, local_crops = augment.multicrop(k_aug, batch['image'], batch['hw'], aug, dtype)
    global_crops = constrain(global_crops)
    local_crops = constrain(local_crops) if local_crops is not None else None
    n_img = global_crops.shape[0]  # n_global * B rows, crop-major
    temp = schedules.teacher_temp_at(state.step)
    s_temp = schedules.student_temp

    masks = masked = None
    if ibot:
      masks = masking.batch_masks(k_mask, n_img, loss.mask)
      masked = objective.Masked(*masking.gather_masked(masks, loss.mask.upper_bound(n_img)))

    teacher = nnx.merge(teacher_def, state.teacher_params)
    t_out = teacher.backbone(global_crops)
    targets = objective.teacher_targets(loss, teacher, t_out, state.center, state.patch_center,
                                        temp, masked)

    def loss_fn(params):
      student = nnx.merge(student_def, params)
      g_out, cls = student.backbone_crops(global_crops, local_crops, k_drop, masks=masks,
                                          sharding=crop_sharding)
      total, terms, stats = objective.total(
          loss, objective.Inputs(student, g_out, cls, targets, masked, n_global, s_temp))
      return total, (terms, stats)

    (total, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = schedules.teacher_momentum(state.step)
    teacher_params = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher_params,
                                  params)
    center = losses.center_ema(state.center, targets.dino.batch_mean, loss.center_momentum)
    patch_center = state.patch_center
    if ibot:
      patch_center = losses.center_ema(patch_center, targets.ibot.batch_mean,
                                       loss.center_momentum)
      terms['masked_fraction'] = jnp.mean(masks)

    metrics = {'loss': total, **terms, 'grad_norm': optax.global_norm(grads),
               'param_norm': optax.global_norm(params),
               'teacher_param_norm': optax.global_norm(teacher_params),
               **schedules.values(state.step),
               'last_layer_grad_norm': optax.global_norm(grads['head']['last_layer']),
               **targets.dino.stats, **stats,
               'center_norm': jnp.sqrt(jnp.mean(jnp.square(state.center)))}
    new_state = state.replace(step=state.step + 1, params=params, teacher_params=teacher_params,
                              opt_state=opt_state, center=center, patch_center=patch_center)
    return new_state, metrics

  return step


def jit(step_fn, state_shardings, batch_sharding, replicated):
  """Compile with explicit shardings; the old state is donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
