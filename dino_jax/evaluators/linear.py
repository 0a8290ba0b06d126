"""Linear probe on frozen features, the DINO protocol, with a learning-rate sweep in one run.

Classifier: one linear layer (weights N(0, 0.01^2), bias 0, no BatchNorm) on frozen features
(features.py: 'cls4' for ViT-S, 'cls_avgpool' for ViT-B). SGD with momentum 0.9, weight decay
0, lr = base_lr * batch / 256, cosine annealing per epoch down to 0, cross-entropy, evaluated
every epoch on the resize + centre-crop view.

Every learning rate in the sweep trains its own classifier at the same time (vmapped over the
lr axis, same init and batch order), so a sweep costs about one probe (DINOv2 trains many heads
at once the same way). Two ways to feed them:

  cached     features of the evaluation view (resize + centre crop), extracted once. Fast: the
             backbone runs once per image, then every epoch is a few matmuls.
  augmented  the official training views: each epoch every train image gets a fresh
             RandomResizedCrop(scale 0.08-1, bilinear) + horizontal flip and goes through the
             frozen backbone again. Costs epochs x (one forward pass over the train set).
"""
from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax import image_ops, sharding
from dino_jax.data import eval_batches
from dino_jax.evaluators import cli
from dino_jax.evaluators import features as features_lib

MODES = ('cached', 'augmented')


def init_heads(key, n_heads: int, dim: int, num_classes: int):
  """Identical N(0, 0.01^2) weights and zero biases for each of n_heads classifiers."""
  w = 0.01 * jax.random.normal(key, (dim, num_classes), jnp.float32)
  return {'w': jnp.broadcast_to(w, (n_heads, dim, num_classes)),
          'b': jnp.zeros((n_heads, num_classes), jnp.float32)}


def cosine_lr(base_lr, epoch: int, epochs: int):
  """torch CosineAnnealingLR(T_max=epochs, eta_min=0), stepped once per epoch."""
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def _loss(head, x, y, mask):
  logits = x @ head['w'] + head['b']
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def train_epoch(heads, velocity, feats, labels, order, lrs, momentum, weight_decay):
  """One pass over `order` (steps, batch) of row indices (-1 = padding) for every head.

  SGD as torch: g += wd * p; v = momentum * v + g; p -= lr * v."""
  def step(carry, idx):
    heads, velocity = carry
    mask = (idx >= 0).astype(jnp.float32)
    safe = jnp.maximum(idx, 0)
    x, y = feats[safe], labels[safe]

    def one(head, vel, lr):
      g = jax.grad(_loss)(head, x, y, mask)
      g = jax.tree.map(lambda g_, p: g_ + weight_decay * p, g, head)
      vel = jax.tree.map(lambda v, g_: momentum * v + g_, vel, g)
      return jax.tree.map(lambda p, v: p - lr * v, head, vel), vel

    heads, velocity = jax.vmap(one)(heads, velocity, lrs)
    return (heads, velocity), None
  (heads, velocity), _ = jax.lax.scan(step, (heads, velocity), order)
  return heads, velocity


@jax.jit
def head_accuracy(heads, feats, labels):
  """(top-1 count, top-5 count) for every head, each (n_heads,)."""
  logits = jnp.einsum('nd,hdc->hnc', feats, heads['w'],
                      precision=jax.lax.Precision.HIGHEST) + heads['b'][:, None]
  k = min(5, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  top1 = jnp.sum(top[..., 0] == labels, axis=-1)
  top5 = jnp.sum(jnp.any(top == labels[:, None], axis=-1), axis=-1)
  return top1, top5


def epoch_order(key, n: int, batch_size: int) -> np.ndarray:
  """A fresh permutation as (steps, batch) indices; the last batch is padded with -1 (the
  official loader keeps the partial batch)."""
  perm = np.asarray(jax.random.permutation(key, n))
  steps = -(-n // batch_size)
  return np.pad(perm, (0, steps * batch_size - n), constant_values=-1).reshape(steps, batch_size)


def train_probe(train_feats_fn, train_labels, test_feats, test_labels, *, lrs, epochs: int,
                batch_size: int, num_classes: int | None = None, momentum: float = 0.9,
                weight_decay: float = 0.0, seed: int = 0, log=None) -> dict:
  """Train one linear classifier per learning rate; return accuracies per lr and epoch.

  train_feats_fn(epoch) -> (N, dim) train features for that epoch (the same array every epoch
  for cached features). lrs are base rates for batch 256 (scaled by batch_size / 256).
  Returns {'lrs', 'top1': (epochs, n_lrs), 'top5': ..., 'heads'} (percent).
  """
  train_labels = jnp.asarray(np.asarray(train_labels, np.int32))
  test_labels_np = np.asarray(test_labels, np.int32)
  test_feats = jnp.asarray(np.asarray(test_feats, np.float32))
  lr_list = [float(x) for x in np.atleast_1d(lrs)]
  lrs = np.asarray(lr_list, np.float32)
  if lrs.ndim != 1 or len(lrs) == 0 or np.any(lrs <= 0):
    raise ValueError(f'linear probe: learning rates must be positive, got {lrs.tolist()}')
  if epochs < 1:
    raise ValueError(f'linear probe: epochs must be >= 1, got {epochs}')
  num_classes = int(num_classes or max(int(train_labels.max()), int(test_labels_np.max())) + 1)
  k_init, k_order = jax.random.split(jax.random.PRNGKey(seed))
  heads = init_heads(k_init, len(lrs), test_feats.shape[1], num_classes)
  velocity = jax.tree.map(jnp.zeros_like, heads)
  scaled = lrs * batch_size / 256.0
  top1 = np.zeros((epochs, len(lrs)))
  top5 = np.zeros((epochs, len(lrs)))
  n_test = len(test_labels_np)
  for epoch in range(epochs):
    feats = jnp.asarray(train_feats_fn(epoch), jnp.float32)
    order = epoch_order(jax.random.fold_in(k_order, epoch), feats.shape[0], batch_size)
    lr_now = jnp.asarray(np.array([cosine_lr(lr, epoch, epochs) for lr in scaled], np.float32))
    heads, velocity = train_epoch(heads, velocity, feats, train_labels, order, lr_now,
                                  momentum, weight_decay)
    c1, c5 = head_accuracy(heads, test_feats, jnp.asarray(test_labels_np))
    top1[epoch] = 100.0 * np.asarray(c1) / n_test
    top5[epoch] = 100.0 * np.asarray(c5) / n_test
    if log is not None:
      log(epoch, top1[epoch])
  return {'lrs': lr_list, 'top1': top1, 'top5': top5, 'heads': heads}


def summary(result: dict) -> dict:
  """The best learning rate by last-epoch top-1, with its last and best-epoch accuracies."""
  last = result['top1'][-1]
  i = int(np.argmax(last))
  return {'lr': result['lrs'][i], 'top1': float(last[i]), 'top5': float(result['top5'][-1, i]),
          'best_epoch_top1': float(result['top1'][:, i].max()),
          'best_epoch': int(np.argmax(result['top1'][:, i])) + 1}


# ----------------------------------------------------------------------------- augmented views


def train_view(key, canvas, hw, size: int):
  """The official linear-probe training view: RandomResizedCrop(size, scale=(0.08, 1)),
  bilinear (antialiased, as PIL), then a horizontal flip with p = 0.5; in [0, 1]."""
  k_box, k_flip = jax.random.split(key)
  box = image_ops.crop_box(k_box, hw[0], hw[1], (0.08, 1.0))
  img = image_ops.resized_crop_linear(canvas.astype(jnp.float32) / 255.0, box, size)
  return jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)


def make_augmented_feature_fn(model_def: nnx.GraphDef, *, size: int, dtype, kind: str):
  """jit((params, canvas, hw, keys) -> features of fresh training views)."""
  @jax.jit
  def fn(params, canvas, hw, keys):
    views = jax.vmap(train_view, in_axes=(0, 0, 0, None))(keys, canvas, hw, size)
    model = nnx.merge(model_def, params)
    backbone = model.backbone if hasattr(model, 'backbone') else model
    return features_lib.backbone_features(backbone, image_ops.normalize(views, dtype), kind)
  return fn


def augmented_features(fn, params, source, *, epoch_key, mesh, canvas_size: int,
                       batch_size: int) -> np.ndarray:
  """(N, dim) features of one fresh training view of every image of `source`, in order."""
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  out = []
  for i, batch in enumerate(eval_batches(source, canvas_size=canvas_size,
                                         batch_size=batch_size)):
    keys = jax.random.split(jax.random.fold_in(epoch_key, i), batch_size)
    g = sharding.to_global({'image': batch['image'], 'hw': batch['hw']}, mesh)
    f = np.asarray(fn(params, g['image'], g['hw'], keys))
    out.append(f[batch['mask']])
  return np.concatenate(out)


# python -m dino_jax.evaluate linear

HELP = 'linear probe, lr sweep'
DEFAULT_LRS = (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # official base lr: 0.001


def add_arguments(parser) -> None:
  cli.add_view_arguments(parser)
  parser.add_argument('--kind', choices=features_lib.KINDS[1:], default=None,
                      help='cls4 (ViT-S protocol) or cls_avgpool (ViT-B); default by arch')
  parser.add_argument('--mode', choices=MODES, default='cached')
  parser.add_argument('--lrs', type=float, nargs='+', default=list(DEFAULT_LRS),
                      help='base learning rates at batch 256 (official: 0.001)')
  parser.add_argument('--epochs', type=int, default=100)
  parser.add_argument('--weight_decay', type=float, default=0.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--verbose', action='store_true', help='print every epoch')


def run(args) -> dict:
  backbone, config, what = cli.load(args)
  train, test = cli.labelled(args.source)
  kind = args.kind or ('cls_avgpool' if config.model.arch == 'vit_base' else 'cls4')
  t0 = time.time()
  xte, yte = cli.extract(backbone, config, args, test, kind)
  if args.mode == 'cached':
    xtr, ytr = cli.extract(backbone, config, args, train, kind)
    feats_fn = lambda epoch: xtr
  else:
    ytr = np.array([train[i]['label'] for i in range(len(train))], np.int32)
    size, _, canvas = cli.view_args(args, config)
    graphdef, params = nnx.split(backbone)
    fn = make_augmented_feature_fn(graphdef, size=size, dtype=backbone.dtype, kind=kind)
    mesh = sharding.make_mesh()
    key = jax.random.PRNGKey(args.seed + 1)
    feats_fn = lambda epoch: augmented_features(
        fn, params, train, epoch_key=jax.random.fold_in(key, epoch), mesh=mesh,
        canvas_size=canvas, batch_size=args.batch_size)
  log = (lambda e, top1: print(f'  epoch {e + 1}: top-1 ' +
                               ' '.join(f'{x:.2f}' for x in top1), flush=True)) \
      if args.verbose else None
  res = train_probe(feats_fn, ytr, xte, yte, lrs=args.lrs, epochs=args.epochs,
                    batch_size=args.batch_size, weight_decay=args.weight_decay,
                    seed=args.seed, log=log)
  best = summary(res)
  print(f'linear probe of {what} on {args.source}: {kind} features ({xte.shape[1]}-d), '
        f'{args.mode}, {args.epochs} epochs, batch {args.batch_size}, '
        f'{time.time() - t0:.1f} s')
  for lr, t1, t5, bt in zip(res['lrs'], res['top1'][-1], res['top5'][-1], res['top1'].max(0)):
    print(f'  lr {lr:8.5f}: top-1 {t1:6.2f}%  top-5 {t5:6.2f}%  (best epoch {bt:6.2f}%)')
  print(f'  best lr {best["lr"]}: top-1 {best["top1"]:.2f}% (last epoch), '
        f'{best["best_epoch_top1"]:.2f}% at its best epoch {best["best_epoch"]}')
  return best
