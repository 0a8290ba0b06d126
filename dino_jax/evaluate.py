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
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax import checkpointing, data, evaluators, models, paths, sharding, weights
from dino_jax.errors import DinoJaxError
from dino_jax.evaluators import attention as attention_lib
from dino_jax.evaluators import features as features_lib
from dino_jax.evaluators import knn as knn_lib
from dino_jax.evaluators import linear as linear_lib
from dino_jax.evaluators import video as video_lib

DEFAULT_LRS = (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # official base lr: 0.001


def load(args):
  """(ViT backbone, config, description) as the common flags say."""
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


def _labelled(source: str):
  train, test = data.load(source)
  if test is None or not (train.has_labels and test.has_labels):
    raise SystemExit(f'error: {source} needs labelled train and test splits')
  return train, test


def _view_args(args, config):
  size = args.size or config.crops.global_size
  frac = args.crop_fraction or config.crops.eval_crop_fraction
  canvas = args.canvas_size or max(config.data.canvas_size, size)
  return size, frac, canvas


def _extract(backbone, config, args, source, kind, limit=0):
  size, frac, canvas = _view_args(args, config)
  mesh = sharding.make_mesh()
  graphdef, params = nnx.split(backbone)
  fn = features_lib.make_feature_fn(graphdef, size=size, crop_fraction=frac,
                                    dtype=backbone.dtype, kind=kind)
  return features_lib.extract(fn, params, source, mesh=mesh, canvas_size=canvas,
                              batch_size=args.batch_size, limit=limit)


def cmd_knn(args):
  backbone, config, what = load(args)
  train, test = _labelled(args.source)
  t0 = time.time()
  xtr, ytr = _extract(backbone, config, args, train, 'cls', args.max_train)
  xte, yte = _extract(backbone, config, args, test, 'cls')
  res = knn_lib.knn_classify_ks(xtr, ytr, xte, yte, ks=args.k, temperature=args.temperature)
  print(f'k-NN of {what} on {args.source}: {len(xtr)} train / {len(xte)} test, '
        f'T={args.temperature}, {time.time() - t0:.1f} s')
  for k, r in res.items():
    print(f'  {k:4d}-NN  top-1 {r["top1"]:6.2f}%  top-5 {r["top5"]:6.2f}%')
  return {str(k): v for k, v in res.items()}


def cmd_linear(args):
  backbone, config, what = load(args)
  train, test = _labelled(args.source)
  kind = args.kind or ('cls_avgpool' if config.model.arch == 'vit_base' else 'cls4')
  t0 = time.time()
  xte, yte = _extract(backbone, config, args, test, kind)
  if args.mode == 'cached':
    xtr, ytr = _extract(backbone, config, args, train, kind)
    feats_fn = lambda epoch: xtr
  else:
    ytr = np.array([train[i]['label'] for i in range(len(train))], np.int32)
    size, _, canvas = _view_args(args, config)
    graphdef, params = nnx.split(backbone)
    fn = linear_lib.make_augmented_feature_fn(graphdef, size=size, dtype=backbone.dtype,
                                              kind=kind)
    mesh = sharding.make_mesh()
    key = jax.random.PRNGKey(args.seed + 1)
    feats_fn = lambda epoch: linear_lib.augmented_features(
        fn, params, train, epoch_key=jax.random.fold_in(key, epoch), mesh=mesh,
        canvas_size=canvas, batch_size=args.batch_size)
  log = (lambda e, top1: print(f'  epoch {e + 1}: top-1 ' +
                               ' '.join(f'{x:.2f}' for x in top1), flush=True)) \
      if args.verbose else None
  res = linear_lib.train_probe(feats_fn, ytr, xte, yte, lrs=args.lrs, epochs=args.epochs,
                               batch_size=args.batch_size, weight_decay=args.weight_decay,
                               seed=args.seed, log=log)
  best = linear_lib.summary(res)
  print(f'linear probe of {what} on {args.source}: {kind} features ({xte.shape[1]}-d), '
        f'{args.mode}, {args.epochs} epochs, batch {args.batch_size}, '
        f'{time.time() - t0:.1f} s')
  for lr, t1, t5, bt in zip(res['lrs'], res['top1'][-1], res['top5'][-1], res['top1'].max(0)):
    print(f'  lr {lr:8.5f}: top-1 {t1:6.2f}%  top-5 {t5:6.2f}%  (best epoch {bt:6.2f}%)')
  print(f'  best lr {best["lr"]}: top-1 {best["top1"]:.2f}% (last epoch), '
        f'{best["best_epoch_top1"]:.2f}% at its best epoch {best["best_epoch"]}')
  return best


def cmd_attention(args):
  backbone, _, what = load(args)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  images = [(os.path.splitext(os.path.basename(p))[0], np.asarray(Image.open(p).convert('RGB')))
            for p in args.images]
  if args.source:
    train, test = data.load(args.source)
    src = test if test is not None else train
    images += [(f'{args.source.split(":")[-1].split("/")[-1].split(".")[0]}-{i}',
                src[i]['image']) for i in args.index]
  if not images:
    raise SystemExit('error: give --images and/or --source with --index')
  p = backbone.cfg.patch_size
  graphdef, params = nnx.split(backbone)
  fn = jax.jit(lambda prm, x: attention_lib.attention_maps(nnx.merge(graphdef, prm), x))
  written = []
  for name, img in images:
    x = attention_lib.prepare(img, tuple(args.image_size), p)
    attn = np.asarray(fn(params, attention_lib.to_model_input(x[None], backbone.dtype)))[0]
    pics = attention_lib.panels(x, attn, args.threshold, p)
    if args.scale > 1:
      pics = {k: attention_lib.upsample(v, args.scale) for k, v in pics.items()}
    written += attention_lib.write_pngs(args.out, name, pics)
    mass = attention_lib.kept_mass(attn, attention_lib.threshold_masks(attn, args.threshold))
    print(f'{name}: {attn.shape[0]} heads on a {attn.shape[1]}x{attn.shape[2]} patch grid; '
          f'masks keep {", ".join(f"{m:.3f}" for m in mass)} of the attention, '
          f'{", ".join(str(int(n)) for n in attention_lib.threshold_masks(attn, args.threshold).sum((1, 2)))} patches')
  print(f'attention maps of {what}: wrote {len(written)} PNGs to {args.out}')
  return {'pngs': written}


def cmd_video(args):
  backbone, _, what = load(args)
  p = backbone.cfg.patch_size
  seqs = args.sequences or video_lib.list_sequences(args.davis, args.resolution)

  graphdef, params = nnx.split(backbone)

  @jax.jit
  def feature_params(prm, x):
    out = nnx.merge(graphdef, prm)(x[None])
    f = out.patches[0].astype(jnp.float32)
    return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  feature = lambda x: feature_params(params, jnp.asarray(x, backbone.dtype))

  per_seq, copy_first = {}, {}
  t0 = time.time()
  for seq in seqs:
    frame_paths, annot_paths = video_lib.list_sequence(args.davis, seq, args.resolution)
    first, palette = video_lib.read_mask(annot_paths[0])
    h, w = first.shape
    size = video_lib.frame_size(h, w, args.short_side)
    frames = [video_lib.load_frame(f, size) for f in frame_paths]
    preds = video_lib.segment_sequence(frames, first, feature, p, (h, w), n_last=args.n_last,
                                       radius=args.neighborhood, topk=args.topk,
                                       temperature=args.temperature)
    gts = [video_lib.read_mask(a)[0] if a else None for a in annot_paths]
    per_seq[seq] = video_lib.score_sequence(preds, gts)
    copy_first[seq] = video_lib.score_sequence([first] * len(gts), gts)
    s = video_lib.summarize({seq: per_seq[seq]})
    print(f'  {seq}: {len(frames)} frames at {size[0]}x{size[1]} '
          f'({size[0] // p}x{size[1] // p} patches): J {s["J"]:.3f} F {s["F"]:.3f} '
          f'J&F {s["J&F"]:.3f}', flush=True)
    if args.out:
      for path, m in zip(frame_paths, preds):
        stem = os.path.splitext(os.path.basename(path))[0]
        video_lib.save_mask(os.path.join(args.out, seq, stem + '.png'), m, palette)
  res = video_lib.summarize(per_seq)
  base = video_lib.summarize(copy_first)
  print(f'DAVIS label propagation of {what} on {args.davis} ({len(seqs)} sequences, '
        f'{time.time() - t0:.1f} s): J {res["J"]:.3f} F {res["F"]:.3f} J&F {res["J&F"]:.3f}')
  print(f'  reference, the first mask copied to every frame: J {base["J"]:.3f} '
        f'F {base["F"]:.3f} J&F {base["J&F"]:.3f}')
  return {**res, 'copy_first': base, 'sequences': per_seq}


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog='python -m dino_jax.evaluate', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest='command', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--model', required=True,
                      help='workdir, WORKDIR/checkpoints/<step> or an exported .msgpack file')
  common.add_argument('--which', default='teacher', choices=('teacher', 'student'))
  common.add_argument('--step', type=int, default=None, help='checkpoint step (default newest)')
  common.add_argument('--init', action='store_true',
                      help="the network at initialisation (the config's seed), not trained")
  common.add_argument('--dtype', default=None, help="compute dtype (default: the run's)")
  common.add_argument('--json', default=None, help='also write the results to this file')
  view = argparse.ArgumentParser(add_help=False)
  view.add_argument('--source', required=True, help='a config.data.source string')
  view.add_argument('--size', type=int, default=0, help='eval crop size (default: the '
                    "model's global crop size)")
  view.add_argument('--crop_fraction', type=float, default=0,
                    help="centre-crop fraction (default: the model's; 0.875 = 256 -> 224)")
  view.add_argument('--canvas_size', type=int, default=0)
  view.add_argument('--batch_size', type=int, default=256)

  k = sub.add_parser('knn', parents=[common, view], help='weighted k-NN (DINO protocol)')
  k.add_argument('--k', type=int, nargs='+', default=list(knn_lib.OFFICIAL_KS))
  k.add_argument('--temperature', type=float, default=0.07)
  k.add_argument('--max_train', type=int, default=0, help='use this many train images (0: all)')

  lin = sub.add_parser('linear', parents=[common, view], help='linear probe, lr sweep')
  lin.add_argument('--kind', choices=features_lib.KINDS[1:], default=None,
                   help='cls4 (ViT-S protocol) or cls_avgpool (ViT-B); default by arch')
  lin.add_argument('--mode', choices=linear_lib.MODES, default='cached')
  lin.add_argument('--lrs', type=float, nargs='+', default=list(DEFAULT_LRS),
                   help='base learning rates at batch 256 (official: 0.001)')
  lin.add_argument('--epochs', type=int, default=100)
  lin.add_argument('--weight_decay', type=float, default=0.0)
  lin.add_argument('--seed', type=int, default=0)
  lin.add_argument('--verbose', action='store_true', help='print every epoch')

  att = sub.add_parser('attention', parents=[common], help='attention-map PNGs')
  att.add_argument('--images', nargs='*', default=[], help='image files')
  att.add_argument('--source', default=None, help='also draw images from this data source')
  att.add_argument('--index', type=int, nargs='*', default=[0], help='indices into --source')
  att.add_argument('--image_size', type=int, nargs=2, default=[480, 480],
                   metavar=('H', 'W'), help='resize to H x W (official 480 x 480)')
  att.add_argument('--threshold', type=float, default=0.6, help='attention mass kept')
  att.add_argument('--scale', type=int, default=1, help='enlarge the PNGs (nearest)')
  att.add_argument('--out', required=True, help='output folder')

  vid = sub.add_parser('video', parents=[common], help='DAVIS label propagation, J and F')
  vid.add_argument('--davis', required=True, help='DAVIS root (JPEGImages/, Annotations/)')
  vid.add_argument('--sequences', nargs='*', default=None)
  vid.add_argument('--resolution', default='480p')
  vid.add_argument('--short_side', type=int, default=480)
  vid.add_argument('--n_last', type=int, default=video_lib.N_LAST_FRAMES)
  vid.add_argument('--neighborhood', type=int, default=video_lib.NEIGHBORHOOD)
  vid.add_argument('--topk', type=int, default=video_lib.TOPK)
  vid.add_argument('--temperature', type=float, default=video_lib.TEMPERATURE)
  vid.add_argument('--out', default=None, help='write the predicted masks here')
  return ap


# One command per registered evaluator (evaluators.EVALUATORS), found by name: cmd_<name>
COMMANDS = {name: globals()[f'cmd_{name}'] for name in evaluators.names()}


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
