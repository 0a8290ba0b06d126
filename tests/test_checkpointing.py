"""Checkpoints never lose a run: exact resume after SIGKILL and SIGTERM, damaged checkpoints,
config mismatches, retention, restore onto fewer devices, init_from, load_model and export."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import dino_jax
from conftest import REPO, tiny_config
from dino_jax import checkpointing, image_ops, inference, paths, sharding, train, weights
from dino_jax.metrics import MetricWriter

TESTS = os.path.dirname(os.path.abspath(__file__))
LONG = {'epochs': 16, 'checkpoint_every': 32}  # 64 steps, one checkpoint half way


@pytest.fixture(scope='module')
def trained(tmp_path_factory, digits_npz):
  """An 8-step run with checkpoints at 4 and 8: (workdir, config, final state)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', 'checkpoint_every': 4})
  return workdir, config, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, digits_npz):
  """The uninterrupted 64-step run the killed runs must reproduce."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', **LONG})
  return workdir, train.train_and_evaluate(config, workdir)


def losses(workdir):
  with open(f'{workdir}/metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  return {l['step']: l['loss'] for l in lines if 'loss' in l}


def assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def start_cli(tmp_path, overrides):
  """`python -m dino_jax.main` on a config file that builds tiny_config(**overrides)."""
  cfg = tmp_path / 'config.py'
  cfg.write_text(f'import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import tiny_config\n'
                 f'def get_config():\n  return tiny_config(**{overrides!r})\n')
  return subprocess.Popen(
      [sys.executable, '-m', 'dino_jax.main', f'--config={cfg}', f'--workdir={tmp_path}/w'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, condition, what, timeout=1200):
  t0 = time.time()
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f'the run ended before {what}:\n{proc.stdout.read()[-3000:]}')
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.02)


def resume_and_compare(tmp_path, config, reference, first_new_step):
  ref_dir, ref_state = reference
  resumed = train.train_and_evaluate(config, f'{tmp_path}/w')
  assert_same_state(ref_state, resumed)
  ref_losses, got = losses(ref_dir), losses(f'{tmp_path}/w')
  steps = [s for s in got if s >= first_new_step]
  assert steps and max(steps) == 64
  assert all(got[s] == ref_losses[s] for s in steps)


def test_sigkill_after_checkpoint_then_resume_is_bitwise_exact(tmp_path, digits_npz, reference):
  overrides = {'data.source': f'npz:{digits_npz}', **LONG}
  proc = start_cli(tmp_path, overrides)
  wait_for(proc, lambda: (tmp_path / 'w' / 'checkpoints' / '32').is_dir(), 'checkpoint 32')
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  mngr = checkpointing.manager(str(tmp_path / 'w'))
  assert mngr.all_steps() == [32]  # the kill came before the end
  mngr.close()
  resume_and_compare(tmp_path, tiny_config(**overrides), reference, 33)


def test_sigterm_saves_at_the_next_step_and_resumes_exactly(tmp_path, digits_npz, reference):
  overrides = {'data.source': f'npz:{digits_npz}', **LONG}
  proc = start_cli(tmp_path, overrides)
  metrics = tmp_path / 'w' / 'metrics.jsonl'
  wait_for(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 7,
           'step 7')
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert 'preempted: saved step' in out
  mngr = checkpointing.manager(str(tmp_path / 'w'))
  saved = mngr.latest_step()
  mngr.close()
  logged = max(losses(tmp_path / 'w'))
  assert 6 <= saved < 64 and saved in (logged, logged + 1)  # at most one step of work lost
  resume_and_compare(tmp_path, tiny_config(**overrides), reference, saved + 1)


def _truncate_largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, trained, capsys):
  src, config, _ = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(src, workdir)
  _truncate_largest_file(os.path.join(workdir, 'checkpoints', '8', 'state'))
  config = tiny_config(**{**_overrides(config), 'epochs': 3})  # continue to step 12
  state = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'checkpoint 8' in out and 'is damaged' in out and 'resumed from' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '8.damaged'))  # kept, not deleted
  assert int(state.step) == 12
  with open(f'{workdir}/metrics.jsonl') as f:
    lines = [json.loads(l) for l in f]
  starts = [l['step'] for l in lines if l.get('event') == 'start']
  assert starts[-1] == 4, starts  # resumed from 4, not from scratch
  assert [l['step'] for l in lines if 'loss' in l] == list(range(1, 13))  # each step once


def _overrides(config):
  return {'data.source': config.data.source, 'checkpoint_every': config.checkpoint_every}


def test_config_that_cannot_resume_is_a_clear_error_and_loses_nothing(tmp_path, trained):
  src, config, _ = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(src, workdir)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  bad = tiny_config(**{**_overrides(config), 'model.out_dim': 128})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'model\.out_dim: checkpoint 64, this run 128'):
    train.train_and_evaluate(bad, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_cli_reports_a_mismatched_workdir_in_one_line(tmp_path, trained):
  src, config, _ = trained
  shutil.copytree(src, tmp_path / 'w')
  proc = start_cli(tmp_path, {**_overrides(config), 'batch_size': 32})
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 1
  assert 'error: ' in out and 'batch_size: checkpoint 16, this run 32' in out


def test_retention_keeps_the_newest_and_every_kth(tmp_path, digits_npz):
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', 'epochs': 3,
                          'checkpoint_every': 2, 'keep_checkpoints': 2,
                          'keep_checkpoint_every': 4})
  train.train_and_evaluate(config, str(tmp_path))
  mngr = checkpointing.manager(str(tmp_path))
  assert sorted(mngr.all_steps()) == [4, 8, 10, 12]
  mngr.close()


def test_restore_8_device_state_onto_4_devices(trained):
  workdir, config, state = trained
  config = tiny_config(**{**_overrides(config), 'mesh.fsdp': 2})
  mesh4 = sharding.make_mesh(-1, 2, devices=jax.devices()[:4])
  run = train.build(config, mesh4)
  abstract = checkpointing.abstract_with_shardings(jax.eval_shape(run.init_fn),
                                                   run.state_shardings)
  mngr = checkpointing.manager(workdir)
  restored = checkpointing.restore(mngr, abstract)
  mngr.close()
  assert_same_state(state, restored.state)
  for leaf in jax.tree.leaves(restored.state):
    assert leaf.sharding.device_set == set(jax.devices()[:4])
  # and it trains on: one step on the 4-device mesh runs and stays finite
  batch = next(train.data.train_iterator(run.train_source, canvas_size=config.data.canvas_size,
                                         global_batch=config.batch_size, seed=0, start_step=8))
  new_state, metrics = run.step_fn(restored.state, sharding.to_global(batch, mesh4))
  assert int(new_state.step) == 9 and np.isfinite(float(metrics['loss']))


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path, trained):
  src, config, state = trained
  config = tiny_config(**{**_overrides(config), 'init_from': src})
  run = train.build(config)
  mngr = checkpointing.manager(str(tmp_path))
  start, saved_data, mngr = train._start_state(run, str(tmp_path), mngr)  # pylint: disable=protected-access
  assert saved_data is None
  mngr.close()
  assert int(start.step) == 0
  assert_same_state(state.params, start.params)
  assert_same_state(state.teacher_params, start.teacher_params)
  assert not np.any(np.asarray(start.center))  # fresh center and optimizer


def test_load_model_gives_the_features_training_computed(trained):
  workdir, config, state = trained
  run = train.build(config)
  canvas = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
  hw = np.tile(np.array([[16, 12]], np.int32), (8, 1))
  expected = np.asarray(run.feature_fn(state.teacher_params, canvas, hw))
  model, saved = dino_jax.load_model(workdir)
  assert saved.model.arch == config.model.arch
  images = image_ops.center_view(canvas, hw, config.crops.global_size,
                                 config.crops.eval_crop_fraction)
  cls = np.asarray(model(images).cls)
  np.testing.assert_allclose(cls / np.linalg.norm(cls, axis=-1, keepdims=True), expected,
                             atol=1e-6)
  student, _ = dino_jax.load_model(os.path.join(workdir, 'checkpoints', '8'), which='student')
  np.testing.assert_array_equal(np.asarray(student.pos_embed[...]),
                                np.asarray(state.params['backbone']['pos_embed']))
  network, _ = dino_jax.load_model(workdir, step=4, with_head=True)
  assert network.head is not None


def test_export_round_trip_and_bad_files(tmp_path, trained):
  workdir, _, _ = trained
  out = tmp_path / 'teacher.msgpack'
  inference.main(['export', f'--path={workdir}', f'--out={out}'])
  exported, cfg = dino_jax.load_model(str(out))
  model, _ = dino_jax.load_model(workdir)
  images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  a, b = model(images, return_attention=True), exported(images, return_attention=True)
  np.testing.assert_array_equal(np.asarray(a.cls), np.asarray(b.cls))
  np.testing.assert_array_equal(np.asarray(inference.cls_attention(a)),
                                np.asarray(inference.cls_attention(b)))
  assert inference.cls_attention(a).shape == (2, 3, 16)
  assert cfg.model.patch_size == 4
  junk = tmp_path / 'junk.msgpack'
  junk.write_bytes(os.urandom(64))
  with pytest.raises(ValueError, match='is not a dino_jax export file'):
    dino_jax.load_model(str(junk))
  with pytest.raises(FileNotFoundError, match='neither a dino_jax workdir'):
    dino_jax.load_model(str(tmp_path))


def test_export_to_a_bucket_and_load_it_back(bucket, trained, capsys):
  """inference export --out=gs://... writes one object; load_model and read_config take the
  URL (evaluate --model=gs://.../x.msgpack goes through the same calls)."""
  url, root = bucket
  workdir, _, _ = trained
  inference.main(['export', f'--path={workdir}', f'--out={url}/models/teacher.msgpack'])
  assert f'wrote {url}/models/teacher.msgpack' in capsys.readouterr().out
  assert (root / 'models' / 'teacher.msgpack').is_file()
  exported, cfg = dino_jax.load_model(f'{url}/models/teacher.msgpack')
  model, _ = dino_jax.load_model(workdir)
  images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(exported(images).cls), np.asarray(model(images).cls))
  assert weights.read_config(f'{url}/models/teacher.msgpack').model.to_dict() == \
      cfg.model.to_dict()


def test_preprocess_any_size_grayscale_or_rgb():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (40, 30, 3), np.uint8), rng.integers(0, 256, (20, 50), np.uint8)]
  x = inference.preprocess(images, size=16)
  assert x.shape == (2, 16, 16, 3) and np.isfinite(np.asarray(x)).all()


def test_init_from_converted_official_weights(tmp_path, trained):
  """A file written by `python -m dino_jax.convert import` (here: made from a run's teacher)
  starts student and teacher; a model it does not fit is a clear error."""
  src, config, state = trained
  path = str(tmp_path / 'weights.safetensors')
  weights.save(weights.from_workdir(src), path)
  run = train.build(tiny_config(**{**_overrides(config), 'init_from': path}))
  mngr = checkpointing.manager(str(tmp_path / 'w'))
  start, _, mngr = train._start_state(run, str(tmp_path / 'w'), mngr)  # pylint: disable=protected-access
  mngr.close()
  assert_same_state(state.teacher_params['backbone'], start.params['backbone'])
  assert_same_state(state.teacher_params['backbone'], start.teacher_params['backbone'])
  assert int(start.step) == 0
  converted, cfg = dino_jax.load_model(path)  # the evaluate CLI's route for official weights
  teacher, _ = dino_jax.load_model(src)
  images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(converted(images).cls), np.asarray(teacher(images).cls),
                             atol=1e-6)
  assert cfg.model.patch_size == 4 and cfg.crops.global_size == 224
  bad = train.build(tiny_config(**{**_overrides(config), 'init_from': path,
                                   'model.arch': 'vit_tiny'}))
  mngr = checkpointing.manager(str(tmp_path / 'w2'))
  with pytest.raises(checkpointing.CheckpointMismatchError, match='config.init_from: '):
    train._start_state(bad, str(tmp_path / 'w2'), mngr)  # pylint: disable=protected-access
  mngr.close()


def test_check_resumable_names_critical_fields_and_tolerates_new_ones():
  saved = {'model': {'arch': 'vit_small', 'out_dim': 10}, 'optim': {'lr': 1.0}, 'seed': 0}
  newer = {'model': {'arch': 'vit_small', 'out_dim': 10, 'remat': False},  # a field added later
           'optim': {'lr': 2.0}, 'seed': 0}  # lr may change on resume
  checkpointing.check_resumable(saved, newer, 'W')
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"W holds a run this config cannot resume \(model\.arch: checkpoint "
                           r"'vit_small', this run 'vit_base'; seed: checkpoint 0, this run 1\)"):
    checkpointing.check_resumable(saved, {**newer, 'seed': 1,
                                          'model': {'arch': 'vit_base', 'out_dim': 10}}, 'W')


def test_load_model_of_a_checkpoint_written_before_new_config_fields(tmp_path, trained):
  """A checkpoint whose saved config lacks fields newer code added loads with their defaults."""
  src, _, _ = trained
  workdir = tmp_path / 'old'
  shutil.copytree(src, workdir)
  for cfg in workdir.glob('checkpoints/*/config/metadata'):
    saved = json.loads(cfg.read_text())
    del saved['model']['remat'], saved['model']['ffn']
    cfg.write_text(json.dumps(saved))
  model, config = dino_jax.load_model(str(workdir))
  assert config.model.remat == 'none' and config.model.ffn == 'mlp'
  images = np.zeros((1, 16, 16, 3), np.float32)
  reference, _ = dino_jax.load_model(src)
  np.testing.assert_array_equal(np.asarray(model(images).cls), np.asarray(reference(images).cls))


def test_bucket_workdirs_keep_their_scheme(tmp_path, monkeypatch):
  """gs:// workdirs must reach orbax as URLs (os.path.abspath made them ./gs:/..., a local
  folder lost with the VM); bucket objects cannot be appended to, so metrics.jsonl is
  rewritten whole there, keeping the lines of the run being resumed."""
  assert checkpointing.checkpoint_dir('gs://bucket/run') == 'gs://bucket/run/checkpoints'
  assert checkpointing.checkpoint_dir('rel/run') == os.path.abspath('rel/run/checkpoints')
  monkeypatch.setattr(paths, 'is_remote', lambda path: True)
  w = MetricWriter(str(tmp_path))
  assert w.remote
  w.write(1, {'loss': 2.0})
  w.write(2, {'loss': 1.5})
  w.close()
  w = MetricWriter(str(tmp_path))  # a resumed run
  w.write(3, {'loss': 1.0})
  w.close()
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines] == [1, 2, 3]
  assert lines[-1]['loss'] == 1.0


def test_check_fits_names_the_first_misfit():
  model = {'a': jax.ShapeDtypeStruct((2, 3), np.float32), 'b': {'c': np.zeros(4)}}
  checkpointing.check_fits({'a': np.ones((2, 3)), 'b': {'c': np.ones(4)}}, model, 'F')
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=re.escape("F: ['b']['c'] is (5,), the model has (4,)")):
    checkpointing.check_fits({'a': np.ones((2, 3)), 'b': {'c': np.ones(5)}}, model, 'F')
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='F: the parameter tree does not fit the model'):
    checkpointing.check_fits({'a': np.ones((2, 3))}, model, 'F')


def _one_checkpoint(workdir):
  """A workdir with one small checkpoint at step 1: (abstract state, config)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  state = {'a': np.arange(20000, dtype=np.float32), 'b': np.ones((30, 40), np.float32)}
  state = jax.tree.map(jax.numpy.asarray, state)
  config = ml_collections.ConfigDict({'model': {'arch': 'x'}, 'keep_checkpoints': 3,
                                      'keep_checkpoint_every': 0})
  mngr = checkpointing.manager(workdir)
  checkpointing.save(mngr, 1, state, config, {'next_step': 1})
  mngr.wait_until_finished()
  mngr.close()
  return checkpointing.abstract_with_shardings(state), config


def test_a_bug_in_the_checks_propagates_and_sets_nothing_aside(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'w')
  abstract, config = _one_checkpoint(workdir)

  def buggy(*args, **kwargs):
    raise TypeError('a bug in our own check')
  monkeypatch.setattr(checkpointing, 'check_structure', buggy)
  mngr = checkpointing.manager(workdir)
  with pytest.raises(TypeError, match='a bug in our own check'):
    checkpointing.restore_latest(workdir, mngr, abstract, config)
  mngr.close()
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1']


def test_a_truncated_array_file_is_damage_and_set_aside(tmp_path, capsys):
  workdir = str(tmp_path / 'w')
  abstract, config = _one_checkpoint(workdir)
  state_dir = os.path.join(workdir, 'checkpoints', '1', 'state')
  files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)
  mngr = checkpointing.manager(workdir)
  restored, mngr = checkpointing.restore_latest(workdir, mngr, abstract, config)
  mngr.close()
  assert restored is None and 'checkpoint 1' in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1.damaged']
  assert checkpointing.is_damage(json.JSONDecodeError('x', '', 0))
  assert checkpointing.is_damage(checkpointing.DamagedCheckpointError('checksum mismatch'))
  assert not checkpointing.is_damage(TypeError('bug'))
  assert not checkpointing.is_damage(AttributeError('bug'))
