"""DINOv3's Gram anchoring and its loss weights: the Gram loss and the feature-map resize against
numpy written from their definitions, the Gram teacher's refresh steps against a loop that
counts them as the official training loop describes, the weight schedules, the Gram teacher's
crops, the config checks, and the step itself (1 vs 8 devices, exact resume across a refresh).
"""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from dino_jax import augment, data, losses, objective, schedules, sharding, train
from dino_jax.state import GramTrainState, TrainState
from dino_jax.validate import ConfigError, validate

# -------------------------------------------------------------------------- the Gram loss


def np_gram_loss(s, t, normalized=True, img_level=True, remove_neg=False,
                 remove_only_teacher_neg=False):
  """Mean over all entries of (G_s - G_t)^2, G the matrix of inner products of the (L2
  normalised) patch tokens of one image, or of all images' tokens together."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  if normalized:
    s = s / np.maximum(np.linalg.norm(s, axis=-1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
  if not img_level:
    s, t = s.reshape(1, -1, s.shape[-1]), t.reshape(1, -1, t.shape[-1])
  total, count = 0.0, 0
  for si, ti in zip(s, t):
    gs, gt = si @ si.T, ti @ ti.T
    if remove_neg or remove_only_teacher_neg:
      gt = np.maximum(gt, 0.0)
    if remove_neg:
      gs = np.maximum(gs, 0.0)
    total += np.sum((gs - gt) ** 2)
    count += gs.size
  return total / count


OPTIONS = [dict(), dict(img_level=False), dict(normalized=False), dict(remove_neg=True),
           dict(remove_only_teacher_neg=True), dict(img_level=False, remove_neg=True)]


@pytest.mark.parametrize('options', OPTIONS, ids=lambda o: ','.join(o) or 'default')
def test_gram_loss_matches_numpy(options):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  s = jax.random.normal(k1, (3, 9, 5))
  t = s + 0.7 * jax.random.normal(k2, (3, 9, 5))
  got = losses.gram_loss(s, t, **options)
  np.testing.assert_allclose(got, np_gram_loss(s, t, **options), rtol=1e-5)
  assert float(got) > 0


def test_gram_loss_is_zero_for_equal_features_and_trains_only_the_student():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8))
  for options in OPTIONS:
    value = float(losses.gram_loss(x, x, **options))
    if options.get('remove_only_teacher_neg'):  # the student keeps its negative entries
      assert value == pytest.approx(np_gram_loss(x, x, **options), rel=1e-5) and value > 0
    else:
      assert value == pytest.approx(0.0, abs=1e-12)
  # the normalised loss does not see the tokens' norms
  scale = jnp.arange(1, 17, dtype=jnp.float32)[None, :, None]
  assert float(losses.gram_loss(x * scale, x)) == pytest.approx(0.0, abs=1e-10)
  y = x + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x.shape)
  g_s, g_t = jax.grad(lambda a, b: losses.gram_loss(a, b), argnums=(0, 1))(y, x)
  assert np.any(np.asarray(g_s)) and not np.any(np.asarray(g_t))


# ------------------------------------------------------------- the Gram teacher's targets


def np_interpolate(fmap, out, method):
  """torch F.interpolate(size=out, align_corners=False, antialias=False) of an (n, n, D) map,
  one output pixel at a time: half-pixel source coordinates; bicubic: Keys' cubic convolution
  with a = -0.75 over 4 taps, indices clamped to the border; bilinear: 2 taps, the source
  coordinate clamped at 0 below."""
  n = fmap.shape[0]
  a = -0.75

  def cubic(d):
    d = abs(d)
    if d <= 1:
      return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
      return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0

  def taps(i):
    x = (i + 0.5) * n / out - 0.5
    if method == 'bilinear':
      x = max(x, 0.0)
      x0 = math.floor(x)
      return [(min(x0, n - 1), 1 - (x - x0)), (min(x0 + 1, n - 1), x - x0)]
    x0 = math.floor(x)
    return [(min(max(x0 + k, 0), n - 1), cubic(x - (x0 + k))) for k in range(-1, 3)]

  res = np.zeros((out, out, fmap.shape[-1]))
  for y in range(out):
    for x in range(out):
      for iy, wy in taps(y):
        for ix, wx in taps(x):
          res[y, x] += wy * wx * fmap[iy, ix]
  return res


@pytest.mark.parametrize('n,grid,method', [(8, 4, 'bicubic'), (6, 4, 'bicubic'),
                                           (8, 4, 'bilinear'), (3, 5, 'bicubic')])
def test_gram_targets_resize_the_feature_map_as_torch_interpolate(n, grid, method):
  patches = jax.random.normal(jax.random.PRNGKey(3), (2, n * n, 4))
  spec = objective.GramSpec(resize=method)
  got = np.asarray(objective.gram_targets(spec, patches, grid))
  assert got.shape == (2, grid * grid, 4)
  for b in range(2):
    want = np_interpolate(np.asarray(patches[b], np.float64).reshape(n, n, 4), grid, method)
    np.testing.assert_allclose(got[b], want.reshape(grid * grid, 4), rtol=1e-5, atol=1e-5)
  same = objective.gram_targets(spec, patches, n)  # same grid: the tokens themselves
  np.testing.assert_array_equal(np.asarray(same), np.asarray(patches))


def test_gram_teacher_crops_share_the_global_crops_boxes_and_flips():
  """With no colour op, blur or solarize, the Gram teacher's crops at the global size are the
  global crops themselves (same keys, boxes and flips); at twice the size they downsample to
  them closely."""
  cfg = augment.AugmentConfig.from_config(tiny_config(**{
      'crops.jitter_p': 0.0, 'crops.grayscale_p': 0.0, 'crops.global1_blur_p': 0.0,
      'crops.global2_blur_p': 0.0, 'crops.global2_solarize_p': 0.0, 'crops.flip_p': 0.5}))
  rng = np.random.default_rng(0)
  canvas = jnp.asarray(rng.integers(0, 256, (4, 16, 16, 3)), jnp.uint8)
  hw = jnp.asarray([[16, 16], [12, 16], [16, 10], [9, 9]], jnp.int32)
  key = jax.random.PRNGKey(4)
  g, _ = augment.multicrop(key, canvas, hw, cfg)
  same = augment.gram_teacher_crops(key, canvas, hw, cfg, 16)
  np.testing.assert_allclose(np.asarray(same), np.asarray(g), atol=1e-6)
  big = augment.gram_teacher_crops(key, canvas, hw, cfg, 32)
  assert big.shape == (8, 32, 32, 3)
  other = augment.gram_teacher_crops(jax.random.PRNGKey(5), canvas, hw, cfg, 16)
  assert not np.allclose(np.asarray(other), np.asarray(g))


# ------------------------------------------------------------------------ the schedules


def reference_refreshes(total, load_ema_at=-1, rep_update=True, first=0, every=1,
                        max_updates=None):
  """The steps n (updates applied) after which the EMA teacher is copied into the Gram
  teacher, counted as the official loop describes it: before iteration `load_ema_at`; after
  iteration it when rep_update, it + 1 >= first, it + 1 a multiple of every, and fewer than
  max_updates copies so far."""
  steps, count = set(), 0
  for it in range(total):
    if it == load_ema_at and it > 0:
      steps.add(it)
    n = it + 1
    if rep_update and n >= first and n % every == 0 and (max_updates is None or
                                                         count < max_updates):
      steps.add(n)
      count += 1
  return steps


@pytest.mark.parametrize('kw', [
    dict(every=10), dict(every=7, first=30), dict(every=10, first=35, max_updates=3),
    dict(every=5, max_updates=1), dict(rep_update=False, load_ema_at=17),
    dict(every=9, first=18, max_updates=2, load_ema_at=4), dict(every=1, first=3)])
def test_refresh_steps_follow_the_official_loop(kw):
  total = 100
  want = reference_refreshes(total, **kw)
  refresh = schedules.GramRefresh(load_ema_at=kw.get('load_ema_at', -1),
                                  rep_update=kw.get('rep_update', True),
                                  first_update=kw.get('first', 0), every=kw.get('every', 1),
                                  max_updates=kw.get('max_updates') or 0)
  got = np.asarray(refresh(np.arange(1, total + 1)))
  assert set(np.flatnonzero(got) + 1) == want
  assert all(bool(refresh(n)) == (n in want) for n in (1, 10, 35, 50))  # scalar steps too


def test_weight_schedules_against_their_closed_form():
  """start -> peak linearly (peak not reached), a half cosine peak -> end over the cosine
  steps (both ends included), then end; () is the constant weight."""
  spe, epochs = 10, 8
  total = spe * epochs
  w = schedules.WeightSchedule.from_config(2.0, (0.0, 0.5, 3, 2), spe, total)
  steps = np.arange(total)
  want = np.where(steps < 30, 0.5 * steps / 30, 2.0)
  cos = steps[(steps >= 30) & (steps < 50)] - 30
  want[30:50] = 2.0 + (0.5 - 2.0) * 0.5 * (1 + np.cos(np.pi * cos / 19))
  np.testing.assert_allclose(np.asarray(w(steps)), want, rtol=1e-6, atol=1e-7)
  const = schedules.WeightSchedule.from_config(1.5, (), spe, total)
  np.testing.assert_array_equal(np.asarray(const(steps)), 1.5)
  # the 7B Gram stage's shape: 0 until the start, a one-epoch cosine ramp to 2, then 2
  ramp = schedules.WeightSchedule.from_config(2.0, (0, 0, 5, 1), spe, total)
  got = np.asarray(ramp(steps))
  assert np.all(got[:50] == 0) and got[50] == 0 and got[59] == pytest.approx(2.0)
  assert np.all(np.diff(got[50:60]) > 0) and np.all(got[60:] == 2.0)


def test_schedules_from_config_and_defaults_are_off():
  config = tiny_config()
  s = schedules.Schedules.from_config(config, 4)
  assert s.gram_weight is s.gram_refresh is s.dino_local_weight is None
  assert s.loss_weights(0) == {} and 'gram_weight' not in s.values(0)
  assert objective.Objective.from_config(config).gram is None
  assert [t.name for t in objective.Objective.from_config(config).terms] == ['dino_loss']
  on = tiny_config(**{'gram.weight': 2.0, 'gram.weight_schedule': (0.0, 0.0, 1, 1),
                      'gram.update_every': 3, 'loss.dino_local_weight': 0.5})
  s = schedules.Schedules.from_config(on, 4)
  assert float(s.loss_weights(0)['gram_loss']) == 0.0
  assert float(s.values(8)['gram_weight']) == 2.0 and float(s.values(8)['dino_local_weight']) == 0.5
  assert s.gram_refresh == schedules.GramRefresh(-1, True, 0, 3, 0)
  spec = objective.Objective.from_config(on)
  assert spec.gram_teacher and spec.dino_local_reweight and spec.gram.teacher_size == 16
  assert [t.name for t in spec.terms] == ['dino_loss', 'gram_loss']


# ------------------------------------------------------------------ through the objective


def test_objective_gram_term_and_local_weight():
  """The gram term is losses.gram_loss of the student's global patch tokens against the
  targets, weighted by the step's weight; the local-crop DINO pairs count dino_local times."""
  from test_objective import B, N_GLOBAL, N_LOCAL, S_TEMP, T_TEMP, _setup  # pylint: disable=import-outside-toplevel
  spec = objective.Objective(koleo_weight=0.1, gram=objective.GramSpec(weight=2.0),
                             dino_local_reweight=True)
  x, s = _setup(spec)
  gram_patches = jax.random.normal(jax.random.PRNGKey(7), s['g_out'].patches.shape)
  w_local, w_gram = 0.5, 0.75
  x = x._replace(gram_patches=gram_patches, weights={'gram_loss': w_gram, 'dino_local': w_local})
  total, values, _ = objective.total(spec, x)
  assert list(values) == ['dino_loss', 'koleo', 'gram_loss']
  np.testing.assert_allclose(values['gram_loss'], np_gram_loss(s['g_out'].patches, gram_patches),
                             rtol=1e-5)
  # DINO by hand: H(q_i, p_v) over pairs v != i, the local views' pairs times w_local
  q = np.asarray(losses.teacher_probs(s['teacher'].head(s['t_out'].cls), s['center'], T_TEMP),
                 np.float64).reshape(N_GLOBAL, B, -1)
  logits = np.asarray(s['student'].head(s['cls']), np.float64) / S_TEMP
  logp = (logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                 keepdims=True)) - logits.max(-1, keepdims=True))
  logp = logp.reshape(N_GLOBAL + N_LOCAL, B, -1)
  pairs = [(i, v) for i in range(N_GLOBAL) for v in range(N_GLOBAL + N_LOCAL) if v != i]
  dino = sum((w_local if v >= N_GLOBAL else 1.0) * -np.mean(np.sum(q[i] * logp[v], -1))
             for i, v in pairs) / len(pairs)
  np.testing.assert_allclose(values['dino_loss'], dino, rtol=1e-5)
  np.testing.assert_allclose(total, values['dino_loss'] + 0.1 * values['koleo'] +
                             w_gram * values['gram_loss'], rtol=1e-6)
  # the chunked prototypes give the same reweighted DINO value
  chunked = objective.Objective(koleo_weight=0.1, gram=objective.GramSpec(weight=2.0),
                                dino_local_reweight=True, prototype_chunk=4)
  xc, _ = _setup(chunked)
  xc = xc._replace(gram_patches=gram_patches, weights=x.weights)
  _, values_c, _ = objective.total(chunked, xc)
  np.testing.assert_allclose(values_c['dino_loss'], values['dino_loss'], rtol=1e-5)
  # no Gram weight for the step: the spec's (2.0)
  plain, values_p, _ = objective.total(spec, x._replace(weights={'dino_local': w_local}))
  np.testing.assert_allclose(plain, values_p['dino_loss'] + 0.1 * values_p['koleo'] +
                             2.0 * values_p['gram_loss'], rtol=1e-6)


# ------------------------------------------------------------------------- config checks


@pytest.mark.parametrize('field,value,message', [
    ('gram.weight', -1.0, 'config.gram.weight: must be >= 0'),
    ('gram.weight_schedule', (0.0, 1.0), 'config.gram.weight_schedule: .* is neither'),
    ('gram.weight_schedule', (0.0, 1.0, -1, 1), 'config.gram.weight_schedule: .* negative'),
    ('loss.dino_local_weight', -0.5, 'config.loss.dino_local_weight: must be >= 0'),
    ('loss.dino_local_weight_schedule', (1.0,), 'config.loss.dino_local_weight_schedule'),
    ('gram.teacher_size', 30, 'config.gram.teacher_size: 30 is not 0'),
    ('gram.update_every', 0, 'config.gram.update_every: must be positive'),
    ('gram.first_update', -2, 'config.gram.first_update: must be >= 0'),
    ('gram.max_updates', -1, 'config.gram.max_updates: must be >= 0'),
    ('gram.load_ema_at', -3, 'config.gram.load_ema_at: must be a step or -1'),
    ('gram.resize', 'nearest', "config.gram.resize: 'nearest' is not one of"),
    ('gram.init_from', '/no/such/dir', 'config.gram.init_from: .* is neither a directory'),
])
def test_bad_gram_fields_are_one_line(field, value, message):
  with pytest.raises(ConfigError, match=message):
    validate(tiny_config(**{'gram.weight': 1.0, field: value}), n_devices=8)


def test_contradicting_gram_fields_are_one_line():
  with pytest.raises(ConfigError, match='config.gram.remove_only_teacher_neg: set at most one'):
    validate(tiny_config(**{'gram.remove_neg': True, 'gram.remove_only_teacher_neg': True}))
  with pytest.raises(ConfigError, match='config.gram.antialias: .*bicubic'):
    validate(tiny_config(**{'gram.resize': 'bilinear', 'gram.antialias': True}))
  with pytest.raises(ConfigError, match='config.gram.teacher_size: 32: with gram.ema_teacher'):
    validate(tiny_config(**{'gram.ema_teacher': True, 'gram.teacher_size': 32}))
  with pytest.raises(ConfigError, match='config.gram.init_from: with gram.ema_teacher'):
    validate(tiny_config(**{'gram.ema_teacher': True, 'gram.init_from': '/tmp'}))
  validate(tiny_config(**{'gram.weight': 1.0, 'gram.teacher_size': 32}), n_devices=8)


# ------------------------------------------------------------------------------ the step


def gram_config(**overrides):
  """The tiny config with Gram anchoring: a Gram teacher at twice the global crops' resolution
  (bicubic-resized 8 x 8 -> 4 x 4 patch map), copied from the EMA teacher every 2 steps, a
  ramped Gram weight and halved local-crop DINO pairs."""
  return tiny_config(**{'gram.weight': 2.0, 'gram.weight_schedule': (0.5, 1.0, 0.25, 0.25),
                        'gram.teacher_size': 32, 'gram.update_every': 2,
                        'loss.dino_local_weight': 0.5, 'data.canvas_size': 32, **overrides})


def test_off_by_default_the_state_has_no_gram_teacher():
  run = train.build(tiny_config(), sharding.make_mesh(-1, 1, jax.devices()[:1]))
  shapes = jax.eval_shape(run.init_fn)
  assert type(shapes) is TrainState  # pylint: disable=unidiomatic-typecheck
  on = train.build(gram_config(), sharding.make_mesh(-1, 1, jax.devices()[:1]))
  gram = jax.eval_shape(on.init_fn)
  assert isinstance(gram, GramTrainState)
  assert jax.tree.structure(gram.gram_params) == jax.tree.structure(
      gram.teacher_params['backbone'])


def test_gram_step_is_the_same_on_1_and_8_devices_and_refreshes():
  """Two steps on one device equal two steps sharded over 8 (data 4 x fsdp 2, every tensor
  sharded); the Gram teacher is the start's EMA teacher for step 1 and the EMA teacher after
  step 2 from then on."""
  config = gram_config(**{'mesh.min_shard_size': 0})
  results = []
  for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices(), 2)):
    mesh = sharding.make_mesh(-1, fsdp, devices=devices)
    run = train.build(config, mesh)
    state = train.init_state(run)
    state = train._init_gram_teacher(state, '')  # pylint: disable=protected-access
    start = jax.device_get(state)
    it = data.train_iterator(run.train_source, canvas_size=config.data.canvas_size,
                             global_batch=config.batch_size, seed=0)
    metrics = []
    for _ in range(2):
      state, m = run.step_fn(state, sharding.to_global(next(it), mesh))
      metrics.append(jax.device_get(m))
    results.append((start, jax.device_get(state), metrics))
  (start, s1, m1), (_, s8, m8) = results
  for a, b in zip(jax.tree.leaves(start.gram_params), jax.tree.leaves(start.teacher_params['backbone'])):
    np.testing.assert_array_equal(a, b)
  assert [float(m['gram_refreshed']) for m in m1] == [0.0, 1.0]
  for a, b in zip(jax.tree.leaves(s1.gram_params), jax.tree.leaves(s1.teacher_params['backbone'])):
    np.testing.assert_array_equal(a, b)
  for step in range(2):
    for key in ('loss', 'dino_loss', 'gram_loss', 'gram_weight', 'dino_local_weight'):
      assert np.isfinite(m1[step][key]), key
      np.testing.assert_allclose(m1[step][key], m8[step][key], rtol=2e-4, atol=1e-6, err_msg=key)
  assert float(m1[0]['gram_loss']) > 0 and float(m1[0]['gram_weight']) == pytest.approx(0.5)
  assert float(m1[0]['dino_local_weight']) == 0.5
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_resume_across_a_gram_refresh_is_exact(tmp_path, digits_npz):
  """An 8-step run whose Gram teacher is refreshed after steps 3 and 6 and loaded from the
  EMA teacher after step 5: delete its final checkpoint, rerun from step 4, and the state
  (Gram teacher included) is bitwise the uninterrupted one."""
  config = gram_config(**{'data.source': f'npz:{digits_npz}', 'checkpoint_every': 4,
                          'gram.update_every': 3, 'gram.load_ema_at': 5,
                          'gram.max_updates': 2, 'evals': ()})
  full = train.train_and_evaluate(config, str(tmp_path))
  assert isinstance(full, GramTrainState)
  shutil.rmtree(tmp_path / 'checkpoints' / '8')
  resumed = train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  refreshed = [l['step'] for l in lines if l.get('gram_refreshed')]
  assert refreshed == [3, 5, 6]
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # gram.init_from: a fresh run's Gram teacher is that workdir's newest teacher backbone
  run = train.build(config, sharding.make_mesh(-1, 1, jax.devices()[:1]))
  fresh = train._init_gram_teacher(train.init_state(run), str(tmp_path))  # pylint: disable=protected-access
  for a, b in zip(jax.tree.leaves(fresh.gram_params),
                  jax.tree.leaves(full.teacher_params['backbone'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
