"""End to end: the training loop, its logs, k-NN, checkpoint, config errors and NaN handling."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config
from dino_jax import checkpointing, train
from dino_jax.metrics import MetricWriter
from dino_jax.validate import ConfigError, validate


def read_metrics(workdir):
  with open(f'{workdir}/metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def test_train_logs_evaluates_and_checkpoints(tmp_path, digits_npz, capsys):
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', 'eval_every': 4})
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 8  # 64 images / batch 16 = 4 steps per epoch, 2 epochs
  lines = read_metrics(tmp_path)
  train_lines = [l for l in lines if 'loss' in l]
  assert [l['step'] for l in train_lines] == list(range(1, 9))
  for key in ('loss', 'lr', 'wd', 'momentum', 'teacher_temp', 'teacher_entropy', 'kl',
              'img_per_s'):
    assert all(np.isfinite(l[key]) for l in train_lines), key
  knn_lines = [l for l in lines if 'knn_top1' in l]
  assert [l['step'] for l in knn_lines] == [0, 4, 8]
  assert all(0 <= l['knn_top1'] <= 100 for l in knn_lines)
  out = capsys.readouterr().out
  assert '[8/8]' in out and 'ETA' in out and 'k-NN' in out
  assert list((tmp_path / 'tensorboard').iterdir())
  # the final checkpoint restores to exactly the returned state
  run = train.build(config)
  mngr = checkpointing.manager(str(tmp_path))
  assert checkpointing.latest_step(mngr) == 8
  abstract = checkpointing.abstract_with_shardings(jax.eval_shape(run.init_fn),
                                                   run.state_shardings)
  restored = checkpointing.restore(mngr, abstract)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored.config['model']['arch'] == config.model.arch
  assert restored.data == {'next_step': 8, 'seed': 0, 'num_records': 64, 'global_batch': 16}


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits_npz):
  # the warmup's first step has lr 0 (a good checkpoint at step 1), the next ones explode
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', 'optim.lr': 1e30,
                          'optim.warmup_epochs': 1, 'optim.clip_grad': 0.0,
                          'checkpoint_every': 1})
  with pytest.raises(train.DivergenceError, match='last good checkpoint is intact'):
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = read_metrics(tmp_path)[-1]['step'] + 1 if read_metrics(tmp_path) else 1
  mngr = checkpointing.manager(str(tmp_path))
  steps = mngr.all_steps()
  assert steps and max(steps) < bad_step
  run = train.build(config)
  abstract = checkpointing.abstract_with_shardings(jax.eval_shape(run.init_fn),
                                                   run.state_shardings)
  restored = checkpointing.restore(mngr, abstract)
  assert int(restored.state.step) == max(steps)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))


@pytest.mark.parametrize('field,value,message', [
    ('model.arch', 'vit_gigantic', 'config.model.arch: unknown arch'),
    ('crops.global_size', 18, 'config.crops.global_size: crop size 18 is not divisible'),
    ('crops.local_size', 6, 'config.crops.local_size: crop size 6 is not divisible'),
    ('batch_size', 12, 'config.batch_size: global batch 12 is not divisible by the 8 devices'),
    ('data.source', 'ftp:somewhere', 'config.data.source'),
    ('crops.global_scale', (0.5, 1.5), 'config.crops.global_scale'),
    ('dtype', 'float8', 'config.dtype'),
    ('init_from', '/no/such/run', "config.init_from: '/no/such/run' is neither"),
    ('init_from', 'gs://bucket/w.safetensors', 'config.init_from'),
    ('time_limit_minutes', -5.0, 'config.time_limit_minutes: must be >= 0'),
])
def test_config_errors_name_the_field(field, value, message):
  config = tiny_config(**{field: value})
  with pytest.raises(ConfigError) as e:
    validate(config, n_devices=8)
  assert str(e.value).startswith(message)
  assert '\n' not in str(e.value)


def test_bucket_init_from_passes_validation():
  """A gs:// workdir cannot be checked from here without its filesystem: restore reads it."""
  validate(tiny_config(**{'init_from': 'gs://bucket/run'}), n_devices=8)


def test_cli_reports_config_error_before_compiling(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'dino_jax.main', f'--config={REPO}/configs/cpu.py',
       f'--workdir={tmp_path}/w', '--config.crops.global_size=30'],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 1
  assert 'error: config.crops.global_size: crop size 30 is not divisible by ' \
         'model.patch_size=8' in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_dataset_smaller_than_a_batch_is_a_clear_error(tmp_path):
  path = tmp_path / 'tiny.npz'
  np.savez(path, x_train=np.zeros((5, 16, 16, 3), np.uint8))
  config = tiny_config(**{'data.source': f'npz:{path}'})
  with pytest.raises(ValueError, match='fewer than one global batch'):
    train.build(config)


def test_restart_resumes_from_latest_checkpoint_exactly(tmp_path, digits_npz):
  """Delete the final checkpoint of an 8-step run; running again resumes at step 4 and ends
  with bitwise the same state (data order and keys are functions of the step)."""
  import shutil  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', 'checkpoint_every': 4})
  full = train.train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(tmp_path / 'checkpoints' / '8')
  resumed = train.train_and_evaluate(config, str(tmp_path))
  lines = read_metrics(tmp_path)
  # the second run started at 4 and did steps 5..8; the first run's lines past its last
  # checkpoint (5..8) were dropped, so every step is logged once, with the resumed values
  assert [l['step'] for l in lines if l.get('event') == 'start'] == [0, 4]
  assert [l['step'] for l in lines if 'loss' in l] == list(range(1, 9))
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_time_limit_stops_evaluates_saves_and_resumes(tmp_path, digits_npz, capsys):
  """A run past its wall-clock budget stops at the next log step (every step here), evaluates
  and saves there; the same command without the limit goes on to the end."""
  source = {'data.source': f'npz:{digits_npz}'}
  stopped = train.train_and_evaluate(tiny_config(**source, time_limit_minutes=1e-9),
                                     str(tmp_path))
  assert int(stopped.step) == 1
  assert 'time limit of 1e-09 min reached at step 1 of 8: evaluating and saving' in \
      capsys.readouterr().out
  assert checkpointing.latest_step(checkpointing.manager(str(tmp_path))) == 1
  lines = read_metrics(tmp_path)
  assert [l['step'] for l in lines if l.get('event') == 'time_limit'] == [1]
  assert [l['step'] for l in lines if 'knn_top1' in l] == [1]
  resumed = train.train_and_evaluate(tiny_config(**source), str(tmp_path))
  assert int(resumed.step) == 8
  lines = read_metrics(tmp_path)
  assert [l['step'] for l in lines if l.get('event') == 'start'] == [0, 1]
  assert [l['step'] for l in lines if 'loss' in l] == list(range(1, 9))
  assert [l['step'] for l in lines if 'knn_top1' in l] == [1, 8]


@pytest.mark.parametrize('name', ['vit_s16', 'cpu', 'cifar'])
def test_shipped_configs_are_valid(name):
  from dino_jax import config_file  # pylint: disable=import-outside-toplevel
  config = config_file.load(REPO / 'configs' / f'{name}.py')
  validate(config, n_devices=8)
  if name == 'vit_s16':  # the official defaults
    assert (config.model.arch, config.model.patch_size, config.model.out_dim) == \
        ('vit_small', 16, 65536)
    assert config.optim.lr * config.batch_size / 256 == pytest.approx(1e-3)
    assert (config.crops.n_local, config.crops.local_size, config.epochs) == (8, 96, 100)


def test_metric_writer_drops_lines_past_the_resumed_step(tmp_path):
  w = MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    w.write(step, {'loss': float(step)})
  w.event(3, 'collapse_warning', symptom='uniform', message='m')
  w.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "lo')  # killed mid-line
  w = MetricWriter(str(tmp_path))
  w.resume_at(2)
  w.write(3, {'loss': 30.0})
  w.close()
  lines = read_metrics(tmp_path)
  assert [(l['step'], l['loss']) for l in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_small_data_recipes_keep_what_makes_them_learn():
  """The measured fixes of README "Training on small data": KoLeo on, prototypes frozen for
  the whole run, the collapse watchdog on its defaults; cifar.py is the DINOv2 objective."""
  from dino_jax import config_file  # pylint: disable=import-outside-toplevel
  for name in ('cpu', 'cifar'):
    c = config_file.load(REPO / 'configs' / f'{name}.py')
    assert c.loss.koleo_weight == 0.1 and c.optim.freeze_last_layer >= c.epochs
    assert (c.watchdog.margin, c.watchdog.low_margin, c.watchdog.patience, c.watchdog.stop) == \
        (0.1, 0.02, 3, False)
  c = config_file.load(REPO / 'configs' / 'cifar.py')
  assert c.loss.ibot_weight == 1.0 and c.data.source.endswith('cifar10_subset.npz')
  assert c.epochs * (10000 // c.batch_size) == 5616
  # the 30-minute budget holds on a slow day: stop, evaluate and save within it
  assert 0 < c.time_limit_minutes <= 29
