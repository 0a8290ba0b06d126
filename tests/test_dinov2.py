"""DINOv2 recipe: masking law, Sinkhorn-Knopp, KoLeo, iBOT loss, layer-wise lr, clipping,
schedules, configs, and a train step that uses them all."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import REPO, tiny_config
from dino_jax import config_file, losses, masking, models, optim, sharding, train
from dino_jax import state as state_lib
from dino_jax.schedules import Schedules, scaled_lr
from dino_jax.validate import ConfigError, validate

# --------------------------------------------------------------------------- masking


def reference_block_mask(rng, h, w, target, min_block=4, max_fraction=0.5, min_aspect=0.3):
  """DINOv2's block-masking law, transcribed sequentially in numpy from its description."""
  mask = np.zeros((h, w), bool)
  count = 0
  while count < target:
    max_block = min(target - count, max_fraction * h * w)
    added = 0
    for _ in range(10):
      area = min_block + (max_block - min_block) * rng.random()  # Python's uniform(a, b)
      aspect = math.exp(rng.uniform(math.log(min_aspect), -math.log(min_aspect)))
      bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
      if bh < h and bw < w:
        top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        new = bh * bw - mask[top:top + bh, left:left + bw].sum()
        if 0 < new <= max_block:
          mask[top:top + bh, left:left + bw] = True
          added = new
          break
    if added == 0:
      break
    count += added
  return mask


def test_upper_bound_matches_the_reference_values():
  # DINOv2 facts: B=64 per GPU (128 global crops): N=196 -> 3771, N=256 -> 4941
  assert masking.MaskSpec((14, 14)).upper_bound(128) == 3771
  assert masking.MaskSpec((16, 16)).upper_bound(128) == 4941


def test_mask_targets_never_exceed_the_buffer_over_the_grid_batch_table():
  """Float32 ratios near a stratum's upper edge may round to int(N * r) + 1 patches; the cap
  keeps every batch within upper_bound (the buffer of masked-token rows) on 24 grids x 208
  batch sizes, at u = the largest float32 below 1 (the worst case) and at random u. One call
  per grid: the strata of all batch sizes concatenated."""
  top_u = np.nextafter(np.float32(1), np.float32(0))
  rng = np.random.default_rng(0)
  over_without_cap = 0
  fn = jax.jit(masking.capped_targets, static_argnums=4)
  for side in range(1, 25):
    spec = masking.MaskSpec((side, side))
    ns = [n for n in range(1, 209) if spec.n_masked_images(n) > 0]
    edges = [spec.ratio_edges(n).astype(np.float32) for n in ns]
    lo = np.concatenate([e[:-1] for e in edges])
    hi = np.concatenate([e[1:] for e in edges])
    caps = np.concatenate([spec.target_caps(n) for n in ns])
    splits = np.cumsum([spec.n_masked_images(n) for n in ns])[:-1]
    for u in (np.full(lo.shape, top_u, np.float32), rng.random(lo.shape, dtype=np.float32)):
      t = np.asarray(fn(jnp.asarray(u), lo, hi, caps, spec.n_patches))
      assert (t <= caps).all() and (t >= 0).all()
      for n, part in zip(ns, np.split(t, splits)):
        assert part.sum() <= spec.upper_bound(n), (side, n)
    raw = (np.float32(spec.n_patches) * (lo + top_u * (hi - lo))).astype(np.int32)
    over_without_cap += sum(int(part.sum() > spec.upper_bound(n))
                            for n, part in zip(ns, np.split(raw, splits)))
  assert over_without_cap > 0  # the hazard is real: the cap is what holds the bound


def test_batch_masks_law_static_shapes_and_counts():
  spec = masking.MaskSpec((14, 14))
  n = 32
  fn = jax.jit(lambda k: masking.batch_masks(k, n, spec))
  masks = np.stack([np.asarray(fn(jax.random.PRNGKey(i))) for i in range(40)])
  assert masks.shape == (40, n, 196) and masks.dtype == bool
  counts = masks.sum(-1)
  edges = spec.ratio_edges(n)
  # exactly int(n * 0.5) images masked per batch, never more patches than the bound
  assert ((counts > 0).sum(1) == 16).all()
  assert (counts.sum(1) <= spec.upper_bound(n)).all()
  # stratification: the sorted masked counts of a batch fall in their strata
  sorted_counts = np.sort(counts, axis=1)[:, n - 16:]
  hi = np.array([int(196 * r) for r in edges[1:]])
  lo = np.array([int(196 * r) for r in edges[:-1]])
  assert (sorted_counts <= hi).all()
  assert np.mean(sorted_counts >= lo) > 0.9  # targets are nearly always reached
  # which images are masked is random (a permutation): every position gets masked sometimes
  assert (counts > 0).mean(0).min() > 0.1


def test_block_masks_follow_the_reference_law():
  """Masked counts and shapes for fixed targets have the distribution of the numpy law."""
  spec = masking.MaskSpec((14, 14))
  targets = jnp.asarray([20, 50, 90] * 200, jnp.int32)
  keys = jax.random.split(jax.random.PRNGKey(0), targets.shape[0])
  ours = np.asarray(jax.jit(jax.vmap(lambda k, t: masking.block_mask(k, t, spec)))(keys, targets))
  rng = np.random.default_rng(0)
  ref = np.stack([reference_block_mask(rng, 14, 14, int(t)) for t in np.asarray(targets)])
  for t in (20, 50, 90):
    sel = np.asarray(targets) == t
    a, b = ours[sel].sum((1, 2)), ref[sel].sum((1, 2))
    assert (a <= t).all()
    assert abs(a.mean() - b.mean()) < 0.03 * t + 1
    # the number of rows touched measures the block shapes
    ra, rb = ours[sel].any(2).sum(1), ref[sel].any(2).sum(1)
    assert stats.ks_2samp(ra, rb).pvalue > 1e-3, (t, ra.mean(), rb.mean())


def test_gather_masked_indices_and_weights():
  masks = jnp.asarray([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], bool)
  idx, valid, w = masking.gather_masked(masks, 6)
  np.testing.assert_array_equal(np.asarray(idx)[:4], [0, 2, 3, 9])
  np.testing.assert_array_equal(np.asarray(valid), [1, 1, 1, 1, 0, 0])
  np.testing.assert_allclose(np.asarray(w), [1 / 3, 1 / 3, 1 / 3, 1, 0, 0])


# --------------------------------------------------------------------------- losses


def reference_sinkhorn(t, temp, iters=3):
  q = np.exp(t / temp).T  # K x B
  q /= q.sum()
  k, b = q.shape
  for _ in range(iters):
    q /= q.sum(1, keepdims=True)
    q /= k
    q /= q.sum(0, keepdims=True)
    q /= b
  return (q * b).T


def test_sinkhorn_knopp_matches_numpy_and_is_doubly_stochastic():
  rng = np.random.default_rng(0)
  t = rng.normal(size=(64, 32)).astype(np.float32)
  q = np.asarray(losses.sinkhorn_knopp(jnp.asarray(t), 0.1))
  np.testing.assert_allclose(q, reference_sinkhorn(t.astype(np.float64), 0.1), rtol=2e-4,
                             atol=1e-7)
  np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)  # each sample a distribution
  mild = np.asarray(losses.sinkhorn_knopp(jnp.asarray(t), 1.0))
  np.testing.assert_allclose(mild.sum(0), 64 / 32, rtol=0.02)  # prototypes used equally
  more = np.asarray(losses.sinkhorn_knopp(jnp.asarray(t), 0.1, n_iters=200))
  np.testing.assert_allclose(more.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(more.sum(0), 2.0, rtol=1e-3)


def test_sinkhorn_knopp_ignores_padding_rows_and_survives_large_logits():
  rng = np.random.default_rng(1)
  t = rng.normal(size=(10, 16)).astype(np.float32)
  valid = np.arange(10) < 7
  padded = np.asarray(losses.sinkhorn_knopp(jnp.asarray(t), 0.1, valid=jnp.asarray(valid)))
  np.testing.assert_allclose(padded[:7], np.asarray(losses.sinkhorn_knopp(t[:7], 0.1)),
                             rtol=1e-5, atol=1e-7)
  assert not padded[7:].any()
  big = np.asarray(losses.sinkhorn_knopp(jnp.asarray(t * 100), 0.04))
  assert np.isfinite(big).all()


def reference_koleo(x, eps=1e-8):
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
  sim = x @ x.T
  np.fill_diagonal(sim, -1)
  nn = sim.argmax(1)
  d = np.linalg.norm(x - x[nn] + eps, axis=1)
  return -np.mean(np.log(d + eps))


def test_koleo_against_numpy_and_known_point_sets():
  x = np.random.default_rng(0).normal(size=(20, 8))
  np.testing.assert_allclose(float(losses.koleo(jnp.asarray(x))), reference_koleo(x),
                             rtol=1e-5)
  for n in (4, 6, 12):  # n points evenly spread on a circle: nn distance 2 sin(pi / n)
    a = 2 * np.pi * np.arange(n) / n
    pts = np.stack([np.cos(a), np.sin(a)], 1) * 3.0  # scale is normalised away
    np.testing.assert_allclose(float(losses.koleo(jnp.asarray(pts))),
                               -math.log(2 * math.sin(math.pi / n)), atol=1e-5)
  # spreading points apart lowers the loss
  clustered = np.ones((8, 4)) + 0.01 * np.random.default_rng(1).normal(size=(8, 4))
  spread = np.concatenate([np.eye(4), -np.eye(4)])  # the 8 vertices of a cross-polytope
  assert float(losses.koleo(clustered)) > float(losses.koleo(spread))
  np.testing.assert_allclose(float(losses.koleo(spread)), -math.log(math.sqrt(2)), atol=1e-5)


def test_ibot_loss_against_numpy_with_varied_mask_counts():
  rng = np.random.default_rng(0)
  n_img, n_patch, k = 4, 9, 7
  masks = np.zeros((n_img, n_patch), bool)
  masks[0, [1, 2, 5]] = True
  masks[2, [0]] = True
  masks[3, :] = True  # image 1 unmasked
  s = rng.normal(size=(n_img, n_patch, k))
  t = rng.dirichlet(np.ones(k), size=(n_img, n_patch))
  expected = 0.0
  for i in range(n_img):
    if masks[i].any():
      logp = s[i] / 0.1 - np.log(np.exp(s[i] / 0.1).sum(-1, keepdims=True))
      expected += (-(t[i] * logp).sum(-1))[masks[i]].mean()
  expected /= n_img
  idx, valid, w = masking.gather_masked(jnp.asarray(masks), 16)
  s_rows = jnp.asarray(s.reshape(-1, k))[idx]
  t_rows = jnp.where(valid[:, None], jnp.asarray(t.reshape(-1, k))[idx], 0.0)
  got = losses.ibot_patch_loss(s_rows, t_rows, w, 0.1, n_img)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


# --------------------------------------------------------------------------- optimizer


def v2_config(**overrides):
  base = {'model.mask_token': True, 'model.layerscale': 1e-5, 'loss.ibot_weight': 1.0,
          'loss.koleo_weight': 0.1, 'optim.layer_decay': 0.9, 'optim.patch_embed_lr_mult': 0.2,
          'optim.clip_mode': 'per_module'}
  return tiny_config(**{**base, **overrides})


def test_layerwise_lr_multipliers_as_the_reference_lists_them():
  config = v2_config()
  pure = state_lib.pure_params(models.build(config))
  names = optim.param_names(pure)
  mult = optim.lr_multipliers(pure, depth=4, layer_decay=0.9, patch_embed_mult=0.2)
  flat = dict(zip(jax.tree.leaves(names), jax.tree.leaves(mult)))
  assert flat['backbone/pos_embed'] == pytest.approx(0.9 ** 5)
  assert flat['backbone/cls_token'] == pytest.approx(0.9 ** 5)
  assert flat['backbone/mask_token'] == pytest.approx(0.9 ** 5)
  assert flat['backbone/patch_embed/kernel'] == pytest.approx(0.9 ** 5 * 0.2)
  assert flat['backbone/blocks/0/attn/qkv/kernel'] == pytest.approx(0.9 ** 4)
  assert flat['backbone/blocks/3/ls2/gamma'] == pytest.approx(0.9)
  assert flat['backbone/norm/scale'] == pytest.approx(1.0)
  assert flat['head/last_layer/weight_v'] == pytest.approx(1.0)
  # LayerScale gammas are 1-D: never decayed
  decay = dict(zip(jax.tree.leaves(names), jax.tree.leaves(optim.decay_mask(pure))))
  assert not decay['backbone/blocks/0/ls1/gamma'] and decay['backbone/pos_embed']


def test_layerwise_decay_scales_each_update_by_its_multiplier():
  config = v2_config(**{'optim.clip_grad': 0.0, 'optim.freeze_last_layer': 0})
  plain = v2_config(**{'optim.clip_grad': 0.0, 'optim.freeze_last_layer': 0,
                       'optim.layer_decay': 1.0, 'optim.patch_embed_lr_mult': 1.0})
  params = state_lib.pure_params(models.build(config))
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
  sched = Schedules.from_config(config, steps_per_epoch=10)
  outs = []
  for c in (config, plain):
    tx = optim.make(c, sched, params)
    outs.append(tx.update(grads, tx.init(params), params)[0])
  mult = optim.lr_multipliers(params, 4, 0.9, 0.2)
  for a, b, m in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), jax.tree.leaves(mult)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b) * m, rtol=1e-6, atol=1e-12)


def test_per_module_clipping_bounds_each_module_norm():
  tx = optim.clip_by_global_norm_per_module(1.0)
  g = {'backbone': {'a': jnp.full((10,), 3.0)}, 'head': {'b': jnp.full((4,), 0.1)}}
  out, _ = tx.update(g, tx.init(g))
  assert float(optax_norm(out['backbone'])) == pytest.approx(1.0, rel=1e-5)
  np.testing.assert_array_equal(np.asarray(out['head']['b']), np.asarray(g['head']['b']))


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def test_sqrt_lr_scaling_and_per_step_teacher_temperature():
  assert scaled_lr(4e-3, 2048, 'sqrt') == pytest.approx(4e-3 * math.sqrt(2))
  assert scaled_lr(5e-4, 1024, 'linear') == pytest.approx(2e-3)
  c = config_file.load(REPO / 'configs' / 'dinov2_vits14.py')
  s = Schedules.from_config(c, c.data.epoch_length)
  warm = 30 * 1250
  np.testing.assert_allclose([float(s.teacher_temp_at(i)) for i in (0, warm // 2, warm - 1,
                                                                    warm, 10 * warm)],
                             [0.04, 0.04 + 0.03 * (warm // 2) / (warm - 1), 0.07, 0.07, 0.07],
                             rtol=1e-5)


# --------------------------------------------------------------------------- configs and step


@pytest.mark.parametrize('name', ['dinov2_vits14', 'dinov2_vitb14', 'dinov2_vitl14',
                                  'dinov2_vitg14', 'dinov2_cpu'])
def test_dinov2_configs_are_valid(name):
  c = config_file.load(REPO / 'configs' / f'{name}.py')
  validate(c, n_devices=8 if name == 'dinov2_cpu' else 64)
  assert c.loss.ibot_weight == 1.0 and c.loss.koleo_weight == 0.1 and c.model.mask_token
  if name in ('dinov2_vitl14', 'dinov2_vitg14'):
    assert c.loss.centering == 'sinkhorn_knopp' and c.model.ibot_separate_head


def test_ibot_without_mask_token_is_a_config_error():
  with pytest.raises(ConfigError, match='config.loss.ibot_weight: .*model.mask_token=True'):
    validate(tiny_config(**{'loss.ibot_weight': 1.0}), n_devices=8)
  with pytest.raises(ConfigError, match='config.loss.centering'):
    validate(tiny_config(**{'loss.centering': 'sinkhorn'}), n_devices=8)


def test_dinov2_step_is_the_same_on_1_and_8_devices():
  """Every DINOv2 piece at once (masks, iBOT with a separate head, KoLeo, Sinkhorn-Knopp,
  LLRD, per-module clipping): 2 steps on one device equal 2 steps sharded over 8."""
  config = v2_config(**{'loss.centering': 'sinkhorn_knopp', 'model.ibot_separate_head': True,
                        'model.ibot_out_dim': 48, 'data.source': 'digits',
                        'model.drop_path_uniform': True})
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(-1, 1, devices=devices)
    run = train.build(config, mesh)
    state = train.init_state(run)
    it = train.data.train_iterator(run.train_source, canvas_size=config.data.canvas_size,
                                   global_batch=config.batch_size, seed=0)
    for _ in range(2):
      state, metrics = run.step_fn(state, sharding.to_global(next(it), mesh))
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (s1, m1), (s8, m8) = results
  for key in ('loss', 'dino_loss', 'ibot_loss', 'koleo', 'masked_fraction'):
    assert np.isfinite(m1[key]), key
    np.testing.assert_allclose(m1[key], m8[key], rtol=2e-4, atol=1e-5)
  assert 0 < m1['masked_fraction'] <= 0.5
  assert 'ibot_head' in s1.params and s1.patch_center.shape == (1, 48)
  assert np.any(np.asarray(s1.patch_center))
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
