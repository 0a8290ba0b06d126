"""DINOv3's high-resolution adaptation: crop-size sets drawn per step (resolution.py), one
compiled step per set (train.build), the set a step uses a pure function of the seed and the
step; each set's step is the step of a config with its sizes; the loop runs the drawn set and
resumes exactly; bad sets are one-line config errors that write nothing."""
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config
from dino_jax import checkpointing, data, resolution, sharding, train
from dino_jax.validate import ConfigError, validate

SETS = ((16, 8, 0), (24, 12, 32))


def sets_config(**overrides):
  """The tiny config with RoPE (no parameter depends on the crop size), iBOT (its mask grid
  follows the set's global size) and Gram anchoring (its teacher size follows the set)."""
  return tiny_config(**{'model.pos_embed': 'rope', 'model.mask_token': True,
                        'loss.ibot_weight': 1.0, 'gram.weight': 1.0, 'gram.update_every': 2,
                        'data.canvas_size': 32, 'crops.size_sets': SETS,
                        'crops.size_set_ratios': (1.0, 1.0), 'mesh.min_shard_size': 0,
                        **overrides})


def test_the_set_of_a_step_is_a_pure_function_drawn_with_the_ratios():
  sampler = resolution.Sampler(seed=3, p=(0.5, 0.3, 0.2, 0.0))
  draws = np.array([sampler(s) for s in range(20000)])
  assert [sampler(s) for s in range(50)] == list(draws[:50])  # the same again
  assert [resolution.Sampler(3, sampler.p)(s) for s in range(50)] == list(draws[:50])
  assert [resolution.Sampler(4, sampler.p)(s) for s in range(50)] != list(draws[:50])
  counts = np.bincount(draws, minlength=4) / draws.size
  sigma = np.sqrt(np.array(sampler.p) * (1 - np.array(sampler.p)) / draws.size)
  assert np.all(np.abs(counts - sampler.p) <= 4 * sigma + 1e-12), counts
  assert counts[3] == 0
  assert resolution.Sampler(0, (1.0,))(123) == 0


def test_sets_ratios_and_set_configs_from_the_config():
  config = sets_config(**{'crops.size_set_ratios': (3.0, 1.0)})
  assert resolution.size_sets(config) == (resolution.SizeSet(16, 8, 0),
                                          resolution.SizeSet(24, 12, 32))
  np.testing.assert_allclose(resolution.ratios(config), [0.75, 0.25])
  np.testing.assert_allclose(resolution.ratios(sets_config(**{'crops.size_set_ratios': ()})),
                             [0.5, 0.5])
  one = tiny_config(**{'gram.teacher_size': 32})
  assert resolution.size_sets(one) == (resolution.SizeSet(16, 8, 32),)
  derived = resolution.set_config(config, resolution.SizeSet(24, 12, 32))
  diff = checkpointing.config_diff(derived.to_dict(), config.to_dict())
  assert diff == ('crops.global_size: checkpoint 24, this run 16; crops.local_size: checkpoint '
                  '12, this run 8; gram.teacher_size: checkpoint 32, this run 0')
  assert config.crops.global_size == 16  # the config itself is untouched


@pytest.fixture(scope='module')
def sets_run(digits_npz):
  """(config, mesh, run) of a one-epoch digits run with both sets, on the 8 devices the
  training loop uses."""
  config = sets_config(**{'data.source': f'npz:{digits_npz}', 'checkpoint_every': 2,
                          'evals': (), 'epochs': 1})
  run = train.build(config)
  return config, run.mesh, run


def _fresh(run):
  return train._init_gram_teacher(train.init_state(run), '')  # pylint: disable=protected-access


def _batches(run, config, mesh):
  it = data.train_iterator(run.train_source, canvas_size=config.data.canvas_size,
                           global_batch=config.batch_size, seed=config.seed)
  return (sharding.to_global(b, mesh) for b in it)


def test_each_set_runs_the_step_of_a_config_with_its_sizes(sets_run):
  """A run's step for set 1 (24 px global, 12 px local, Gram teacher 32 px) is bitwise the
  step of a run without sets whose crops and Gram teacher have those sizes; set 0's differs."""
  config, mesh, run = sets_run
  assert len(run.step_fns) == 2
  plain = train.build(tiny_plain(config), mesh)
  assert len(plain.step_fns) == 1
  start = jax.device_get(_fresh(run))
  batch = next(_batches(run, config, mesh))
  s_set, m_set = jax.device_get(run.step_fns[1](jax.device_put(start), batch))
  s_plain, m_plain = jax.device_get(plain.step_fn(jax.device_put(start), batch))
  for a, b in zip(jax.tree.leaves(s_set), jax.tree.leaves(s_plain)):
    np.testing.assert_array_equal(a, b)
  for key in ('loss', 'dino_loss', 'ibot_loss', 'gram_loss'):
    assert m_set[key] == m_plain[key] and m_set[key] > 0, key
  _, m_0 = jax.device_get(run.step_fns[0](jax.device_put(start), batch))
  assert m_0['gram_loss'] != m_set['gram_loss'] and m_0['loss'] != m_set['loss']


def tiny_plain(config):
  """`config` without sets, its crops and Gram teacher at set 1's sizes."""
  c = config.copy_and_resolve_references()
  c.crops.size_sets, c.crops.size_set_ratios = (), ()
  c.crops.global_size, c.crops.local_size, c.gram.teacher_size = SETS[1]
  return c


def test_the_loop_runs_the_drawn_set_and_resumes_exactly(tmp_path, sets_run):
  config, mesh, run = sets_run
  total = run.schedules.total_steps
  drawn = [run.size_set_at(s) for s in range(total)]
  assert set(drawn) == {0, 1}, drawn  # this seed draws both sets within the run
  # by hand: the set each update draws, and (to show the draw matters) always set 0
  by_hand = []
  for pick in (run.step_for, lambda s: run.step_fns[0]):
    state, batches = _fresh(run), _batches(run, config, mesh)
    for step in range(total):
      state, _ = pick(step)(state, next(batches))
    by_hand.append(jax.device_get(state))
  full = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(by_hand[0])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(full.params), jax.tree.leaves(by_hand[1].params)))
  # resume from the last checkpoint before the end: bitwise the uninterrupted run
  shutil.rmtree(tmp_path / 'checkpoints' / str(total))
  resumed = jax.device_get(train.train_and_evaluate(config, str(tmp_path)))
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # other sets cannot resume this workdir: one line, the checkpoints untouched
  before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  other = config.copy_and_resolve_references()
  other.crops.size_sets = ((16, 8, 0), (32, 16, 32))
  with pytest.raises(checkpointing.CheckpointMismatchError, match='crops.size_sets'):
    train.train_and_evaluate(other, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before


@pytest.mark.parametrize('sets,ratios,message', [
    (((16, 8, 0), (24, 12)), (), r'config.crops.size_sets: set 1 is \(24, 12\), not'),
    (((16, 8, 0), (24, 10, 0)), (), r'set 1 \(24, 10, 0\): crop sizes must be positive multiples'),
    (((16, 8, 0), (0, 8, 0)), (), r'set 1 \(0, 8, 0\): crop sizes must be positive multiples'),
    (((16, 8, 30),), (), r'set 0 \(16, 8, 30\): the Gram teacher size must be 0'),
    (((16, 8, 0), (48, 8, 0)), (), r'config.data.canvas_size: 32 is smaller than the global crop '
                                   r'size 48 of crops.size_sets set 1'),
    (((16, 8, 0), (24, 12, 0)), (1.0,), r'config.crops.size_set_ratios: 1 ratios for 2'),
    (((16, 8, 0), (24, 12, 0)), (1.0, -1.0), r'config.crops.size_set_ratios: -1.0 is not a'),
    (((16, 8, 0), (24, 12, 0)), (0.0, 0.0), r'config.crops.size_set_ratios: the weights sum to 0'),
    (((16, 8, 0), (24, 12, 32)), (), r'set 1 \(24, 12, 32\): with gram.ema_teacher'),
])
def test_bad_size_sets_are_one_line_and_write_nothing(tmp_path, sets, ratios, message):
  extra = {'gram.ema_teacher': True} if 'ema_teacher' in message else {}
  config = sets_config(**{'crops.size_sets': sets, 'crops.size_set_ratios': ratios, **extra})
  with pytest.raises(ConfigError, match=message) as err:
    validate(config, n_devices=8)
  assert '\n' not in str(err.value)
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
