"""On-device multi-crop: shapes, determinism, probabilities, the jitter order, grouped crops
equal one view at a time, the official crop presets (the ops themselves: test_image_ops.py)."""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dino_jax import augment, defaults, image_ops
from test_image_ops import real_images, to_float


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
  base = np.clip(np.asarray(image_ops.resized_crop(to_float(img), jnp.array([0, 0, 32, 32]),
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
  for name, fields in defaults.CROP_PRESETS.items():
    config.crops.update(fields)
    validate(config)
    cfg = augment.AugmentConfig.from_config(config)
    assert cfg.global_crops[1].blur_p == fields['global2_blur_p'], name
  assert defaults.CROP_PRESETS['dinov2']['global1_blur_p'] == 0.0  # the effective probability


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
    ops = [image_ops.adjust_brightness, image_ops.adjust_contrast, image_ops.adjust_saturation,
           image_ops.adjust_hue]
    want = img
    for op_id in np.asarray(jax.random.permutation(kp, 4)):
      want = ops[op_id](want, f[op_id])
    np.testing.assert_allclose(augment.color_jitter(key, img, cfg), want, atol=1e-5)


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
        want = image_ops.normalize(augment.view(keys[b], imgs[b], hw[b], spec, cfg))
        np.testing.assert_allclose(out[c * 3 + b], want, atol=1e-4)


def test_crop_grid_draws_one_row_per_image():
  from dino_jax import crop_grid  # pylint: disable=import-outside-toplevel
  imgs = real_images(2)
  grid = crop_grid.crop_grid(imgs, np.array([[32, 32], [30, 20]]), spec_config(), cell=8)
  assert grid.shape == (2 * 8, (1 + 2 + 3) * 8, 3) and grid.dtype == np.uint8
