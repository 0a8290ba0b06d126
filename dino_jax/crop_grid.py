"""Look at the crops a config makes: a PNG grid, one row per image, [image | global crops |
local crops], drawn by the train step's own multi-crop augmentation (augment.multicrop).

  python -m dino_jax.crop_grid --config=configs/cpu.py [--out=crops.png] [--n=8] [--seed=0]
"""
from __future__ import annotations

import jax
import numpy as np

from dino_jax import augment, image_ops


def crop_grid(images: np.ndarray, hw: np.ndarray, cfg: augment.AugmentConfig, seed: int = 0,
              cell: int = 96) -> np.ndarray:
  """uint8 picture: one row per image, [canvas | global crops | local crops], each cell
  resized (nearest) to cell x cell."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  g, l = jax.jit(lambda k, c, s: augment.multicrop(k, c, s, cfg))(jax.random.PRNGKey(seed),
                                                                  images, hw)
  views = [np.asarray(v) for v in (g, l) if v is not None]
  b = images.shape[0]
  denorm = lambda x: np.clip(image_ops.denormalize(x) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  up = lambda x: np.asarray(Image.fromarray(x).resize((cell, cell), Image.NEAREST))
  rows = []
  for i in range(b):
    cells = [up(images[i][:hw[i][0], :hw[i][1]])]
    for v in views:
      n = v.shape[0] // b
      cells += [up(denorm(v[c * b + i])) for c in range(n)]
    rows.append(np.concatenate(cells, axis=1))
  return np.concatenate(rows, axis=0)


def _main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from dino_jax import data  # pylint: disable=import-outside-toplevel
  config = flags.FLAGS.config
  train, _ = data.load(config.data.source)
  n = min(flags.FLAGS.n, len(train))
  batch = next(iter(data.eval_batches(train, canvas_size=config.data.canvas_size,
                                      batch_size=n)))
  grid = crop_grid(batch['image'], batch['hw'], augment.AugmentConfig.from_config(config),
                   seed=flags.FLAGS.seed)
  Image.fromarray(grid).save(flags.FLAGS.out)
  print(f'wrote {flags.FLAGS.out}: {n} rows of [image, 2 global crops, '
        f'{config.crops.n_local} local crops]')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=ungrouped-imports
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Path to a config file.')
  flags.DEFINE_string('out', 'crops.png', 'Where to write the PNG grid.')
  flags.DEFINE_integer('n', 8, 'How many images (rows).')
  flags.DEFINE_integer('seed', 0, 'Augmentation seed.')
  flags.mark_flags_as_required(['config'])
  app.run(_main)
