"""One DINO update as a pure function (state, batch) -> (state, metrics), jitted with shardings.

Inside: multi-crop augmentation of the uint8 canvases, the student on every crop (one backbone
pass per resolution, the head once), the teacher on the global crops, the DINO loss, the
optimizer update, the teacher EMA with the scheduled momentum and the center EMA.
"""
from __future__ import annotations

from typing import Callable

import jax
import optax
from flax import nnx

from dino_jax import augment, losses
from dino_jax.schedules import Schedules
from dino_jax.state import TrainState


def make(student_def: nnx.GraphDef, teacher_def: nnx.GraphDef, tx: optax.GradientTransformation,
         schedules: Schedules, aug: augment.AugmentConfig, *, dtype, center_momentum: float,
         crop_sharding=None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The un-jitted step function; see `jit` for the compiled, sharded version.

  crop_sharding: a batch sharding the crops are constrained to, so every device runs the
  networks on its own rows whatever layout the crop-major concatenation got.
  """
  n_global = len(aug.global_crops)
  constrain = ((lambda x: jax.lax.with_sharding_constraint(x, crop_sharding))
               if crop_sharding is not None else (lambda x: x))

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    k_aug, k_drop = jax.random.split(key)
    global_crops, local_crops = augment.multicrop(k_aug, batch['image'], batch['hw'], aug, dtype)
    global_crops = constrain(global_crops)
    local_crops = constrain(local_crops) if local_crops is not None else None
    student_crops = [global_crops] + ([local_crops] if local_crops is not None else [])

    teacher = nnx.merge(teacher_def, state.teacher_params)
    teacher_logits = jax.lax.stop_gradient(teacher.multicrop([global_crops]))
    temp = schedules.teacher_temp_at(state.step)

    def loss_fn(params):
      student = nnx.merge(student_def, params)
      student_logits = student.multicrop(student_crops, key=k_drop)
      loss = losses.dino_loss(student_logits, teacher_logits, state.center,
                              schedules.student_temp, temp, n_global)
      return loss, student_logits

    (loss, student_logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    m = schedules.teacher_momentum(state.step)
    teacher_params = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher_params,
                                  params)
    center = losses.update_center(state.center, teacher_logits, center_momentum)

    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
               **schedules.values(state.step),
               **losses.distill_stats(student_logits, teacher_logits, state.center,
                                      schedules.student_temp, temp, n_global)}
    new_state = state.replace(step=state.step + 1, params=params, teacher_params=teacher_params,
                              opt_state=opt_state, center=center)
    return new_state, metrics

  return step


def jit(step_fn, state_shardings, batch_sharding, replicated):
  """Compile with explicit shardings; the old state is donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
