"""The jitted train step: sharded == single device, teacher EMA, center update, no recompiles."""
import jax
import numpy as np
import pytest

from dino_jax import data, optim, sharding, train


MESHES = {'1': (1, 1), '8x1': (8, 1), '1x8': (1, 8), '2x4': (2, 4)}


def first_batch(run, n=None):
  ds = data.train_dataset(run.train_source, canvas_size=run.config.data.canvas_size,
                          global_batch=run.config.batch_size, seed=0)
  return ds[0]


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope='module')
def runs():
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{'mesh.min_shard_size': 0})  # shard even the tiny model's tensors
  devices = jax.devices()
  assert len(devices) == 8
  return {name: train.build(config, sharding.make_mesh(d, f, devices[:d * f]))
          for name, (d, f) in MESHES.items()}


def test_eight_devices_match_one(runs):
  batch = first_batch(runs['1'])
  results = {}
  for name, run in runs.items():
    state = train.init_state(run)
    for _ in range(2):
      state, metrics = run.step_fn(state, sharding.to_global(batch, run.mesh))
    results[name] = (host(state), host(metrics))
  ref_state, ref_metrics = results['1']
  for name in ('8x1', '1x8', '2x4'):
    state, metrics = results[name]
    np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_fsdp_shards_params_moments_and_center(runs):
  for name in ('1x8', '2x4'):
    state = train.init_state(runs[name])
    fsdp = runs[name].mesh.shape['fsdp']
    for tree in (state.params, state.teacher_params,
                 state.opt_state[1].inner_states['last_layer'].inner_state.inner.mu):
      v = tree['head']['last_layer']['weight_v']
      assert v.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
      assert {s.data.shape for s in v.addressable_shards} == {(v.shape[0], v.shape[1] // fsdp)}
    assert state.center.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')


def test_teacher_is_ema_of_student_and_center_moves(runs):
  run = runs['1']
  state = train.init_state(run)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.teacher_params)):
    np.testing.assert_array_equal(a, b)  # teacher starts as an exact copy
  before = host(state)
  state, metrics = run.step_fn(state, sharding.to_global(first_batch(run), run.mesh))
  after = host(state)
  m = float(metrics['momentum'])
  assert m == pytest.approx(run.schedules.teacher_momentum(0))
  for t0, t1, s1 in zip(jax.tree.leaves(before.teacher_params),
                        jax.tree.leaves(after.teacher_params), jax.tree.leaves(after.params)):
    np.testing.assert_allclose(t1, m * t0 + (1 - m) * s1, rtol=1e-5, atol=1e-7)
  assert int(after.step) == 1
  assert not np.allclose(after.center, 0)
  # first step: the last layer is frozen, so the prototypes did not move
  np.testing.assert_array_equal(after.params['head']['last_layer']['weight_v'],
                                before.params['head']['last_layer']['weight_v'])


def test_schedules_change_without_recompiling(runs):
  run = runs['1']
  state = train.init_state(run)
  batch = sharding.to_global(first_batch(run), run.mesh)
  state, _ = run.step_fn(state, batch)
  size = run.step_fn._cache_size()
  lrs = []
  for _ in range(3):
    state, m = run.step_fn(state, batch)
    lrs.append(float(m['lr']))
  assert run.step_fn._cache_size() == size
  assert len(set(lrs)) == 3


def test_decay_mask_covers_real_model(runs):
  run = runs['1']
  params = jax.eval_shape(run.init_fn).params
  names = dict(zip(jax.tree.leaves(optim.param_names(params)),
                   jax.tree.leaves(optim.decay_mask(params))))
  assert names['backbone/cls_token'] and names['backbone/pos_embed']
  assert not names['backbone/blocks/0/norm1/scale']
  assert not names['backbone/blocks/0/attn/qkv/bias']
  assert names['backbone/blocks/0/attn/qkv/kernel']
