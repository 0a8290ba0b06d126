"""Model files (dino_jax/weights.py): one .safetensors format written by `inference export` and
`convert import`, the run config as metadata; older msgpack exports still read; a checkpoint's
teacher, student, head and center read from a workdir or a step directory."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from conftest import tiny_config
from dino_jax import checkpointing, convert, inference, models, weights
from dino_jax import state as state_lib


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A checkpoint at step 3 whose teacher differs from its student (no training)."""
  config = tiny_config(**{'model.n_registers': 1})
  student = models.build(config)
  state = state_lib.create(student, optax.adamw(1e-3), config.model.out_dim,
                           jax.random.PRNGKey(0))
  state = state.replace(teacher_params=jax.tree.map(lambda p: p + 1.0, state.teacher_params),
                        center=jnp.full((1, config.model.out_dim), 0.25))
  root = tmp_path_factory.mktemp('run')
  mngr = checkpointing.manager(str(root))
  checkpointing.save(mngr, 3, state, config, {'next_step': 3})
  mngr.wait_until_finished()
  mngr.close()
  return str(root), config, jax.tree.map(np.asarray, state)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_from_workdir_reads_teacher_student_head_and_center(workdir):
  root, config, state = workdir
  w = weights.from_workdir(root)
  assert w.vit == models.vit_config(config, teacher=True) and w.config is None
  assert_trees_equal(w.backbone, state.teacher_params['backbone'])
  assert_trees_equal(w.head, state.teacher_params['head'])
  assert w.head_config == weights.HeadConfig(64, 32, 16, config.model.head_layers)
  np.testing.assert_array_equal(w.center, state.center)
  student = weights.from_workdir(f'{root}/checkpoints/3', which='student', with_config=True)
  assert_trees_equal(student.backbone, state.params['backbone'])
  assert student.config['model']['n_registers'] == 1


def test_inference_export_writes_the_one_format(workdir, tmp_path, capsys):
  root, config, state = workdir
  out = tmp_path / 'teacher.safetensors'
  inference.main(['export', f'--path={root}', f'--out={out}'])
  assert f'wrote {out}' in capsys.readouterr().out
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(out), framework='numpy') as f:
    meta, names = f.metadata(), set(f.keys())
  assert meta['format'] == weights.FORMAT and json.loads(meta['head']) is None
  assert json.loads(meta['config'])['model'] == config.model.to_dict()
  assert names == {'backbone.' + k for k in weights.flat(state.teacher_params['backbone'])}
  model, cfg = weights.load_model(str(out))
  reference, _ = weights.load_model(root)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(model(images).cls), np.asarray(reference(images).cls))
  assert cfg.model.to_dict() == config.model.to_dict() and cfg.crops.global_size == 16
  assert weights.read_config(str(out)).model.n_registers == 1
  assert convert.main(['export', str(out), str(tmp_path / 'official.safetensors')]) == 0


def test_msgpack_exports_of_older_versions_still_load(workdir, tmp_path):
  root, config, state = workdir
  old = tmp_path / 'teacher.msgpack'  # as `inference export` wrote it before .safetensors
  old.write_bytes(serialization.msgpack_serialize({
      'format': 'dino_jax.backbone.v1', 'which': 'teacher', 'step': 3,
      'config': json.dumps(config.to_dict()), 'params': state.teacher_params['backbone']}))
  w = weights.read_file(old)
  assert w.vit == models.vit_config(config, teacher=True) and w.head is None
  assert_trees_equal(w.backbone, state.teacher_params['backbone'])
  model, cfg = weights.load_model(str(old))
  reference, _ = weights.load_model(root)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(model(images).cls), np.asarray(reference(images).cls))
  assert cfg.model.n_registers == 1
  again = tmp_path / 'again.safetensors'  # rewritten in the one format, contents unchanged
  weights.save(w, again)
  assert_trees_equal(weights.read_file(again).backbone, w.backbone)


def test_converted_official_weights_carry_no_run_config(workdir, tmp_path):
  root, _, _ = workdir
  path = tmp_path / 'official_like.safetensors'
  weights.save(weights.from_workdir(root), path, source='test')
  w = weights.read_file(path)
  assert w.config is None and w.center.shape == (1, 64)
  cfg = weights.config_of(w)
  assert cfg.crops.global_size == 224 and cfg.model.n_registers == 1
  assert cfg.model.out_dim == 64 and cfg.model.head_layers == w.head_config.nlayers
