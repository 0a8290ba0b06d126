"""What a run promises (README): a damaged checkpoint is never resumed, a config that changes the
training state is refused by name, a diverging run never saves, every bad config is one line
before compiling, and SIGTERM at start-up stops with a message. Each test feeds the failure and
checks the message and that no checkpoint or finished work was lost or moved."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_config
from dino_jax import checkpointing, checksum, train
from dino_jax.validate import ConfigError, validate


@pytest.fixture(scope='module')
def trained(tmp_path_factory, digits_npz):
  """An 8-step run with checkpoints at 4 and 8: (workdir, overrides)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  overrides = {'data.source': f'npz:{digits_npz}', 'checkpoint_every': 4}
  train.train_and_evaluate(tiny_config(**overrides), workdir)
  return workdir, overrides


def snapshot(directory):
  """{relative path: bytes} of every file below `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, directory)] = fh.read()
  return out


def metric_lines(workdir):
  with open(f'{workdir}/metrics.jsonl') as f:
    return [json.loads(l) for l in f]


# -- 1. silent corruption ------------------------------------------------------------------

def test_checksums_are_layout_independent_and_see_one_changed_bit():
  tree = {'w': jnp.arange(128, dtype=jnp.float32).reshape(16, 8) / 7,
          'b': jnp.ones(3, jnp.bfloat16),
          'step': jnp.int32(3), 'rng': jax.random.PRNGKey(1)}
  sums = checksum.tree_checksums(tree)
  assert set(sums) == {'w', 'b', 'step', 'rng'}
  mesh = jax.make_mesh((8,), ('d',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = dict(tree, w=jax.device_put(tree['w'], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('d'))))
  assert checksum.tree_checksums(sharded) == sums
  bits = np.asarray(tree['w']).view(np.uint32).copy()
  bits[5, 3] ^= 1  # one flipped bit
  flipped = dict(tree, w=jnp.asarray(bits.view(np.float32)))
  assert checksum.mismatches(flipped, sums) == ['w']
  swapped = dict(tree, w=tree['w'][::-1])  # same values, other places
  assert checksum.mismatches(swapped, sums) == ['w']


def _overwrite_middle(directory, n=4096):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  with open(largest, 'r+b') as f:
    f.seek(max(0, size // 2 - n // 2))
    f.write(np.random.default_rng(0).integers(0, 256, min(n, size), np.uint8).tobytes())


def _rewrite_one_value(step_dir):
  """Values changed inside a well-formed checkpoint: what a flipped block on disk can give
  when the file format reads it back without complaint."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state_dir = os.path.join(step_dir, 'state')
  ckpt = ocp.StandardCheckpointer()
  tree = ckpt.restore(state_dir)
  kernel = np.array(tree['params']['head']['last_layer']['weight_v'])
  kernel[0, :3] = [3.3e38, np.nan, -1.0]
  tree['params']['head']['last_layer']['weight_v'] = kernel
  ckpt.save(state_dir + '.new', tree)
  ckpt.wait_until_finished()
  ckpt.close()
  shutil.rmtree(state_dir)
  os.rename(state_dir + '.new', state_dir)


@pytest.mark.parametrize('damage', ['rewrite_values', 'overwrite_4k'])
def test_corrupt_newest_checkpoint_is_set_aside_and_the_previous_resumed(tmp_path, trained,
                                                                         capsys, damage):
  src, overrides = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(src, workdir)
  step8 = os.path.join(workdir, 'checkpoints', '8')
  if damage == 'rewrite_values':
    _rewrite_one_value(step8)
  else:
    _overwrite_middle(os.path.join(step8, 'state'))
  damaged = snapshot(step8)
  state = train.train_and_evaluate(tiny_config(**overrides, epochs=3), workdir)  # to step 12
  out = capsys.readouterr().out
  assert 'checkpoint 8' in out and 'is damaged' in out and 'resumed from' in out, out
  if damage == 'rewrite_values':
    assert 'checksum mismatch in 1 array(s): params/head/last_layer/weight_v' in out
  assert snapshot(os.path.join(workdir, 'checkpoints', '8.damaged')) == damaged  # kept as is
  assert int(state.step) == 12
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  lines = metric_lines(workdir)
  assert [l['step'] for l in lines if l.get('event') == 'start'][-1] == 4
  # a rerun does not meet the damaged checkpoint again
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(**overrides, epochs=3), workdir)
  assert 'damaged' not in capsys.readouterr().out


# -- 2. a config that changes the training state's structure ---------------------------------

@pytest.mark.parametrize('field,value,message', [
    ('optim.clip_grad', 0.0, 'optim.clip_grad: checkpoint 3.0, this run 0.0'),
    ('optim.layer_decay', 0.9, 'optim.layer_decay: checkpoint 1.0, this run 0.9'),
])
def test_state_structure_change_is_refused_by_name_touching_nothing(tmp_path, trained, field,
                                                                    value, message):
  src, overrides = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(src, workdir)
  before = snapshot(workdir)
  with pytest.raises(checkpointing.CheckpointMismatchError) as e:
    train.train_and_evaluate(tiny_config(**overrides, **{field: value}), workdir)
  text = str(e.value)
  assert message in text and 'training state does not fit this config' in text
  assert '\n' not in text
  after = snapshot(workdir)
  assert {k: v for k, v in after.items() if not k.startswith('tensorboard')} == \
         {k: v for k, v in before.items() if not k.startswith('tensorboard')}


# -- 3. a diverging run never saves ------------------------------------------------------------

def test_check_sane_refuses_non_finite_and_runaway_norms():
  ok = {'loss': 4.0, 'grad_norm': 1.0, 'param_norm': 30.0, 'teacher_param_norm': 30.0}
  train.check_sane(10, ok, reference_norm=20.0, max_growth=100.0)
  for key in ok:
    with pytest.raises(train.DivergenceError, match=f'{key} is nan at step 10'):
      train.check_sane(10, {**ok, key: float('nan')}, 20.0, 100.0)
  with pytest.raises(train.DivergenceError,
                     match=r'parameter norm is 5.6e\+28 at step 10.*last good checkpoint'):
    train.check_sane(10, {**ok, 'param_norm': 5.6e28}, 20.0, 100.0)


def test_runaway_parameters_stop_the_run_before_a_save(tmp_path, digits_npz):
  """Finite but exploding parameters (lr 10, no clipping) must not reach a checkpoint; the
  warmup's first step (lr 0) gives one good checkpoint before they explode."""
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', 'optim.lr': 10.0,
                          'optim.warmup_epochs': 1, 'optim.clip_grad': 0.0,
                          'checkpoint_every': 1, 'max_param_growth': 3.0})
  with pytest.raises(train.DivergenceError, match='stopping without saving'):
    train.train_and_evaluate(config, str(tmp_path))
  mngr = checkpointing.manager(str(tmp_path))
  steps = mngr.all_steps()
  mngr.close()
  norms = {l['step']: l['param_norm'] for l in metric_lines(tmp_path) if 'param_norm' in l}
  assert steps  # the good step before the explosion was saved, the exploded ones were not
  for step in steps:  # every saved step was checked: finite and within the growth limit
    assert np.isfinite(norms[step]) and norms[step] <= 3.0 * norms[1]


# -- 5. every bad config is one line before compiling ----------------------------------------

@pytest.mark.parametrize('field,value,message', [
    ('data.source', 'npz:/no/such/file.npz', "config.data.source: no such file or folder "
                                              "'/no/such/file.npz'"),
    ('mesh.fsdp', 3, 'config.mesh: data=2 x fsdp=3 does not use the 8 available devices'),
    ('model.head_layers', 0, 'config.model.head_layers: must be >= 1, got 0'),
    ('knn.batch_size', 0, 'config.knn.batch_size: must be positive, got 0'),
    ('optim.warmup_epochs', -1, 'config.optim.warmup_epochs: -1 is not in [0, epochs=2]'),
    ('max_param_growth', 1.0, 'config.max_param_growth: must be > 1'),
    ('crops.hue', 0.7, 'config.crops.hue'),
    ('optim.b2', 1.0, 'config.optim.b1: Adam betas'),
    ('optim.schedules', 'linear', "config.optim.schedules: 'linear' is not one of ['cosine', 'constant']"),
])
def test_more_config_errors_name_the_field(field, value, message):
  with pytest.raises(ConfigError) as e:
    validate(tiny_config(**{field: value}), n_devices=8)
  assert str(e.value).startswith(message), str(e.value)
  assert '\n' not in str(e.value)


def _cli(tmp_path, *args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'dino_jax.main', f'--config={REPO}/configs/cpu.py',
                         f'--workdir={tmp_path}/w', *args],
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize('args,message', [
    (['--config.optim.lrr=1'], "error: bad config override --config.optim.lrr=1: the config "
                               "has no field 'lrr' (Did you mean \"lr\" instead of \"lrr\"?)"),
    (['--config.mesh.fsdp=3'], 'error: config.mesh: data=2 x fsdp=3 does not use the 8 '
                               'available devices'),  # conftest's 8 CPU devices
    (['--config.data.source=npz:missing.npz'], "error: config.data.source: no such file or "
                                               "folder 'missing.npz'"),
])
def test_cli_bad_configs_are_one_line_before_anything_is_written(tmp_path, args, message):
  proc = _cli(tmp_path, *args)
  assert proc.returncode in (1, 2)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith(message), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_sigterm_during_start_up_stops_with_one_line(tmp_path):
  proc = subprocess.Popen([sys.executable, '-m', 'dino_jax.main',
                           f'--config={REPO}/configs/cpu.py', f'--workdir={tmp_path}/w'],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(1.5)  # importing, well before the first step
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143
  assert 'SIGTERM during start-up, before the first step: stopped with nothing to save' in err
  assert 'Traceback' not in err
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_restore_raw_reads_an_8_device_checkpoint_in_a_1_device_process(trained):
  """Export tools read checkpoints where they are, often on another machine (soak.py found
  orbax refusing the saved topology)."""
  src, _ = trained
  code = ('from dino_jax import checkpointing; import jax; '
          f's, c = checkpointing.restore_raw({src!r}); '
          'print(jax.device_count(), len(jax.tree.leaves(s)), int(s["step"]))')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  n_devices, n_leaves, step = proc.stdout.split()[-3:]
  assert n_devices == '1' and int(n_leaves) > 10 and step == '8'
