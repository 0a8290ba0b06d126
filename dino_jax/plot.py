"""Training curves from a workdir's metrics.jsonl: loss, teacher entropy and k-NN over steps.

  python -m dino_jax.plot WORKDIR [--out=WORKDIR/curves.png]

Three panels sharing the step axis: the DINO loss (and the total loss when other terms are
on), the teacher entropy H_t against its uniform ceiling ln(out_dim) (taken from the run's
'start' line), and the teacher k-NN top-1. Collapse warnings are drawn as dotted lines. Lines
of a resumed run past its restored step are replaced by the resumed run's (the last line
written for a step wins).
"""
from __future__ import annotations

import json
import math
import os
import sys

import matplotlib

matplotlib.use('Agg')  # files only, no screen needed
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

from dino_jax.errors import DinoJaxError  # noqa: E402  pylint: disable=wrong-import-position


class PlotError(DinoJaxError, ValueError):
  """metrics.jsonl is missing or holds nothing to plot."""


def read(path: str) -> tuple[dict[int, dict], list[dict]]:
  """{step: merged numeric values} and the event lines, from a metrics.jsonl."""
  if not os.path.isfile(path):
    raise PlotError(f'{path} does not exist: pass the --workdir of a training run')
  steps: dict[int, dict] = {}
  events = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        print(f'dino_jax.plot: {path}:{n} is not JSON (a line cut by a kill?); skipped',
              file=sys.stderr)
        continue
      if 'event' in rec:
        events.append(rec)
      else:
        steps.setdefault(int(rec['step']), {}).update(rec)
  return steps, events


def series(steps: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
  xs = sorted(s for s, v in steps.items() if key in v)
  return xs, [steps[s][key] for s in xs]


def plot(workdir: str, out: str | None = None) -> str:
  """Writes the PNG and returns its path."""
  steps, events = read(os.path.join(workdir, 'metrics.jsonl'))
  if not any('loss' in v for v in steps.values()):
    raise PlotError(f'{workdir}/metrics.jsonl has no training lines yet (the first comes after '
                    f'config.log_every steps)')
  out = out or os.path.join(workdir, 'curves.png')
  fig, (ax_loss, ax_h, ax_knn) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
  ax_loss.plot(*series(steps, 'dino_loss'), label='DINO loss')
  if any('ibot_loss' in v or 'koleo' in v for v in steps.values()):
    ax_loss.plot(*series(steps, 'loss'), label='total loss')
  ax_loss.set_ylabel('loss')
  ax_loss.legend(loc='upper right')
  ax_h.plot(*series(steps, 'teacher_entropy'), label='teacher entropy H_t')
  out_dims = [e['out_dim'] for e in events if e['event'] == 'start' and 'out_dim' in e]
  if out_dims:
    ax_h.axhline(math.log(out_dims[-1]), color='gray', ls='--',
                 label=f'ln(out_dim) = {math.log(out_dims[-1]):.2f} (uniform)')
  ax_h.set_ylabel('nats')
  ax_h.set_ylim(bottom=0)
  ax_h.legend(loc='lower left')
  xs, ys = series(steps, 'knn_top1')
  ax_knn.plot(xs, ys, marker='o', label='teacher k-NN top-1')
  ax_knn.set_ylabel('%')
  ax_knn.set_xlabel('step')
  ax_knn.legend(loc='lower right')
  for e in events:
    if e['event'] == 'collapse_warning':
      for ax in (ax_loss, ax_h, ax_knn):
        ax.axvline(e['step'], color='red', ls=':', lw=1)
  fig.suptitle(os.path.basename(os.path.normpath(workdir)))
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv: list[str]) -> int:
  args = [a for a in argv if not a.startswith('--out=')]
  outs = [a.split('=', 1)[1] for a in argv if a.startswith('--out=')]
  if len(args) != 1 or any(a.startswith('-') for a in args):
    print('usage: python -m dino_jax.plot WORKDIR [--out=FILE.png]', file=sys.stderr)
    return 2
  try:
    path = plot(args[0], outs[-1] if outs else None)
  except PlotError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'dino_jax: wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
