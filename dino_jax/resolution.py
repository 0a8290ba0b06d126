"""Crop-size sets: DINOv3's high-resolution adaptation trains on several sets of (global crop,
local crop, Gram teacher crop) sizes, each step on one set drawn with fixed ratios.

Shapes stay static: every set is a config of its own (`set_config`) with its own compiled step
(train.build compiles one per set, once), and which set a step uses is a pure function of the
seed and the step (`Sampler`), so every process draws the same set and a resumed run draws the
sets it would have drawn. Without config.crops.size_sets a run has the one set of
crops.global_size, crops.local_size and gram.teacher_size.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

_STREAM = 0x68726674  # keeps the draw apart from any other use of (seed, step)


@dataclasses.dataclass(frozen=True)
class SizeSet:
  global_size: int
  local_size: int
  gram_teacher_size: int  # 0: the set's global_size (as gram.teacher_size)


def size_sets(config: ml_collections.ConfigDict) -> tuple[SizeSet, ...]:
  """config.crops.size_sets as SizeSets, or the one set of the config's own sizes."""
  c = config.crops
  if not c.size_sets:
    return (SizeSet(c.global_size, c.local_size, config.gram.teacher_size),)
  return tuple(SizeSet(*(int(v) for v in s)) for s in c.size_sets)


def ratios(config: ml_collections.ConfigDict) -> np.ndarray:
  """The probability of each set (config.crops.size_set_ratios normalised; equal if empty)."""
  n = len(size_sets(config))
  r = np.asarray(config.crops.size_set_ratios or [1.0] * n, np.float64)
  return r / r.sum()


def set_config(config: ml_collections.ConfigDict, s: SizeSet) -> ml_collections.ConfigDict:
  """The config a step of set `s` runs: crop and Gram teacher sizes replaced, all else equal."""
  c = config.copy_and_resolve_references()
  c.crops.global_size, c.crops.local_size = s.global_size, s.local_size
  c.gram.teacher_size = s.gram_teacher_size
  return c


@dataclasses.dataclass(frozen=True)
class Sampler:
  """step -> the index of the size set that step trains on."""
  seed: int
  p: tuple[float, ...]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Sampler':
    return cls(int(config.seed), tuple(float(v) for v in ratios(config)))

  def __call__(self, step: int) -> int:
    if len(self.p) == 1:
      return 0
    rng = np.random.default_rng([self.seed, _STREAM, int(step)])
    return int(rng.choice(len(self.p), p=self.p))
