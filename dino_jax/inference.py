"""Trained models for users: images in, features and attention out; export to one file.

    model, config = dino_jax.load_model('/path/to/workdir')          # dino_jax/weights.py
    images = inference.preprocess([np.asarray(PIL.Image.open(p)) for p in paths], size=224)
    out = model(images, return_attention=True)   # ViTOutput: cls, patches, attention

CLI: python -m dino_jax.inference export --path=WORKDIR --out=teacher.safetensors [--which=student]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import image_ops, paths, weights
from dino_jax.data.pipeline import to_canvas
from dino_jax.data.sources import as_rgb


def preprocess(images, size: int = 224, crop_fraction: float = 0.875,
               dtype=jnp.float32) -> jax.Array:
  """uint8 RGB (or grayscale) images of any sizes -> (B, size, size, 3) normalised arrays: the
  evaluation view (shorter side resized to size / crop_fraction, centre crop), bicubic."""
  canvas_size = max(max(np.shape(im)[:2]) for im in images)
  canvases, hws = zip(*(to_canvas(as_rgb(np.asarray(im)), canvas_size) for im in images))
  return image_ops.center_view(jnp.asarray(np.stack(canvases)), jnp.asarray(np.stack(hws)),
                               size, crop_fraction, dtype)


def cls_attention(output) -> jax.Array:
  """(B, heads, h*w) last-block attention of the CLS token to each patch (registers dropped)
  from a ViTOutput computed with return_attention=True."""
  n_patches = output.patches.shape[1]
  return output.attention[:, :, 0, -n_patches:]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m dino_jax.inference')
  sub = parser.add_subparsers(dest='command', required=True)
  ex = sub.add_parser('export', help='write a checkpoint backbone to one model file (.safetensors)')
  ex.add_argument('--path', required=True, help='workdir or WORKDIR/checkpoints/<step>')
  ex.add_argument('--out', required=True)
  ex.add_argument('--which', default='teacher', choices=('teacher', 'student'))
  ex.add_argument('--step', type=int, default=None)
  args = parser.parse_args(argv)
  out = weights.export(args.path, args.out, which=args.which, step=args.step)
  print(f'wrote {out} ({paths.size(out) / 2**20:.1f} MiB)')


if __name__ == '__main__':
  main()
