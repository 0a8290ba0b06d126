"""Soak test (not in CI): kill a training run at random moments, resume it each time, and
check that it ends bitwise identical to an uninterrupted run.

  python tests/soak.py [--kills 20] [--steps 4000] [--seed 0] [--dir /tmp/dino_soak]

Each round starts `python -m dino_jax.main` on a tiny digits run (checkpoint every 10 steps),
waits a random 2-25 s (start-up, compiling, stepping or saving) and sends SIGKILL or SIGTERM at
random; after `--kills` rounds the run is let finish. The final teacher and student and every
logged loss must equal those of the uninterrupted run, and each step must be logged once.
Prints one line per round and a summary; exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def write_config(directory: str, steps: int) -> str:
  path = os.path.join(directory, 'soak_config.py')
  with open(path, 'w') as f:
    f.write(f'import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import tiny_config\n'
            f'def get_config():\n'
            f'  return tiny_config(**{{"data.source": "digits", "batch_size": 64,\n'
            f'                        "data.epoch_length": {steps // 4}, "epochs": 4,\n'
            f'                        "checkpoint_every": 10, "log_every": 1}})\n')
  return path


def start(config: str, workdir: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, '-m', 'dino_jax.main', f'--config={config}',
                           f'--workdir={workdir}'], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(workdir: str) -> dict[int, float]:
  steps: dict[int, list[float]] = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'loss' in r:
        steps.setdefault(r['step'], []).append(r['loss'])
  duplicated = [s for s, v in steps.items() if len(v) > 1]
  if duplicated:
    raise AssertionError(f'steps logged more than once: {duplicated[:10]}')
  return {s: v[0] for s, v in steps.items()}


def final_params(workdir: str):
  from dino_jax import checkpointing  # pylint: disable=import-outside-toplevel
  state, _ = checkpointing.restore_raw(workdir)
  return state['params'], state['teacher_params']


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--kills', type=int, default=20)
  p.add_argument('--steps', type=int, default=4000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--dir', default='/tmp/dino_soak')
  a = p.parse_args()
  shutil.rmtree(a.dir, ignore_errors=True)
  os.makedirs(a.dir)
  config = write_config(a.dir, a.steps)
  rng = random.Random(a.seed)
  t0 = time.time()
  ref = os.path.join(a.dir, 'reference')
  proc = start(config, ref)
  out, _ = proc.communicate()
  if proc.returncode != 0:
    print(out[-3000:])
    return 1
  print(f'reference run: {len(losses(ref))} steps in {time.time() - t0:.0f} s', flush=True)
  work = os.path.join(a.dir, 'killed')
  kills = 0
  while kills < a.kills:
    proc = start(config, work)
    delay = rng.uniform(2, 25)
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    try:
      proc.wait(timeout=delay)
      print(f'round {kills + 1}: the run finished before the signal; restarting from scratch '
            f'is not needed, stopping the rounds', flush=True)
      break
    except subprocess.TimeoutExpired:
      pass
    proc.send_signal(sig)
    out, _ = proc.communicate()
    kills += 1
    logged = max(losses(work), default=0) if os.path.exists(
        os.path.join(work, 'metrics.jsonl')) else 0
    print(f'round {kills}: {signal.Signals(sig).name} after {delay:4.1f} s, exit '
          f'{proc.returncode}, last logged step {logged}', flush=True)
    if proc.returncode not in (0, -signal.SIGKILL, 143):
      print(out[-3000:])
      return 1
  proc = start(config, work)
  out, _ = proc.communicate()
  if proc.returncode != 0:
    print(out[-3000:])
    return 1
  ref_losses, got = losses(ref), losses(work)
  differ = [s for s in ref_losses if got.get(s) != ref_losses[s]]
  params_equal = all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for tree_a, tree_b in zip(final_params(ref), final_params(work))
      for x, y in zip(_leaves(tree_a), _leaves(tree_b)))
  ok = not differ and set(got) == set(ref_losses) and params_equal
  print(f'soak: {kills} kills, {len(got)} steps logged once each, losses '
        f'{"identical" if not differ else f"differ at {differ[:5]}"}, final params '
        f'{"bitwise identical" if params_equal else "DIFFER"}; {time.time() - t0:.0f} s',
        flush=True)
  return 0 if ok else 1


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)


if __name__ == '__main__':
  sys.exit(main())
