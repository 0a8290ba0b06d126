"""Every scheduled value as a pure function of the global step (nothing recompiles).

Two families, chosen by config.optim.schedules:
- 'cosine' (DINO, DINOv2): matches the official per-iteration arrays: `cosine(step)` equals
  `cosine_scheduler(base, final, epochs, niter, warmup_epochs, start)[step]`; lr and weight
  decay decay by cosines, the teacher momentum rises to 1, and the teacher temperature is a
  per-epoch linspace (per step with loss.teacher_temp_per_step) followed by a constant.
- 'constant' (DINOv3's "v2" schedules): `warmup_cosine_constant` with peak == end, i.e. a
  linear warmup from 0 (last point excluded, as numpy's linspace(..., endpoint=False)), then the
  peak for good: lr constant after its warmup, weight decay and teacher momentum constant, the
  teacher temperature linear per step from loss.warmup_teacher_temp to loss.teacher_temp over
  its warmup epochs, then constant.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def cosine(step, base: float, final: float, total_steps: int, warmup_steps: int = 0,
           start_warmup: float = 0.0):
  """Linear warmup start->base over `warmup_steps` (endpoints inclusive), then cosine to final."""
  step = jnp.asarray(step, jnp.float32)
  if warmup_steps > 1:
    warm = start_warmup + (base - start_warmup) * step / (warmup_steps - 1)
  else:
    warm = jnp.full_like(step, start_warmup)
  decay_steps = max(total_steps - warmup_steps, 1)
  t = jnp.clip(step - warmup_steps, 0, decay_steps)
  cos = final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * t / decay_steps))
  return jnp.where(step < warmup_steps, warm, cos)


def warmup_cosine_constant(step, start: float, peak: float, end: float, warmup_steps: int,
                           total_steps: int, cosine_steps: int | None = None):
  """DINOv3's schedule shape: linear start -> peak over `warmup_steps` (peak itself not
  reached), a half cosine peak -> end over `cosine_steps` (both ends included; default: every
  step after the warmup), then `end` to the last step."""
  step = jnp.asarray(step, jnp.float32)
  if cosine_steps is None:
    cosine_steps = total_steps - warmup_steps
  warm = start + (peak - start) * step / max(warmup_steps, 1)
  t = jnp.clip(step - warmup_steps, 0, max(cosine_steps - 1, 0))
  phase = jnp.pi * t / (cosine_steps - 1) if cosine_steps > 1 else jnp.zeros_like(t)
  cos = end + (peak - end) * 0.5 * (1 + jnp.cos(phase))
  return jnp.where(step < warmup_steps, warm,
                   jnp.where(step < warmup_steps + cosine_steps, cos, end))


def teacher_temperature(step, steps_per_epoch: int, warmup_temp: float, temp: float,
                        warmup_epochs: int):
  """Per-epoch linspace(warmup_temp, temp, warmup_epochs), then temp."""
  epoch = jnp.asarray(step, jnp.float32) // steps_per_epoch
  if warmup_epochs > 1:
    warm = warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)
  else:
    warm = jnp.full_like(epoch, warmup_temp)
  return jnp.where(epoch < warmup_epochs, warm, temp)


LR_SCALING = {
    'linear': lambda lr, batch: lr * batch / 256.0,  # DINO
    'sqrt': lambda lr, batch: lr * (batch / 1024.0) ** 0.5,  # DINOv2
}


SCHEDULES = ('cosine', 'constant')


def scaled_lr(lr: float, batch_size: int, rule: str) -> float:
  return LR_SCALING[rule](lr, batch_size)


@dataclasses.dataclass(frozen=True)
class Schedules:
  """All of a run's schedules, built once from the config; each is step -> value."""
  steps_per_epoch: int
  total_steps: int
  lr_peak: float
  min_lr: float
  warmup_steps: int
  wd: float
  wd_end: float
  momentum: float
  student_temp: float
  teacher_temp: float
  warmup_teacher_temp: float
  warmup_teacher_temp_epochs: int
  freeze_last_layer_steps: int
  teacher_temp_per_step: bool = False
  family: str = 'cosine'  # SCHEDULES: 'cosine' (DINO, DINOv2) | 'constant' (DINOv3)

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> 'Schedules':
    o, l = config.optim, config.loss
    return cls(
        steps_per_epoch=steps_per_epoch,
        total_steps=config.epochs * steps_per_epoch,
        lr_peak=scaled_lr(o.lr, config.batch_size, o.lr_scaling),
        min_lr=o.min_lr,
        warmup_steps=int(round(o.warmup_epochs * steps_per_epoch)),
        wd=o.weight_decay, wd_end=o.weight_decay_end,
        momentum=o.momentum_teacher,
        student_temp=l.student_temp,
        teacher_temp=l.teacher_temp, warmup_teacher_temp=l.warmup_teacher_temp,
        warmup_teacher_temp_epochs=l.warmup_teacher_temp_epochs,
        freeze_last_layer_steps=int(round(o.freeze_last_layer * steps_per_epoch)),
        teacher_temp_per_step=l.teacher_temp_per_step, family=o.schedules)

  @property
  def constant(self) -> bool:
    return self.family == 'constant'

  def lr(self, step):
    if self.constant:
      return warmup_cosine_constant(step, 0.0, self.lr_peak, self.lr_peak, self.warmup_steps,
                                    self.total_steps)
    return cosine(step, self.lr_peak, self.min_lr, self.total_steps, self.warmup_steps)

  def weight_decay(self, step):
    if self.constant:
      return jnp.full(jnp.shape(step), self.wd, jnp.float32)
    return cosine(step, self.wd, self.wd_end, self.total_steps)

  def teacher_momentum(self, step):
    if self.constant:
      return jnp.full(jnp.shape(step), self.momentum, jnp.float32)
    return cosine(step, self.momentum, 1.0, self.total_steps)

  def teacher_temp_at(self, step):
    if self.constant:
      return warmup_cosine_constant(
          step, self.warmup_teacher_temp, self.teacher_temp, self.teacher_temp,
          self.warmup_teacher_temp_epochs * self.steps_per_epoch, self.total_steps)
    if self.teacher_temp_per_step:  # DINOv2: linear over the warmup steps, then constant
      return cosine(step, self.teacher_temp, self.teacher_temp,
                    self.warmup_teacher_temp_epochs * self.steps_per_epoch,
                    self.warmup_teacher_temp_epochs * self.steps_per_epoch,
                    self.warmup_teacher_temp)
    return teacher_temperature(step, self.steps_per_epoch, self.warmup_teacher_temp,
                               self.teacher_temp, self.warmup_teacher_temp_epochs)

  def last_layer_frozen(self, step):
    return jnp.asarray(step) < self.freeze_last_layer_steps

  def values(self, step) -> dict:
    return {'lr': self.lr(step), 'wd': self.weight_decay(step),
            'momentum': self.teacher_momentum(step), 'teacher_temp': self.teacher_temp_at(step)}
