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

DINOv3's loss weights (`WeightSchedule`: Gram loss, local-crop DINO pairs) and its Gram
teacher refresh steps (`GramRefresh`) are pure functions of the step too.
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


@dataclasses.dataclass(frozen=True)
class WeightSchedule:
  """A loss weight over the steps (DINOv3's gram.loss_weight_schedule and
  dino.local_loss_weight_schedule): `warmup_cosine_constant(step, start, peak, end,
  warmup_steps, total_steps, cosine_steps)`, i.e. start -> peak linearly, peak -> end by a half
  cosine, then end. A constant weight is start == peak == end."""
  start: float
  peak: float
  end: float
  warmup_steps: int = 0
  cosine_steps: int = 0
  total_steps: int = 1

  @classmethod
  def from_config(cls, end: float, schedule, steps_per_epoch: int, total_steps: int
                  ) -> 'WeightSchedule':
    """end: the final weight; schedule: () (constant) or (start, peak, warmup_epochs,
    cosine_epochs)."""
    if not schedule:
      return cls(end, end, end, 0, 0, total_steps)
    start, peak, warmup, cos = schedule
    return cls(float(start), float(peak), float(end), int(round(warmup * steps_per_epoch)),
               int(round(cos * steps_per_epoch)), total_steps)

  @property
  def constant(self) -> bool:
    return self.start == self.peak == self.end

  def __call__(self, step):
    if self.constant:
      return jnp.full(jnp.shape(step), self.end, jnp.float32)
    return warmup_cosine_constant(step, self.start, self.peak, self.end, self.warmup_steps,
                                  self.total_steps, self.cosine_steps)


@dataclasses.dataclass(frozen=True)
class GramRefresh:
  """When the EMA teacher is copied into DINOv3's Gram teacher, as a pure function of the step.

  `__call__(n)` is True when the copy happens at the end of the update that makes the step
  count n (the copy then holds the EMA teacher after that update's EMA):
  - n == load_ema_at (gram.it_load_ema_teacher: the official loop copies before iteration n,
    i.e. after update n; 0 is the run's start, handled at init; -1: never);
  - rep_update (gram.rep_update): n >= first_update (gram.it_first_update), n a multiple of
    every (gram.update_frequency), and fewer than max_updates (gram.max_updates; 0: no limit)
    such steps before n.
  """
  load_ema_at: int = -1
  rep_update: bool = False
  first_update: int = 0
  every: int = 1
  max_updates: int = 0

  def __call__(self, n):
    n = jnp.asarray(n, jnp.int32)
    hit = n == self.load_ema_at if self.load_ema_at > 0 else jnp.zeros(jnp.shape(n), bool)
    if self.rep_update:
      repeat = (n >= self.first_update) & (n % self.every == 0) & (n > 0)
      if self.max_updates:
        first = max(self.first_update, 1)  # updates are the multiples of every in [first, n)
        before = (n - 1) // self.every - (first - 1) // self.every
        repeat = repeat & (before < self.max_updates)
      hit = hit | repeat
    return hit


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
  # DINOv3 (None: off): the Gram loss weight, the weight of the local-crop DINO pairs, and
  # the steps at which the EMA teacher is copied into the Gram teacher.
  gram_weight: WeightSchedule | None = None
  dino_local_weight: WeightSchedule | None = None
  gram_refresh: GramRefresh | None = None

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> 'Schedules':
    o, l = config.optim, config.loss
    total = config.epochs * steps_per_epoch
    g = config.get('gram')  # configs written before DINOv3 have no gram fields: off
    gram_weight = gram_refresh = dino_local = None
    if g is not None and g.weight > 0:
      gram_weight = WeightSchedule.from_config(g.weight, tuple(g.weight_schedule),
                                               steps_per_epoch, total)
      if not g.ema_teacher:
        gram_refresh = GramRefresh(g.load_ema_at, g.rep_update, g.first_update, g.update_every,
                                   g.max_updates)
    if l.get('dino_local_weight', 1.0) != 1 or tuple(l.get('dino_local_weight_schedule', ())):
      dino_local = WeightSchedule.from_config(l.dino_local_weight,
                                              tuple(l.dino_local_weight_schedule),
                                              steps_per_epoch, total)
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
        teacher_temp_per_step=l.teacher_temp_per_step, family=o.schedules,
        gram_weight=gram_weight, dino_local_weight=dino_local, gram_refresh=gram_refresh)

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

  def loss_weights(self, step) -> dict:
    """The scheduled loss weights by objective term name (DINOv3; empty when off)."""
    weights = {}
    if self.gram_weight is not None:
      weights['gram_loss'] = self.gram_weight(step)
    if self.dino_local_weight is not None:
      weights['dino_local'] = self.dino_local_weight(step)
    return weights

  def values(self, step) -> dict:
    weights = {f'{"gram" if k == "gram_loss" else k}_weight': v
               for k, v in self.loss_weights(step).items()}
    return {'lr': self.lr(step), 'wd': self.weight_decay(step),
            'momentum': self.teacher_momentum(step), 'teacher_temp': self.teacher_temp_at(step),
            **weights}
