"""TrainState: the one pytree a run carries (and a checkpoint restores)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar, the number of updates applied
  params: Any  # student params (pure dict {'backbone', 'head'})
  teacher_params: Any  # EMA of the student; starts as an exact copy
  opt_state: Any
  center: jax.Array  # (1, out_dim) f32 running mean of teacher logits
  patch_center: jax.Array  # (1, patch_out_dim) f32, the same for iBOT's masked patch logits
  rng: jax.Array  # base key; step keys are fold_in(rng, step)


@struct.dataclass
class GramTrainState(TrainState):
  """The TrainState of a run with DINOv3's Gram anchoring: also the frozen Gram teacher's
  backbone (a run without it keeps the plain TrainState, its checkpoints unchanged)."""
  gram_params: Any  # Gram teacher backbone params (the teacher's 'backbone' structure)


@struct.dataclass
class DistillTrainState(TrainState):
  """The TrainState of a DINOv3 distillation run: also the frozen teacher's params (its
  network's {'backbone', 'head'[, 'ibot_head']}), never updated; teacher_params stays the EMA
  of the student (a run without distillation keeps the plain TrainState)."""
  distill_params: Any


def pure_params(module: nnx.Module) -> dict:
  """The module's nnx.Param leaves as a plain nested dict of arrays."""
  return nnx.state(module, nnx.Param).to_pure_dict()


def create(student: nnx.Module, tx: optax.GradientTransformation, out_dim: int,
           rng: jax.Array, patch_out_dim: int | None = None,
           gram_teacher: bool = False, distill_params: Any = None) -> TrainState:
  """A fresh state: the teacher an exact copy of the student; with gram_teacher, a
  GramTrainState whose Gram teacher is one more copy of the backbone (train.py replaces it
  with config.gram.init_from's weights, or the EMA teacher the run starts from); with
  distill_params (the frozen teacher's params, placeholders train.py replaces), a
  DistillTrainState."""
  params = pure_params(student)
  fields = dict(
      step=jnp.zeros([], jnp.int32),
      params=params,
      teacher_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      center=jnp.zeros((1, out_dim), jnp.float32),
      patch_center=jnp.zeros((1, patch_out_dim or out_dim), jnp.float32),
      rng=rng)
  if gram_teacher:
    return GramTrainState(**fields, gram_params=jax.tree.map(jnp.copy, params['backbone']))
  if distill_params is not None:
    return DistillTrainState(**fields, distill_params=distill_params)
  return TrainState(**fields)
