"""python -m dino_jax.main --config=configs/vit_s16.py --workdir=DIR [--config.field=value ...]"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from dino_jax import checkpointing, data, distributed, train, watchdog
from dino_jax.validate import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  try:
    distributed.initialize(_CONFIG.value.distributed)  # before anything touches a device
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, data.DataError, distributed.DistributedConfigError,
          train.NonFiniteLossError, checkpointing.CheckpointMismatchError,
          watchdog.CollapseError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
