"""Weighted k-NN on frozen features, the DINO protocol; `evaluate` is the training loop's entry
point (config.evals 'knn'), `knn_classify_ks` the one of `python -m dino_jax.evaluate knn`.

Features: teacher CLS after the final norm, L2-normalised. For each test image the k most
cosine-similar train images vote for their class with weight exp(sim / T) (T = 0.07); the
prediction is the class with the largest total. Several k share one similarity computation
(the official {10, 20, 100, 200}): the top max(k) neighbours are found once and each k reads a
prefix of them.

Sharding: the train-feature bank is split over every device of the mesh. Each device scores
a test chunk against its slice and keeps its own top max(k); the per-device candidates are
gathered and merged (n_devices * max(k) values per test image, not the whole bank). Any
test-set size works (fixed-size test chunks, the last one padded; the official loop crashes
below 100 test images).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dino_jax import sharding
from dino_jax.evaluators import cli
from dino_jax.evaluators import features as features_lib

OFFICIAL_KS = (10, 20, 100, 200)


def _local_top_k(test_feats, bank, bank_labels, *, k: int, axes):
  """Per-device top-k over this device's bank slice, then merged over `axes`."""
  sims = jnp.einsum('td,nd->tn', test_feats, bank, precision=jax.lax.Precision.HIGHEST)
  sims = jnp.where(bank_labels[None, :] >= 0, sims, -jnp.inf)  # padded bank rows never win
  kk = min(k, bank.shape[0])
  vals, idx = jax.lax.top_k(sims, kk)
  labs = bank_labels[idx]
  if axes:
    vals = jax.lax.all_gather(vals, axes, axis=1, tiled=True)
    labs = jax.lax.all_gather(labs, axes, axis=1, tiled=True)
  vals, order = jax.lax.top_k(vals, k)
  return vals, jnp.take_along_axis(labs, order, axis=1)


@functools.partial(jax.jit, static_argnames=('ks', 'num_classes', 'mesh'))
def knn_scores(test_feats, bank, bank_labels, *, ks: tuple[int, ...], temperature: float,
               num_classes: int, mesh=None):
  """(len(ks), n_test, num_classes) vote totals for each k. Features must be L2-normalised;
  bank rows with label -1 are padding. With a mesh the bank must be sharded over all of its
  axes (see `shard_bank`)."""
  test_feats = test_feats.astype(jnp.float32)
  k_max = max(ks)
  if mesh is None:
    vals, labs = _local_top_k(test_feats, bank, bank_labels, k=k_max, axes=())
  else:
    fn = jax.shard_map(functools.partial(_local_top_k, k=k_max, axes=sharding.AXES), mesh=mesh,
                       in_specs=(P(), P(sharding.AXES), P(sharding.AXES)),
                       out_specs=(P(), P()), check_vma=False)
    vals, labs = fn(test_feats, bank, bank_labels)
  weights = jnp.where(jnp.isfinite(vals), jnp.exp(vals / temperature), 0.0)
  votes = jax.nn.one_hot(labs, num_classes) * weights[..., None]  # (T, k_max, C)
  cum = jnp.cumsum(votes, axis=1)
  return jnp.stack([cum[:, k - 1] for k in ks])


def shard_bank(train_feats: np.ndarray, train_labels: np.ndarray, mesh):
  """Pad the bank to a multiple of the device count (label -1) and shard its rows."""
  n_dev = mesh.devices.size
  pad = (-len(train_feats)) % n_dev
  feats = np.pad(train_feats, ((0, pad), (0, 0)))
  labels = np.pad(train_labels, (0, pad), constant_values=-1)
  rows = NamedSharding(mesh, P(sharding.AXES))
  return jax.device_put(feats, rows), jax.device_put(labels, rows)


def knn_classify_ks(train_feats, train_labels, test_feats, test_labels, *,
                    ks=OFFICIAL_KS, temperature: float = 0.07, num_classes: int | None = None,
                    chunk: int = 1024, mesh=None) -> dict[int, dict[str, float]]:
  """{k: {'top1', 'top5'}} (percent) of weighted k-NN for every k in `ks`, in one pass.

  mesh: shard the train bank over its devices (default: every local device, one axis each).
  k larger than the train set is clamped to its size.
  """
  train_feats = np.asarray(train_feats, np.float32)
  test_feats = np.asarray(test_feats, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  test_labels = np.asarray(test_labels, np.int32)
  if len(train_feats) == 0 or len(test_feats) == 0:
    raise ValueError('k-NN needs at least one train and one test feature')
  ks = tuple(int(k) for k in np.atleast_1d(ks))
  if not ks or min(ks) < 1:
    raise ValueError(f'k-NN: every k must be >= 1, got {ks}')
  num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
  eff = tuple(sorted({min(k, len(train_feats)) for k in ks}))
  mesh = mesh if mesh is not None else sharding.make_mesh()
  bank, bank_labels = shard_bank(train_feats, train_labels, mesh)
  chunk = min(chunk, len(test_feats))
  top1 = {k: 0 for k in eff}
  top5 = {k: 0 for k in eff}
  for start in range(0, len(test_feats), chunk):
    block = test_feats[start:start + chunk]
    n = len(block)
    block = np.pad(block, ((0, chunk - n), (0, 0)))  # one compiled shape for every chunk
    scores = np.asarray(knn_scores(block, bank, bank_labels, ks=eff, temperature=temperature,
                                   num_classes=num_classes, mesh=mesh))[:, :n]
    labels = test_labels[start:start + n]
    for i, k in enumerate(eff):
      order = np.argsort(-scores[i], axis=1, kind='stable')
      top1[k] += int(np.sum(order[:, 0] == labels))
      top5[k] += int(np.sum(np.any(order[:, :min(5, num_classes)] == labels[:, None], axis=1)))
  n = len(test_feats)
  return {k: {'top1': 100.0 * top1[min(k, len(train_feats))] / n,
              'top5': 100.0 * top5[min(k, len(train_feats))] / n} for k in ks}


def knn_classify(train_feats, train_labels, test_feats, test_labels, *, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024, mesh=None) -> dict[str, float]:
  """Top-1 and top-5 accuracy (percent) of weighted k-NN for one k."""
  return knn_classify_ks(train_feats, train_labels, test_feats, test_labels, ks=(k,),
                         temperature=temperature, num_classes=num_classes, chunk=chunk,
                         mesh=mesh)[k]


def evaluate(inputs) -> dict[str, float] | None:
  """The training loop's k-NN (`config.evals` entry 'knn'): teacher CLS features of the train
  split (at most config.knn.max_train) and the test split, weighted k-NN with config.knn.k and
  .temperature; {'knn_top1', 'knn_top5'} (percent), None when the data has no labelled test
  split. `inputs`: an evaluators.LoopInputs."""
  train, test = inputs.train_source, inputs.test_source
  if test is None or not (train.has_labels and test.has_labels):
    return None
  c = inputs.config
  kw = dict(mesh=inputs.mesh, canvas_size=c.data.canvas_size, batch_size=c.knn.batch_size)
  train_f, train_y = features_lib.extract(inputs.feature_fn, inputs.params, train,
                                          limit=c.knn.max_train, **kw)
  test_f, test_y = features_lib.extract(inputs.feature_fn, inputs.params, test, **kw)
  res = knn_classify(train_f, train_y, test_f, test_y, k=c.knn.k,
                     temperature=c.knn.temperature)
  return {'knn_top1': res['top1'], 'knn_top5': res['top5']}


def describe(metrics: dict[str, float], config) -> str:
  """The loop's printed line for `evaluate`'s metrics."""
  return (f'k-NN (k={config.knn.k}) top-1 {metrics["knn_top1"]:.2f}% '
          f'top-5 {metrics["knn_top5"]:.2f}%')


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pixel_baseline(source: str, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
  """The same weighted k-NN on L2-normalised raw pixels: the bar learned features must clear."""
  from dino_jax import data  # pylint: disable=import-outside-toplevel
  train, test = data.load(source)
  if test is None or not (train.has_labels and test.has_labels):
    raise ValueError(f'{source} needs labelled train and test splits for k-NN')
  def arrays(src):
    recs = [src[i] for i in range(len(src))]
    x = np.stack([r['image'].reshape(-1) for r in recs]).astype(np.float32)
    return l2_normalize(x), np.array([r['label'] for r in recs])
  xtr, ytr = arrays(train)
  xte, yte = arrays(test)
  return knn_classify(xtr, ytr, xte, yte, k=k, temperature=temperature)


# python -m dino_jax.evaluate knn

HELP = 'weighted k-NN (DINO protocol)'


def add_arguments(parser) -> None:
  cli.add_view_arguments(parser)
  parser.add_argument('--k', type=int, nargs='+', default=list(OFFICIAL_KS))
  parser.add_argument('--temperature', type=float, default=0.07)
  parser.add_argument('--max_train', type=int, default=0,
                      help='use this many train images (0: all)')


def run(args) -> dict:
  backbone, config, what = cli.load(args)
  train, test = cli.labelled(args.source)
  t0 = time.time()
  xtr, ytr = cli.extract(backbone, config, args, train, 'cls', args.max_train)
  xte, yte = cli.extract(backbone, config, args, test, 'cls')
  res = knn_classify_ks(xtr, ytr, xte, yte, ks=args.k, temperature=args.temperature)
  print(f'k-NN of {what} on {args.source}: {len(xtr)} train / {len(xte)} test, '
        f'T={args.temperature}, {time.time() - t0:.1f} s')
  for k, r in res.items():
    print(f'  {k:4d}-NN  top-1 {r["top1"]:6.2f}%  top-5 {r["top5"]:6.2f}%')
  return {str(k): v for k, v in res.items()}


if __name__ == '__main__':
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description='Weighted k-NN on raw pixels (a baseline).')
  parser.add_argument('--source', required=True, help='a config.data.source string')
  parser.add_argument('--k', type=int, nargs='+', default=[20, 1])
  args = parser.parse_args()
  for k in args.k:
    res = pixel_baseline(args.source, k=k)
    print(f'raw pixels, weighted {k}-NN on {args.source}: top-1 {res["top1"]:.2f}% '
          f'top-5 {res["top5"]:.2f}%')
