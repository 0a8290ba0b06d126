"""Attention maps: the threshold keeps the stated mass, maps at any resolution, PNGs, TB."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import attention_log
from dino_jax.evaluators import attention
from dino_jax.models.vit import ViT, ViTConfig


def test_threshold_keeps_exactly_the_stated_mass():
  a = np.array([0.1, 0.4, 0.1, 0.2, 0.05, 0.15]).reshape(1, 2, 3)
  for mass, kept in ((0.6, {1, 3}), (0.4, {1}), (0.75, {1, 3, 5}), (0.85, {1, 3, 5, 0})):
    m = attention.threshold_masks(a * 7.0, mass)  # unnormalised maps too
    assert set(np.flatnonzero(m)) == kept  # ties (0 and 2) go to the first position
    assert attention.kept_mass(a, m)[0] == pytest.approx(mass, abs=1e-12)
  assert attention.threshold_masks(a, 1.0).all()


def test_threshold_is_the_smallest_set_of_top_patches():
  rng = np.random.default_rng(0)
  a = rng.dirichlet(np.ones(49) * 0.3, size=(5, 6)).reshape(5, 6, 7, 7)
  m = attention.threshold_masks(a, 0.6)
  mass = attention.kept_mass(a, m)
  assert np.all(mass >= 0.6 - 1e-6)
  flat_a, flat_m = a.reshape(30, 49), m.reshape(30, 49)
  for row, keep in zip(flat_a, flat_m):
    assert row[keep].min() >= row[~keep].max()  # the kept patches are the top ones
    assert row[keep].sum() - row[keep].min() < 0.6  # and dropping any one falls short


def test_bad_threshold_and_negative_maps_are_clear_errors():
  with pytest.raises(ValueError, match=r'mass=1.5 is not in \(0, 1\]'):
    attention.threshold_masks(np.ones((2, 2)), 1.5)
  with pytest.raises(ValueError, match='must be non-negative'):
    attention.threshold_masks(-np.ones((2, 2)), 0.6)


@pytest.fixture(scope='module')
def vit():
  return ViT(ViTConfig(width=24, depth=2, heads=3, patch_size=4, img_size=16), rngs=nnx.Rngs(0))


@pytest.mark.parametrize('h,w', [(16, 16), (24, 40)])
def test_cls_attention_per_head_at_any_resolution(vit, h, w):
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, h, w, 3)), jnp.float32)
  maps = np.asarray(attention.attention_maps(vit, images))
  assert maps.shape == (2, 3, h // 4, w // 4)
  full = np.asarray(vit(images, return_attention=True).attention)
  np.testing.assert_allclose(maps.reshape(2, 3, -1), full[:, :, 0, 1:], atol=1e-7)
  np.testing.assert_allclose(maps.sum((2, 3)) + full[:, :, 0, 0], 1.0, atol=1e-5)


def test_panels_and_pngs(tmp_path, vit):
  img = np.random.default_rng(2).integers(0, 256, (30, 21, 3), np.uint8)
  x = attention.prepare(img, (18, 23), 4)
  assert x.shape == (16, 20, 3)  # cropped to a multiple of the patch size
  maps = np.asarray(attention.attention_maps(vit, attention.to_model_input(x[None])))[0]
  pics = attention.panels(x, maps, 0.6, 4)
  assert pics['head0'].shape == (16, 20, 3) and pics['overlay'].shape == (16, 20, 3)
  assert pics['grid'].shape == (16, 5 * 20 + 4 * 2, 3)
  paths = attention.write_pngs(str(tmp_path), 'x', pics)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  assert np.array_equal(np.asarray(Image.open(tmp_path / 'x-image.png')), x)
  assert len(paths) == 1 + 2 * 3 + 2


def test_tensorboard_logging(vit):
  graphdef, params = nnx.split(vit)
  fn = attention.make_attention_fn(graphdef, size=16, crop_fraction=1.0, dtype=jnp.float32)
  canvas = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), np.uint8)
  hw = np.array([[16, 16], [12, 16]], np.int32)

  class FakeTB:
    images = []
    def add_image(self, tag, img, step, dataformats):
      self.images.append((tag, img.shape, step, dataformats))
    def flush(self):
      pass

  tb = FakeTB()
  grid = attention_log.log_to_tensorboard(tb, fn, params, canvas, hw, 7, mass=0.6, patch=4)
  assert tb.images == [('attention/teacher', grid.shape, 7, 'HWC')]
  assert grid.dtype == np.uint8 and grid.shape[0] == 2 * 16 * 6 + 2
  assert attention_log.log_to_tensorboard(None, fn, params, canvas, hw, 7, mass=0.6, patch=4) is None
