"""On-device multi-crop: crop law, op definitions against PIL, probabilities, determinism."""
import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

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
  assert ratio.min() > 0.74 and ratio.max() < 1.35  # (distribution: the KS test below)


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
  ramp = np.tile(np.linspace(135, 255, 16).astype(np.uint8)[None, :, None], (16, 1, 3))
  cfg = augment.AugmentConfig(global_crops=(augment.CropSpec(16, (1.0, 1.0), 0.0, 0.3),),
                              local_crops=(), jitter_p=0.0, grayscale_p=0.0)
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  out = jax.vmap(lambda k: augment.view(k, ramp, jnp.array([16, 16]), cfg.global_crops[0],
                                        cfg))(keys)
  out = np.asarray(out)
  solarized = out.mean(axis=(1, 2, 3)) < 0.5  # ramp is bright; solarized crops are dark
  left_dark = out[:, :, 0].mean(axis=(1, 2)) < out[:, :, -1].mean(axis=(1, 2))
  flipped = left_dark == solarized  # solarize reverses the ramp
  assert abs(solarized.mean() - 0.3) < 0.03
  assert abs(flipped.mean() - 0.5) < 0.03


def test_resized_crop_matches_pil_bicubic():
  """Crop + bicubic resize against PIL's resize(box=...) (antialiased when shrinking)."""
  for img in real_images(3):
    big = np.asarray(Image.fromarray(img).resize((96, 96), Image.BICUBIC))
    for box, size in (((10, 20, 60, 50), 32), ((0, 0, 96, 96), 48), ((30, 5, 24, 40), 64)):
      top, left, h, w = box
      want = np.asarray(Image.fromarray(big).resize((size, size), Image.BICUBIC,
                                                    box=(left, top, left + w, top + h)))
      got = jnp.clip(augment.resized_crop(to_float(big), jnp.array(box), size), 0, 1)
      # differences: PIL clamps taps to the crop box, we read the real pixels beyond it
      assert mae255(got, want) < 3.0, (box, size, mae255(got, want))


@pytest.mark.parametrize('sigma', [0.5, 1.0, 2.0])
def test_gaussian_blur_matches_pil(sigma):
  """PIL's GaussianBlur approximates a Gaussian with box blurs; ours is exact and separable."""
  for img in real_images(2):
    want = Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma))
    got = augment.gaussian_blur(to_float(img), sigma, 2.0)
    assert mae255(got, want) < 2.0, mae255(got, want)


def torchvision_crop_law(rng, h, w, scale, n):
  """RandomResizedCrop.get_params written out with Python's random-style draws."""
  out = []
  for _ in range(n):
    for _ in range(10):
      area = h * w * rng.uniform(*scale)
      ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      cw, ch = round(np.sqrt(area * ar)), round(np.sqrt(area / ar))
      if 0 < cw <= w and 0 < ch <= h:
        out.append((ch, cw))
        break
    else:
      out.append((h, min(w, round(h * 4 / 3))))
  return np.array(out, np.float64)


def ks_statistic(a, b):
  grid = np.sort(np.concatenate([a, b]))
  cdf = lambda x: np.searchsorted(np.sort(x), grid, side='right') / len(x)
  return float(np.max(np.abs(cdf(a) - cdf(b))))


def test_crop_size_distribution_matches_torchvision_law():
  """Two-sample KS on crop area and aspect for a wide image where rejections matter."""
  h, w, scale, n = 60, 200, (0.08, 1.0), 3000
  keys = jax.random.split(jax.random.PRNGKey(5), n)
  ours = np.asarray(jax.vmap(lambda k: augment.crop_box(k, h, w, scale))(keys))[:, 2:]
  ref = torchvision_crop_law(np.random.default_rng(0), h, w, scale, n)
  wrong = torchvision_crop_law(np.random.default_rng(1), h, w, (0.3, 1.0), n)  # a wrong law
  stat = lambda x: (x[:, 0] * x[:, 1], np.log(x[:, 1] / x[:, 0]))
  threshold = 1.95 * np.sqrt(2 / n)  # KS critical value at alpha ~ 0.001
  for ours_s, ref_s in zip(stat(ours), stat(ref)):
    assert ks_statistic(ours_s, ref_s) < threshold
  assert ks_statistic(stat(wrong)[0], stat(ref)[0]) > threshold


def test_jitter_grayscale_blur_frequencies():
  """Each stochastic op fires with its configured probability (3000 crops)."""
  n = 3000
  img = real_images(1)[0]
  spec = augment.CropSpec(32, (1.0, 1.0), 0.4, 0.0)
  cfg = augment.AugmentConfig(global_crops=(spec,), local_crops=(), flip_p=0.0, jitter_p=0.8,
                              grayscale_p=0.2, blur_sigma=(0.5, 2.0))
  keys = jax.random.split(jax.random.PRNGKey(3), n)
  out = np.asarray(jax.vmap(lambda k: augment.view(k, img, jnp.array([32, 32]), spec, cfg))(
      keys))
  base = np.clip(np.asarray(augment.resized_crop(to_float(img), jnp.array([0, 0, 32, 32]),
                                                 32)), 0, 1)
  gray = np.ptp(out, axis=-1).max(axis=(1, 2)) < 1e-5
  assert abs(gray.mean() - 0.2) < 0.03
  # untouched <=> no jitter, no grayscale, no blur: P = 0.2 * 0.8 * 0.6
  untouched = np.abs(out - base).max(axis=(1, 2, 3)) < 1e-5
  assert abs(untouched.mean() - 0.096) < 0.02
  # blur: the same keys with blur switched off differ exactly where blur fired
  spec_nb = augment.CropSpec(32, (1.0, 1.0), 0.0, 0.0)
  out_nb = np.asarray(jax.vmap(lambda k: augment.view(k, img, jnp.array([32, 32]), spec_nb,
                                                       cfg))(keys))
  blurred = np.abs(out - out_nb).max(axis=(1, 2, 3)) > 1e-4
  assert abs(blurred.mean() - 0.4) < 0.035


def test_presets_are_valid_config_updates(config):
  from dino_jax.validate import validate  # pylint: disable=import-outside-toplevel
  for name, fields in augment.PRESETS.items():
    config.crops.update(fields)
    validate(config)
    cfg = augment.AugmentConfig.from_config(config)
    assert cfg.global_crops[1].blur_p == fields['global2_blur_p'], name
  assert augment.PRESETS['dinov2']['global1_blur_p'] == 0.0  # the effective probability


def test_jitter_applies_each_op_once_in_the_drawn_order():
  """color_jitter equals the four ops applied one after another in its permutation."""
  img = to_float(real_images(1)[0])
  cfg = spec_config()
  for seed in range(6):
    key = jax.random.PRNGKey(seed)
    kb, kc, ks, kh, kp = jax.random.split(key, 5)
    f = [jax.random.uniform(kb, minval=0.6, maxval=1.4),
         jax.random.uniform(kc, minval=0.6, maxval=1.4),
         jax.random.uniform(ks, minval=0.8, maxval=1.2),
         jax.random.uniform(kh, minval=-0.1, maxval=0.1)]
    ops = [augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation,
           augment.adjust_hue]
    want = img
    for op_id in np.asarray(jax.random.permutation(kp, 4)):
      want = ops[op_id](want, f[op_id])
    np.testing.assert_allclose(augment.color_jitter(key, img, cfg), want, atol=1e-5)


def test_resize_matrices_match_jax_scale_and_translate():
  """Inside the image our bicubic matrices equal jax.image's Keys-cubic antialiased resize."""
  img = to_float(real_images(1)[0])
  for box, size in (((3, 5, 20, 24), 16), ((0, 0, 32, 32), 48), ((8, 2, 12, 9), 24)):
    b = jnp.array(box, jnp.float32)
    scale = jnp.stack([size / b[2], size / b[3]])
    want = jax.image.scale_and_translate(img, (size, size, 3), (0, 1), scale, -b[:2] * scale,
                                         method='cubic', antialias=True)
    got = augment.resized_crop(img, jnp.array(box), size)
    edge = 4  # the two resizers treat taps past the array's border differently
    np.testing.assert_allclose(got[edge:-edge, edge:-edge], want[edge:-edge, edge:-edge],
                               atol=1e-5)


def test_resize_ignores_canvas_padding_and_flips_for_free():
  """Pixels beyond the valid (h, w) never reach a crop, and flip mirrors the columns."""
  img = real_images(1)[0]
  canvas = np.zeros((48, 48, 3), np.uint8)
  canvas[:32, :32] = img
  noisy = canvas.copy()
  noisy[32:], noisy[:, 32:] = 255, 7
  box, hw = jnp.array([10, 12, 22, 20]), jnp.array([32, 32])
  a = augment.resized_crop(canvas, box, 24, valid=hw)
  np.testing.assert_allclose(augment.resized_crop(noisy, box, 24, valid=hw), a, atol=1e-4)
  np.testing.assert_allclose(augment.resized_crop(img, box, 24), a, atol=1e-4)
  np.testing.assert_allclose(augment.resized_crop(canvas, box, 24, valid=hw, flip=True),
                             a[:, ::-1], atol=1e-4)


def test_grouped_multicrop_equals_one_view_at_a_time():
  """multicrop vmaps crops of one size together; each crop is still view() with its own key."""
  imgs, hw = real_images(3), jnp.array([[32, 32], [30, 20], [32, 25]])
  cfg = spec_config()
  g, l = augment.multicrop(jax.random.PRNGKey(5), imgs, hw, cfg)
  k_global, k_local = jax.random.split(jax.random.PRNGKey(5))
  for out, key, specs in ((g, k_global, cfg.global_crops), (l, k_local, cfg.local_crops)):
    for c, spec in enumerate(specs):
      keys = jax.random.split(jax.random.fold_in(key, c), 3)
      for b in range(3):
        want = augment.normalize(augment.view(keys[b], imgs[b], hw[b], spec, cfg))
        np.testing.assert_allclose(out[c * 3 + b], want, atol=1e-4)
