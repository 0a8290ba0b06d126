"""The image ops shared by augmentation and evaluation (image_ops.py): definitions against
PIL / colorsys / torchvision, the crop law, resampling, normalisation, and that the evaluators
never import the augmentation."""
import ast
import colorsys
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from conftest import REPO, shared_data
from dino_jax import image_ops


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
    assert mae255(image_ops.adjust_brightness(to_float(img), f),
                  ImageEnhance.Brightness(pil).enhance(f)) < 0.6
    assert mae255(image_ops.adjust_saturation(to_float(img), f),
                  ImageEnhance.Color(pil).enhance(f)) < 0.6
    # torchvision's PIL contrast blends with the mean of the grayscale image
    assert mae255(image_ops.adjust_contrast(to_float(img), f),
                  ImageEnhance.Contrast(pil).enhance(f)) < 1.0


@pytest.mark.parametrize('shift', [-0.1, 0.03, 0.5])
def test_hue_rotation_matches_colorsys(shift):
  img = real_images(2)[1].astype(np.float64) / 255
  want = np.array([[colorsys.hsv_to_rgb(*(((h + shift) % 1.0, s, v)))
                    for h, s, v in (colorsys.rgb_to_hsv(*px) for px in row)] for row in img])
  got = np.asarray(image_ops.adjust_hue(jnp.asarray(img, jnp.float32), shift))
  assert np.abs(got - want).max() < 1e-4


def test_grayscale_and_solarize_match_pil():
  img = real_images(1)[0]
  pil = Image.fromarray(img)
  gray = np.asarray(pil.convert('L'))
  assert mae255(image_ops.grayscale(to_float(img))[..., 0], gray) < 0.6
  assert mae255(image_ops.solarize(to_float(img)), ImageOps.solarize(pil, 128)) < 1e-3


def test_crop_boxes_follow_torchvision_law():
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  boxes = np.asarray(jax.vmap(lambda k: image_ops.crop_box(k, 200, 300, (0.08, 1.0)))(keys))
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 200).all() and \
      (left + w <= 300).all()
  area = h * w / (200 * 300)
  ratio = w / h
  assert area.min() >= 0.075 and area.max() <= 1.0
  assert ratio.min() > 0.74 and ratio.max() < 1.35  # (distribution: the KS test below)


def test_fallback_is_center_crop_with_clamped_aspect():
  box = np.asarray(image_ops.crop_box(jax.random.PRNGKey(0), 10, 100, (1.0, 1.0)))
  np.testing.assert_array_equal(box, [0, 43, 10, 13])  # w = round(10 * 4/3), centred


def test_resized_crop_matches_pil_bicubic():
  """Crop + bicubic resize against PIL's resize(box=...) (antialiased when shrinking)."""
  for img in real_images(3):
    big = np.asarray(Image.fromarray(img).resize((96, 96), Image.BICUBIC))
    for box, size in (((10, 20, 60, 50), 32), ((0, 0, 96, 96), 48), ((30, 5, 24, 40), 64)):
      top, left, h, w = box
      want = np.asarray(Image.fromarray(big).resize((size, size), Image.BICUBIC,
                                                    box=(left, top, left + w, top + h)))
      got = jnp.clip(image_ops.resized_crop(to_float(big), jnp.array(box), size), 0, 1)
      # differences: PIL clamps taps to the crop box, we read the real pixels beyond it
      assert mae255(got, want) < 3.0, (box, size, mae255(got, want))


@pytest.mark.parametrize('sigma', [0.5, 1.0, 2.0])
def test_gaussian_blur_matches_pil(sigma):
  """PIL's GaussianBlur approximates a Gaussian with box blurs; ours is exact and separable."""
  for img in real_images(2):
    want = Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma))
    got = image_ops.gaussian_blur(to_float(img), sigma, 2.0)
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
  ours = np.asarray(jax.vmap(lambda k: image_ops.crop_box(k, h, w, scale))(keys))[:, 2:]
  ref = torchvision_crop_law(np.random.default_rng(0), h, w, scale, n)
  wrong = torchvision_crop_law(np.random.default_rng(1), h, w, (0.3, 1.0), n)  # a wrong law
  stat = lambda x: (x[:, 0] * x[:, 1], np.log(x[:, 1] / x[:, 0]))
  threshold = 1.95 * np.sqrt(2 / n)  # KS critical value at alpha ~ 0.001
  for ours_s, ref_s in zip(stat(ours), stat(ref)):
    assert ks_statistic(ours_s, ref_s) < threshold
  assert ks_statistic(stat(wrong)[0], stat(ref)[0]) > threshold


def test_resize_matrices_match_jax_scale_and_translate():
  """Inside the image our bicubic matrices equal jax.image's Keys-cubic antialiased resize."""
  img = to_float(real_images(1)[0])
  for box, size in (((3, 5, 20, 24), 16), ((0, 0, 32, 32), 48), ((8, 2, 12, 9), 24)):
    b = jnp.array(box, jnp.float32)
    scale = jnp.stack([size / b[2], size / b[3]])
    want = jax.image.scale_and_translate(img, (size, size, 3), (0, 1), scale, -b[:2] * scale,
                                         method='cubic', antialias=True)
    got = image_ops.resized_crop(img, jnp.array(box), size)
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
  a = image_ops.resized_crop(canvas, box, 24, valid=hw)
  np.testing.assert_allclose(image_ops.resized_crop(noisy, box, 24, valid=hw), a, atol=1e-4)
  np.testing.assert_allclose(image_ops.resized_crop(img, box, 24), a, atol=1e-4)
  np.testing.assert_allclose(image_ops.resized_crop(canvas, box, 24, valid=hw, flip=True),
                             a[:, ::-1], atol=1e-4)


def test_denormalize_inverts_normalize():
  img = to_float(real_images(1)[0])
  np.testing.assert_allclose(image_ops.denormalize(image_ops.normalize(img)), img, atol=1e-6)


def test_resized_crop_linear_is_jax_bilinear_clipped():
  img = to_float(real_images(1)[0])
  box = jnp.array([3, 5, 20, 24])
  scale = jnp.stack([16 / 20, 16 / 24])
  want = jax.image.scale_and_translate(img, (16, 16, 3), (0, 1), scale,
                                       -jnp.array([3.0, 5.0]) * scale, method='linear',
                                       antialias=True)
  np.testing.assert_allclose(image_ops.resized_crop_linear(img, box, 16), jnp.clip(want, 0, 1),
                             atol=1e-6)


def test_evaluation_code_does_not_import_the_augmentation():
  """Evaluators and inference share image_ops with the train step, never augment.py."""
  files = [*sorted((REPO / 'dino_jax' / 'evaluators').glob('*.py')),
           REPO / 'dino_jax' / 'evaluate.py', REPO / 'dino_jax' / 'inference.py']
  for path in files:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names}
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert 'augment' not in names and 'dino_jax.augment' not in names | modules, path
