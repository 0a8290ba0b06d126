"""What every evaluator's command shares: the model flags (--model, --which, --step, --init,
--dtype, --json), the view flags of the feature-based ones (--source, --size, --crop_fraction,
--canvas_size, --batch_size), loading the model they name and extracting its features.

Each evaluator's own file declares `HELP`, `add_arguments(parser)` and `run(args)`;
`python -m dino_jax.evaluate` builds one subcommand per registered evaluator from them.
"""
from __future__ import annotations

from flax import nnx

from dino_jax import checkpointing, data, models, paths, sharding, weights
from dino_jax.evaluators import features as features_lib


def add_model_arguments(parser) -> None:
  """The flags of every command: which model, at which step, and where the results go."""
  parser.add_argument('--model', required=True,
                      help='workdir, WORKDIR/checkpoints/<step> or an exported .msgpack file')
  parser.add_argument('--which', default='teacher', choices=('teacher', 'student'))
  parser.add_argument('--step', type=int, default=None,
                      help='checkpoint step (default newest)')
  parser.add_argument('--init', action='store_true',
                      help="the network at initialisation (the config's seed), not trained")
  parser.add_argument('--dtype', default=None, help="compute dtype (default: the run's)")
  parser.add_argument('--json', default=None, help='also write the results to this file')


def add_view_arguments(parser) -> None:
  """The flags of commands that read a data source through the evaluation view."""
  parser.add_argument('--source', required=True, help='a config.data.source string')
  parser.add_argument('--size', type=int, default=0, help='eval crop size (default: the '
                      "model's global crop size)")
  parser.add_argument('--crop_fraction', type=float, default=0,
                      help="centre-crop fraction (default: the model's; 0.875 = 256 -> 224)")
  parser.add_argument('--canvas_size', type=int, default=0)
  parser.add_argument('--batch_size', type=int, default=256)


def load(args):
  """(ViT backbone, config, description) as the model flags say."""
  if args.init:
    config = weights.read_config(args.model, args.step)
    model = models.build(config, seed=config.seed, dtype=args.dtype or config.dtype)
    return model.backbone, config, f'{args.model} at initialisation (seed {config.seed})'
  model, config = weights.load_model(args.model, which=args.which, step=args.step,
                                     dtype=args.dtype)
  step = '' if paths.isfile(args.model) else f' step {_step(args)}'
  return model, config, f'{args.model} ({args.which}{step})'


def _step(args):
  return args.step if args.step is not None else checkpointing.read_config(args.model)[1]


def labelled(source: str):
  """(train, test) sources of `source`; exits with one line unless both have labels."""
  train, test = data.load(source)
  if test is None or not (train.has_labels and test.has_labels):
    raise SystemExit(f'error: {source} needs labelled train and test splits')
  return train, test


def view_args(args, config):
  """(crop size, crop fraction, canvas size) from the view flags, else the run's config."""
  size = args.size or config.crops.global_size
  frac = args.crop_fraction or config.crops.eval_crop_fraction
  canvas = args.canvas_size or max(config.data.canvas_size, size)
  return size, frac, canvas


def extract(backbone, config, args, source, kind, limit=0):
  """(features, labels) of `source` through the evaluation view (features.KINDS `kind`)."""
  size, frac, canvas = view_args(args, config)
  mesh = sharding.make_mesh()
  graphdef, params = nnx.split(backbone)
  fn = features_lib.make_feature_fn(graphdef, size=size, crop_fraction=frac,
                                    dtype=backbone.dtype, kind=kind)
  return features_lib.extract(fn, params, source, mesh=mesh, canvas_size=canvas,
                              batch_size=args.batch_size, limit=limit)
