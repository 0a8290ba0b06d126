"""One DINO / DINOv2 update as a pure function (state, batch) -> (state, metrics), jitted with
shardings.

Inside: multi-crop augmentation of the uint8 canvases; for DINOv2 the block masks of the global
crops; the teacher on the global crops and its targets (objective.teacher_targets: CLS targets,
and patch targets at the masked positions); the student on every crop (DINO.backbone_crops:
masked global crops; with model.pack_crops all crops as one packed token matrix, else one
backbone pass per resolution); the objective's terms summed (objective.py: DINO, + KoLeo,
+ iBOT, + Gram); the optimizer update; the teacher EMA and the center EMAs.

DINOv3's Gram anchoring (loss.gram): the Gram teacher (state.gram_params, a frozen backbone)
runs on the global crops' boxes at its own resolution (augment.gram_teacher_crops), its
patch tokens resized to the student's grid are the Gram targets (or, with gram.ema_teacher,
the EMA teacher's own patch tokens are); at the end of the update, on the steps
schedules.gram_refresh names, the new EMA teacher's backbone is copied into the Gram teacher.
Scheduled loss weights (schedules.loss_weights) reach the objective as Inputs.weights.

DINOv3 distillation (config.distill, distill_def): a frozen teacher of its own architecture
(state.distill_params, never updated) gives the targets on the global crops; the student's
backbone sees no masked input, while the iBOT term is still computed at the sampled mask
positions of its unmasked patch tokens; teacher_params stays the EMA of the student.
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
         crop_sharding=None, distill_def: nnx.GraphDef | None = None
         ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The un-jitted step function; see `jit` for the compiled, sharded version.

  distill_def: DINOv3 distillation's frozen teacher network (state.distill_params are its
  params): it gives the targets instead of the EMA teacher, and the student sees unmasked
  global crops (the iBOT term still reads the sampled masked positions).

  crop_sharding: a batch sharding the crops are constrained to, so every device runs the
  networks on its own rows whatever layout the crop-major concatenation got.
  """
  n_global = len(aug.global_crops)
  ibot = loss.ibot
  grid = aug.global_crops[0].size // loss.gram.patch_size if loss.gram is not None else 0
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

    teacher = (nnx.merge(teacher_def, state.teacher_params) if distill_def is None
               else nnx.merge(distill_def, state.distill_params))
    t_out = teacher.backbone(global_crops)
    targets = objective.teacher_targets(loss, teacher, t_out, state.center, state.patch_center,
                                        temp, masked)
    gram_patches = None
    if loss.gram is not None:
      if loss.gram.ema_teacher:
        gram_patches = objective.gram_targets(loss.gram, t_out.patches, grid)
      else:
        gram_crops = constrain(augment.gram_teacher_crops(
            k_aug, batch['image'], batch['hw'], aug, loss.gram.teacher_size, dtype))
        gram_teacher = nnx.merge(teacher_def, {**state.teacher_params,
                                               'backbone': state.gram_params})
        gram_patches = objective.gram_targets(
            loss.gram, gram_teacher.backbone(gram_crops).patches, grid)
    weights = schedules.loss_weights(state.step) or None

    def loss_fn(params):
      student = nnx.merge(student_def, params)
      g_out, cls = student.backbone_crops(global_crops, local_crops, k_drop,
                                          masks=masks if distill_def is None else None,
                                          sharding=crop_sharding)
      total, terms, stats = objective.total(
          loss, objective.Inputs(student, g_out, cls, targets, masked, n_global, s_temp,
                                 gram_patches, weights))
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
               **schedules.values(state.step),
               'last_layer_grad_norm': optax.global_norm(grads['head']['last_layer']),
               **targets.dino.stats, **stats,
               'center_norm': jnp.sqrt(jnp.mean(jnp.square(state.center)))}
    new_state = state.replace(step=state.step + 1, params=params, teacher_params=teacher_params,
                              opt_state=opt_state, center=center, patch_center=patch_center)
    if loss.gram_teacher:  # the copy EMA teacher -> Gram teacher, on the steps it is due
      refresh = schedules.gram_refresh(state.step + 1)
      new_state = new_state.replace(gram_params=jax.tree.map(
          lambda g, t: jnp.where(refresh, t, g), state.gram_params, teacher_params['backbone']))
      metrics['gram_refreshed'] = refresh.astype(jnp.float32)
    return new_state, metrics

  return step


def param_norms(state: TrainState) -> dict:
  """The student's and the teacher's parameter norms after a step: read only where the loop
  logs or checks a step (train.py), so computed there on the new state, not in every step."""
  return {'param_norm': optax.global_norm(state.params),
          'teacher_param_norm': optax.global_norm(state.teacher_params)}


def with_norms(metrics: dict, norms: dict) -> dict:
  """The step's metrics and `norms` in one dict, keys sorted as a jitted function returns a
  dict (so metrics.jsonl lists them as when the step computed the norms itself)."""
  return dict(sorted({**metrics, **norms}.items()))


def jit(step_fn, state_shardings, batch_sharding, replicated):
  """Compile with explicit shardings; the old state is donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
