"""Evaluate a trained (or converted) model by evaluator name (dino_jax/evaluators/__init__.py):
k-NN, linear probe, attention maps, DAVIS video.

  python -m dino_jax.evaluate knn --model=WORKDIR --source=npz:cifar.npz
  python -m dino_jax.evaluate linear --model=WORKDIR --source=npz:cifar.npz
  python -m dino_jax.evaluate attention --model=WORKDIR --images a.jpg b.png --out=DIR
  python -m dino_jax.evaluate video --model=WORKDIR --davis=DAVIS_ROOT [--out=DIR]

--model takes a workdir (newest checkpoint), a WORKDIR/checkpoints/<step> directory or a file
written by `python -m dino_jax.inference export` or `python -m dino_jax.convert import`.
--init evaluates the network at initialisation instead: the model of the checkpoint's config,
built with its seed (the teacher at step 0).
"""
from __future__ import annotations

import argparse
import json
import sys

from dino_jax import evaluators
from dino_jax.errors import DinoJaxError
from dino_jax.evaluators import cli

# One command per registered evaluator (evaluators.EVALUATORS): its module's `run(args)`
COMMANDS = {name: evaluators.module(name).run for name in evaluators.names()}


def parser() -> argparse.ArgumentParser:
  """A subcommand per registered evaluator: the model flags (evaluators/cli.py), then the
  flags its module's `add_arguments` declares."""
  ap = argparse.ArgumentParser(prog='python -m dino_jax.evaluate', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest='command', required=True)
  for name in evaluators.names():
    mod = evaluators.module(name)
    p = sub.add_parser(name, help=mod.HELP)
    cli.add_model_arguments(p)
    mod.add_arguments(p)
  return ap


# Bad inputs, each reported as one line naming the file (or field) and what is wrong
ERRORS = (DinoJaxError, FileNotFoundError)


def main(argv=None):
  """Run one command and return its results; a bad --model file or data source prints one
  `error:` line and exits with status 1."""
  args = parser().parse_args(argv)
  try:
    res = COMMANDS[args.command](args)
  except ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1, default=lambda x: x.tolist() if hasattr(x, 'tolist') else str(x))
  return res


if __name__ == '__main__':
  sys.exit(main() and 0)
