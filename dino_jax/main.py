"""python -m dino_jax.main --config=configs/vit_s16.py --workdir=DIR [--config.field=value ...]

Our progress lines go to stdout; library INFO log lines to WORKDIR/log.txt (absl's
--alsologtostderr also shows them on stderr; warnings and errors always show there).
"""
from __future__ import annotations

import os
import re
import signal
import sys


def _stop_during_startup(signum, frame):
  """SIGTERM before training steps run (imports, data, restore, compile): nothing to save.

  Exits at once with os._exit: a SystemExit raised from a signal handler lands wherever the
  main thread is, and there it was seen swallowed (inside a garbage-collector callback of
  jaxlib's: the run went on training) or followed by a segmentation fault (SIGTERM 5-8 s into
  a configs/cpu.py run). Nothing is being written at start-up: no save has begun."""
  del signum, frame
  print('dino_jax: SIGTERM during start-up, before the first step: stopped with nothing to '
        'save (the workdir is as it was); rerun the same command to start or resume',
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(143)  # 128 + SIGTERM, what the signal itself would have given


if __name__ == '__main__':  # before the heavy imports; the loop's preemption watch takes over
  signal.signal(signal.SIGTERM, _stop_during_startup)

# pylint: disable=wrong-import-position

from absl import app, flags
from ml_collections import config_flags

from dino_jax import distributed, metrics, train
from dino_jax.errors import DinoJaxError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config override (an unknown field, a value of the wrong
  type) reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    reason = ' '.join(str(e.args[0] if e.args else e).replace('\\n', ' ')
                      .replace("\\'", "'").split())
    field = re.search(r"'(\w+)'", reason)
    if isinstance(e, (AttributeError, KeyError)) and field:
      hint = re.search(r'Did you mean [^?]*\?', reason)
      reason = f'the config has no field {field.group(1)!r}' + (f' ({hint.group(0)})' if hint
                                                               else '')
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    named = [a for a in overrides if field and a.split('=')[0].endswith('.' + field.group(1))]
    print(f'error: bad config override {" ".join(named or overrides)}: {reason}',
          file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  metrics.quiet_library_logs()  # library INFO log lines -> WORKDIR/log.txt, not stderr
  try:
    distributed.initialize(_CONFIG.value.distributed)  # before anything touches a device
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except DinoJaxError as e:  # a config field, the data, a checkpoint, a diverged run: one line
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
