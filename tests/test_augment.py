"""On-device multi-crop: crop law, op definitions against PIL, probabilities, determinism."""
import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from conftest import shared_data
from dino_jax import augment


def real_images(n=8):
  """CIFAR images from ../shared/data when present, else scikit-learn's sample photos."""
  try:
    with np.load(shared_data('cifar10_subset.npz')) as f:
      return f['x_test'][:n]
  except pytest.skip.Exception:
    from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
    imgs = load_sample_images().images
    return np.stack([np.asarray(Image.fromarray(imgs[i % 2]).resize((32, 32)))
                     for i in range(n)])


def to_float(x):
  return jnp.asarray(x, jnp.float32) / 255.0


def mae255(a, b):
  return float(np.mean(np.abs(np.asarray(a, np.float64) * 255 - np.asarray(b, np.float64))))


@pytest.mark.parametrize('f', [0.6, 1.0, 1.37])
def test_brightness_contrast_saturation_match_pil(f):
  for img in real_images(4):
    pil = Image.fromarray(img)
    assert mae255(augment.adjust_brightness(to_float(img), f),
                  ImageEnhance.Brightness(pil).enhance(f)) < 0.6
    assert mae255(augment.adjust_saturation(to_float(img), f),
                  ImageEnhance.Color(pil).enhance(f)) < 0.6
    # torchvision's PIL contrast blends with the mean of the grayscale image
    assert mae255(augment.adjust_contrast(to_float(img), f),
                  ImageEnhance.Contrast(pil).enhance(f)) < 1.0


@pytest.mark.parametrize('shift', [-0.1, 0.03, 0.5])
def test_hue_rotation_matches_colorsys(shift):
  img = real_images(2)[1].astype(np.float64) / 255
  want = np.array([[colorsys.hsv_to_rgb(*(((h + shift) % 1.0, s, v)))
                    for h, s, v in (colorsys.rgb_to_hsv(*px) for px in row)] for row in img])
  got = np.asarray(augment.adjust_hue(jnp.asarray(img, jnp.float32), shift))
  assert np.abs(got - want).max() < 1e-4


def test_grayscale_and_solarize_match_pil():
  img = real_images(1)[0]
  pil = Image.fromarray(img)
  gray = np.asarray(pil.convert('L'))
  assert mae255(augment.grayscale(to_float(img))[..., 0], gray) < 0.6
  assert mae255(augment.solarize(to_float(img)), ImageOps.solarize(pil, 128)) < 1e-3


def test_crop_boxes_follow_torchvision_law():
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  boxes = np.asarray(jax.vmap(lambda k: augment.crop_box(k, 200, 300, (0.08, 1.0)))(keys))
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 200).all() and \
      (left + w <= 300).all()
  area = h * w / (200 * 300)
  ratio = w / h
  assert area.min() >= 0.075 and area.max() <= 1.0
  assert ratio.min() > 0.74 and ratio.max() < 1.35
  # log-aspect is uniform in (log 3/4, log 4/3) among accepted draws: mean ~ 0, quartiles even
  lr = np.log(ratio)
  assert abs(np.mean(lr)) < 0.02
  assert abs(np.mean(np.abs(lr) < np.log(4 / 3) / 2) - 0.5) < 0.06


def test_fallback_is_center_crop_with_clamped_aspect():
  box = np.asarray(augment.crop_box(jax.random.PRNGKey(0), 10, 100, (1.0, 1.0)))
  np.testing.assert_array_equal(box, [0, 43, 10, 13])  # w = round(10 * 4/3), centred


def spec_config(**kw):
  g = augment.CropSpec(16, (0.3, 1.0), 1.0, 0.0)
  g2 = augment.CropSpec(16, (0.3, 1.0), 0.1, 0.2)
  l = augment.CropSpec(8, (0.05, 0.3), 0.5, 0.0)
  return augment.AugmentConfig(global_crops=(g, g2), local_crops=(l, l, l), **kw)


def test_multicrop_shapes_determinism_and_variety():
  imgs = np.stack([np.asarray(Image.fromarray(i).resize((24, 24))) for i in real_images(4)])
  hw = np.full((4, 2), 24, np.int32)
  cfg = spec_config()
  g, l = augment.multicrop(jax.random.PRNGKey(0), imgs, hw, cfg)
  assert g.shape == (8, 16, 16, 3) and l.shape == (12, 8, 8, 3) and g.dtype == jnp.float32
  g2, l2 = augment.multicrop(jax.random.PRNGKey(0), imgs, hw, cfg)
  np.testing.assert_array_equal(g, g2)
  np.testing.assert_array_equal(l, l2)
  g3, _ = augment.multicrop(jax.random.PRNGKey(1), imgs, hw, cfg)
  assert not np.allclose(g, g3)
  # same image in every row: different rows (examples) still get different crops
  same = np.repeat(imgs[:1], 4, axis=0)
  gs, _ = augment.multicrop(jax.random.PRNGKey(0), same, hw, cfg)
  assert not np.allclose(gs[0], gs[1])
  bf16, _ = augment.multicrop(jax.random.PRNGKey(0), imgs, hw, cfg, jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16


def test_flip_and_solarize_frequencies():
  """Constant-free check of per-crop probabilities on a left-right gradient image."""
  n = 3000
  ramp = np.tile(np.linspace(0, 120, 16).astype(np.uint8)[None, :, None], (16, 1, 3))
  cfg = augment.AugmentConfig(global_crops=(augment.CropSpec(16, (1.0, 1.0), 0.0, 0.3),),
                              local_crops=(), jitter_p=0.0, grayscale_p=0.0)
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  out = jax.vmap(lambda k: augment.view(k, ramp, jnp.array([16, 16]), cfg.global_crops[0],
                                        cfg))(keys)
  out = np.asarray(out)
  solarized = out.mean(axis=(1, 2, 3)) > 0.5  # ramp is dark; solarized crops are bright
  left_dark = out[:, :, 0].mean(axis=(1, 2)) < out[:, :, -1].mean(axis=(1, 2))
  flipped = left_dark == solarized  # solarize reverses the ramp
  assert abs(solarized.mean() - 0.3) < 0.03
  assert abs(flipped.mean() - 0.5) < 0.03
