"""Collapse watchdog: warns when the teacher's targets stay uniform, or on one prototype.

DINO avoids collapse by balancing centering (pushes towards uniform targets) against
sharpening (pushes towards one prototype). When the balance is lost the teacher entropy H_t
sits at ln(out_dim) (every image gets the same flat target: uniform collapse) or at 0 with
every image on one prototype (dominant-prototype collapse). Either way the loss stops
teaching the backbone anything. The watchdog looks at H_t at each log step, after the lr
warmup, and when it stays inside a collapse band for `patience` log intervals in a row it
returns one warning line (and, with `stop`, the run raises `CollapseError`).
"""
from __future__ import annotations

import dataclasses
import math

from dino_jax.errors import DinoJaxError

LEVERS = {
    'uniform': ('loss.koleo_weight (e.g. 0.1), keep the prototypes frozen longer '
                '(optim.freeze_last_layer), a lower loss.teacher_temp, a lower optim.lr or a '
                'longer optim.warmup_epochs'),
    'one-prototype': ('a higher loss.teacher_temp, a lower loss.center_momentum (faster '
                      'centering), a lower optim.lr, loss.centering=sinkhorn_knopp'),
}


class CollapseError(DinoJaxError, RuntimeError):
  """The run collapsed and config.watchdog.stop asked to stop."""


@dataclasses.dataclass
class Watchdog:
  """Counts consecutive log steps whose teacher entropy is in a collapse band.

  margin: the uniform band's width as a fraction of ln(out_dim): H_t > (1 - margin) ln(out_dim).
  low_margin: the one-prototype band, H_t < low_margin ln(out_dim) ("near 0": a sharp teacher
    that still spreads a batch over a handful of prototypes sits above it).
  patience: log intervals in a row inside a band before it warns (once per episode: it warns
    again only after H_t has left the band).
  start_step: steps before this are not judged (the lr warmup, where H_t starts high).
  """
  out_dim: int
  margin: float = 0.1
  low_margin: float = 0.02
  patience: int = 3
  start_step: int = 0
  _symptom: str | None = None
  _count: int = 0
  _first: int = 0
  _warned: bool = False

  @classmethod
  def from_config(cls, config, warmup_steps: int) -> 'Watchdog':
    w = config.watchdog
    return cls(out_dim=config.model.out_dim, margin=w.margin, low_margin=w.low_margin,
               patience=w.patience, start_step=warmup_steps)

  def symptom(self, entropy: float) -> str | None:
    top = math.log(self.out_dim)
    if not math.isfinite(entropy):
      return None  # the non-finite loss check owns that case
    if entropy > (1.0 - self.margin) * top:
      return 'uniform'
    if entropy < self.low_margin * top:
      return 'one-prototype'
    return None

  def update(self, step: int, entropy: float) -> str | None:
    """Feed one logged step; returns the warning line when this step completes an episode."""
    symptom = self.symptom(entropy) if step >= self.start_step else None
    if symptom != self._symptom:
      self._symptom, self._count, self._first, self._warned = symptom, 0, step, False
    if symptom is None:
      return None
    self._count += 1
    if self._count < self.patience or self._warned:
      return None
    self._warned = True
    top = math.log(self.out_dim)
    where = (f'above {1 - self.margin:.0%} of' if symptom == 'uniform'
             else f'below {self.low_margin:.0%} of')
    return (f'collapse watchdog: {symptom} collapse: teacher entropy {entropy:.3f} stayed '
            f'{where} ln(out_dim) = {top:.3f} for {self._count} log intervals (steps '
            f'{self._first}-{step}); levers: {LEVERS[symptom]} (README "Training on small '
            f'data")')
