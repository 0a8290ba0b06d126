"""Weighted k-NN on frozen features, the DINO protocol.

Features: teacher CLS after the final norm, L2-normalised. For each test image the k most
cosine-similar train images vote for their class with weight exp(sim / T) (T = 0.07); the
prediction is the class with the largest total. Works for any test-set size (the test set is
processed in fixed-size chunks, the last one padded).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def knn_scores(test_feats, train_feats, train_labels, *, k: int, temperature: float,
               num_classes: int):
  """(n_test, num_classes) vote totals. Features must be L2-normalised."""
  sims = jnp.einsum('td,nd->tn', test_feats.astype(jnp.float32),
                    train_feats.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  top_sims, top_idx = jax.lax.top_k(sims, k)
  votes = jax.nn.one_hot(train_labels[top_idx], num_classes) * jnp.exp(
      top_sims / temperature)[..., None]
  return jnp.sum(votes, axis=1)


def knn_classify(train_feats, train_labels, test_feats, test_labels, *, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> dict[str, float]:
  """Top-1 and top-5 accuracy (percent) of weighted k-NN."""
  train_feats = np.asarray(train_feats, np.float32)
  test_feats = np.asarray(test_feats, np.float32)
  train_labels = np.asarray(train_labels, np.int32)
  test_labels = np.asarray(test_labels, np.int32)
  if len(train_feats) == 0 or len(test_feats) == 0:
    raise ValueError('k-NN needs at least one train and one test feature')
  num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
  k = min(k, len(train_feats))
  chunk = min(chunk, len(test_feats))
  train_feats_dev = jax.device_put(train_feats)  # once, not once per chunk
  train_labels_dev = jax.device_put(train_labels)
  top1 = top5 = 0
  for start in range(0, len(test_feats), chunk):
    block = test_feats[start:start + chunk]
    n = len(block)
    block = np.pad(block, ((0, chunk - n), (0, 0)))  # one compiled shape for every chunk
    scores = np.asarray(knn_scores(block, train_feats_dev, train_labels_dev, k=k,
                                   temperature=temperature, num_classes=num_classes))[:n]
    labels = test_labels[start:start + n]
    order = np.argsort(-scores, axis=1, kind='stable')
    top1 += int(np.sum(order[:, 0] == labels))
    top5 += int(np.sum(np.any(order[:, :min(5, num_classes)] == labels[:, None], axis=1)))
  return {'top1': 100.0 * top1 / len(test_feats), 'top5': 100.0 * top5 / len(test_feats)}


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
