"""Linear probe: separable features, torch-equivalent SGD and schedule, feature kinds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax.evaluators import features, linear
from dino_jax.models.vit import ViT, ViTConfig


def separable(n_per, rng, centers):
  x = np.repeat(centers, n_per, 0) + 0.3 * rng.normal(size=(n_per * len(centers),
                                                              centers.shape[1]))
  return x.astype(np.float32), np.repeat(np.arange(len(centers)), n_per)


def test_probe_on_separable_features_reaches_100():
  rng = np.random.default_rng(0)
  centers = 3.0 * rng.normal(size=(4, 16))
  xtr, ytr = separable(50, rng, centers)
  xte, yte = separable(20, rng, centers)
  res = linear.train_probe(lambda e: xtr, ytr, xte, yte, lrs=[1e-4, 0.1], epochs=20,
                           batch_size=32)
  assert res['top1'].shape == (20, 2)
  best = linear.summary(res)
  assert best['lr'] == 0.1 and best['top1'] == 100.0 and best['top5'] == 100.0
  assert res['top1'][-1, 0] < 100.0  # a tiny lr has not got there: the heads are independent


def test_cosine_lr_matches_torch_cosine_annealing():
  torch = pytest.importorskip('torch')
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=0.3)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0)
  for epoch in range(7):
    assert linear.cosine_lr(0.3, epoch, 7) == pytest.approx(opt.param_groups[0]['lr'], rel=1e-9)
    opt.step()
    sched.step()


def test_sgd_epoch_matches_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  x = rng.normal(size=(37, 5)).astype(np.float32)
  y = rng.integers(0, 3, 37).astype(np.int32)
  heads = linear.init_heads(jax.random.PRNGKey(0), 1, 5, 3)
  w0, b0 = np.asarray(heads['w'][0]), np.asarray(heads['b'][0])
  vel = jax.tree.map(jnp.zeros_like, heads)
  model = torch.nn.Linear(5, 3)
  with torch.no_grad():
    model.weight.copy_(torch.tensor(w0.T))
    model.bias.copy_(torch.tensor(b0))
  opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
  for epoch in range(2):
    order = linear.epoch_order(jax.random.PRNGKey(epoch), 37, 16)  # last batch partial
    lr = 0.05 * (0.5 if epoch else 1.0)
    for g in opt.param_groups:
      g['lr'] = lr
    heads, vel = linear.train_epoch(heads, vel, jnp.asarray(x), jnp.asarray(y), order,
                                    jnp.array([lr], jnp.float32), 0.9, 1e-3)
    for idx in order:
      idx = idx[idx >= 0]
      opt.zero_grad()
      torch.nn.functional.cross_entropy(model(torch.tensor(x[idx])),
                                        torch.tensor(y[idx]).long()).backward()
      opt.step()
  np.testing.assert_allclose(np.asarray(heads['w'][0]), model.weight.detach().numpy().T,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(heads['b'][0]), model.bias.detach().numpy(), atol=1e-5)


def test_bad_learning_rates_and_epochs_are_clear_errors():
  x, y = np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match='learning rates must be positive'):
    linear.train_probe(lambda e: x, y, x, y, lrs=[0.1, -1.0], epochs=1, batch_size=2)
  with pytest.raises(ValueError, match='epochs must be >= 1'):
    linear.train_probe(lambda e: x, y, x, y, lrs=[0.1], epochs=0, batch_size=2)


@pytest.fixture(scope='module')
def vit():
  return ViT(ViTConfig(width=24, depth=4, heads=2, patch_size=4, img_size=16),
             rngs=nnx.Rngs(0))


def test_feature_kinds_follow_the_official_layouts(vit):
  images = jnp.asarray(np.random.default_rng(2).normal(size=(3, 16, 16, 3)), jnp.float32)
  out = vit(images, n_last=4)
  cls4 = np.asarray(features.backbone_features(vit, images, 'cls4'))
  want = np.concatenate([np.asarray(o[:, 0]) for o in out.intermediates], -1)
  np.testing.assert_allclose(cls4, want, atol=1e-6)
  np.testing.assert_allclose(cls4[:, -24:], np.asarray(out.cls), atol=1e-6)  # last = final CLS
  avg = np.asarray(features.backbone_features(vit, images, 'cls_avgpool'))
  assert avg.shape == (3, 48)
  np.testing.assert_allclose(avg[:, 0::2], np.asarray(out.cls), atol=1e-6)  # interleaved
  np.testing.assert_allclose(avg[:, 1::2], np.asarray(out.patches).mean(1), atol=1e-6)
  cls = np.asarray(features.backbone_features(vit, images, 'cls'))
  np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="feature kind 'patch'"):
    features.backbone_features(vit, images, 'patch')


def test_training_views_are_crops_of_the_valid_region():
  from dino_jax.data import to_canvas  # pylint: disable=import-outside-toplevel
  image = np.random.default_rng(3).integers(60, 200, (16, 12, 3), np.uint8)
  canvas, hw = to_canvas(image, 16)  # as the pipeline makes them: edge-replicated
  views = jax.vmap(linear.train_view, in_axes=(0, None, None, None))(
      jax.random.split(jax.random.PRNGKey(0), 16), jnp.asarray(canvas), jnp.asarray(hw), 8)
  assert views.shape == (16, 8, 8, 3)
  v = np.asarray(views)  # bilinear: convex combinations of the image's own pixels
  assert v.min() >= 60 / 255 - 1e-6 and v.max() <= 199 / 255 + 1e-6
  assert len({float(x) for x in v.mean((1, 2, 3))}) == 16  # a different crop each time
