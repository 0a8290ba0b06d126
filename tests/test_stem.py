"""Patch embeddings (models/stem.py): the official patch conv, the 'conv' and 'shifted' stems.

The 'conv' stem is checked against its definition written here with lax convolutions:
log2(p) stages of [3x3 conv stride 2 pad 1, LayerNorm over channels, exact GELU], then a 1x1
conv to the width.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import models, validate
from dino_jax.models import stem as stem_lib
from dino_jax.models import vit as vit_lib


def tiny(**kw):
  kw = {'width': 32, 'depth': 2, 'heads': 2, 'patch_size': 8, 'img_size': 32, **kw}
  return vit_lib.ViT(vit_lib.ViTConfig(**kw), rngs=nnx.Rngs(0))


def reference_conv_stem(params: dict, x: np.ndarray, n_stages: int) -> np.ndarray:
  def conv(x, kernel, bias, stride, pad):
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST)
    return np.asarray(y) + bias

  for i in range(n_stages):
    c, n = params['convs'][i], params['norms'][i]
    x = conv(x, c['kernel'], c['bias'], 2, ((1, 1), (1, 1)))
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mu) / np.sqrt(var + 1e-6) * n['scale'] + n['bias']
    x = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  return conv(x, params['proj']['kernel'], params['proj']['bias'], 1, 'VALID')


def test_conv_widths_double_up_to_the_width():
  assert stem_lib.conv_widths(96, 8) == (24, 48, 96)
  assert stem_lib.conv_widths(384, 16) == (48, 96, 192, 384)
  assert stem_lib.conv_widths(32, 4) == (16, 32)
  with pytest.raises(ValueError, match="stem 'conv' needs a power-of-two patch size, got 14"):
    stem_lib.conv_widths(96, 14)


def test_conv_stem_matches_its_definition():
  model = stem_lib.ConvStem(32, 8, dtype=jnp.float32, rngs=nnx.Rngs(3))
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  x = np.random.default_rng(0).normal(size=(2, 32, 24, 3)).astype(np.float32)
  got = np.asarray(model(jnp.asarray(x)))
  assert got.shape == (2, 4, 3, 32)
  np.testing.assert_allclose(got, reference_conv_stem(params, x, 3), atol=1e-5, rtol=1e-5)


def test_conv_stem_feeds_the_same_token_grid():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  patch, conv = tiny(), tiny(stem='conv')
  assert conv(x).patches.shape == patch(x).patches.shape == (2, 16, 32)
  assert conv(x[:, :16, :16]).patches.shape == (2, 4, 32)
  assert 'kernel' in nnx.state(patch.patch_embed, nnx.Param).to_pure_dict()
  assert set(nnx.state(conv.patch_embed, nnx.Param).to_pure_dict()) == {'convs', 'norms', 'proj'}
  # packed multi-crop pass == per-size passes, as for the patch stem
  crops = [x, x[:, :16, :16]]
  for packed, single in zip(conv.packed(crops), [conv(c) for c in crops]):
    np.testing.assert_allclose(packed.cls, single.cls, atol=1e-5)


def test_bad_stem_is_one_line(config):
  with pytest.raises(ValueError, match="unknown stem 'resnet'"):
    vit_lib.ViTConfig(width=32, depth=1, heads=2, patch_size=4, stem='resnet')
  config.model.stem = 'resnet'
  with pytest.raises(validate.ConfigError, match=r"config.model.stem: 'resnet' is not one of"):
    validate.validate(config)
  config.model.stem = 'conv'
  config.model.patch_size = 14
  config.crops.global_size, config.crops.local_size = 28, 14
  config.data.canvas_size = 28
  with pytest.raises(validate.ConfigError, match=r"config.model.stem: 'conv' needs a power-of-two"):
    validate.validate(config)


def test_build_passes_the_stem(config):
  config.model.stem = 'conv'
  validate.validate(config)
  assert isinstance(models.build(config).backbone.patch_embed, stem_lib.ConvStem)


def reference_shifted_stem(params: dict, x: np.ndarray, p: int) -> np.ndarray:
  """Shifted patch tokenization written pixel by pixel: token (r, c) holds, for every pixel
  (i, j) of its patch, the 3 channels of x at (i, j) and at (i + dy, j + dx) for the four
  half-patch diagonal shifts (zero outside the image); LayerNorm over the vector, then linear."""
  b, h, w, ch = x.shape
  s = p // 2
  offsets = ((0, 0), (-s, -s), (-s, s), (s, -s), (s, s))
  out = np.zeros((b, h // p, w // p, p * p * 5 * ch))
  for n in range(b):
    for r in range(h // p):
      for c in range(w // p):
        vec = []
        for i in range(r * p, r * p + p):
          for j in range(c * p, c * p + p):
            for dy, dx in offsets:
              inside = 0 <= i + dy < h and 0 <= j + dx < w
              vec.extend(x[n, i + dy, j + dx] if inside else np.zeros(ch))
        out[n, r, c] = vec
  mu, var = out.mean(-1, keepdims=True), out.var(-1, keepdims=True)
  out = (out - mu) / np.sqrt(var + 1e-6) * params['norm']['scale'] + params['norm']['bias']
  return out @ params['proj']['kernel'] + params['proj']['bias']


def test_shifted_stem_matches_its_definition():
  model = stem_lib.ShiftedPatchStem(32, 4, dtype=jnp.float32, rngs=nnx.Rngs(5))
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (2, 16, 12, 3)))
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  got = np.asarray(model(jnp.asarray(x)))
  assert got.shape == (2, 4, 3, 32)
  np.testing.assert_allclose(got, reference_shifted_stem(params, x, 4), atol=1e-4, rtol=1e-4)


def test_shifted_stem_feeds_the_same_token_grid(config):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  patch, shifted = tiny(), tiny(stem='shifted')
  assert shifted(x).patches.shape == patch(x).patches.shape == (2, 16, 32)
  crops = [x, x[:, :16, :16]]
  for packed, single in zip(shifted.packed(crops), [shifted(c) for c in crops]):
    np.testing.assert_allclose(packed.cls, single.cls, atol=1e-5)
  config.model.stem = 'shifted'
  validate.validate(config)
  assert isinstance(models.build(config).backbone.patch_embed, stem_lib.ShiftedPatchStem)
