"""Evaluators by name: one file each, one table here.

  knn        weighted k-NN on frozen teacher features (knn.py); runs in the training loop
  linear     linear probe with an lr sweep (linear.py)
  attention  CLS attention maps, thresholded masks, PNGs (attention.py)
  video      DAVIS label propagation, J and F (video.py)

`config.evals` names the evaluators the training loop runs at eval time: each must have a
function `evaluate(inputs: LoopInputs) -> dict | None` (its metrics, None when the data does not
allow it) and `describe(metrics, config) -> str` (the printed line). Every name is also a
subcommand of `python -m dino_jax.evaluate NAME`: its module declares `HELP` (one line),
`add_arguments(parser)` (its flags, after the model flags of cli.py) and `run(args)` (prints
and returns its results). Adding an evaluator: write its file and add one line to EVALUATORS.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

# name -> (module, runs in the training loop)
EVALUATORS = {
    'knn': ('dino_jax.evaluators.knn', True),
    'linear': ('dino_jax.evaluators.linear', False),
    'attention': ('dino_jax.evaluators.attention', False),
    'video': ('dino_jax.evaluators.video', False),
}


@dataclasses.dataclass(frozen=True)
class LoopInputs:
  """What the training loop hands an evaluator at eval time."""
  feature_fn: Callable  # jit((teacher params, canvas, hw) -> L2-normalised CLS features)
  params: Any  # the teacher's parameters
  train_source: Any  # data.Source
  test_source: Any  # data.Source or None
  config: Any  # the run's ConfigDict
  mesh: Any  # the run's jax.sharding.Mesh


def names() -> tuple[str, ...]:
  """Every evaluator's name (the subcommands of `python -m dino_jax.evaluate`)."""
  return tuple(EVALUATORS)


def loop_names() -> tuple[str, ...]:
  """The names config.evals may hold: the evaluators that run in the training loop."""
  return tuple(n for n, (_, in_loop) in EVALUATORS.items() if in_loop)


def check_loop_names(evals) -> None:
  """ValueError naming the first entry of config.evals that is not a loop evaluator."""
  for name in evals:
    if name not in loop_names():
      raise ValueError(f'unknown evaluator {name!r} in config.evals; choose from '
                       f'{", ".join(loop_names())}')


def module(name: str):
  """The module of evaluator `name` (imported on first use)."""
  if name not in EVALUATORS:
    raise ValueError(f'unknown evaluator {name!r}; choose from {", ".join(names())}')
  return importlib.import_module(EVALUATORS[name][0])


def run_in_loop(name: str, inputs: LoopInputs) -> dict | None:
  """Evaluator `name`'s metrics at a training-loop eval (None: the data does not allow it)."""
  check_loop_names((name,))
  return module(name).evaluate(inputs)
