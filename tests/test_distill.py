"""DINOv3 distillation (config.distill): a frozen teacher of its own architecture (a tiny teacher
run trained here) gives the targets; the student sees unmasked crops; teacher_params is the EMA
of the student. Checked: the step's losses against a hand composition from the teacher module
and Sinkhorn-Knopp written here in numpy, the frozen teacher unchanged, the EMA, 1 vs 8
devices, exact resume, and each refused teacher as one line with nothing written."""
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, tiny_config
from dino_jax import (augment, config_file, data, distill, losses, masking, models, objective,
                      sharding, train, weights)
from dino_jax.state import DistillTrainState, TrainState
from dino_jax.validate import ConfigError, validate

IBOT = {'model.mask_token': True, 'loss.ibot_weight': 1.0, 'model.ibot_separate_head': True,
        'model.ibot_out_dim': 32, 'model.ibot_bottleneck_dim': 16}


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory, digits_npz):
  """A tiny teacher run (ViT-pico/4, separate iBOT head, 4 steps on digits)."""
  path = tmp_path_factory.mktemp('teacher')
  train.train_and_evaluate(tiny_config(**IBOT, **{
      'data.source': f'npz:{digits_npz}', 'epochs': 1, 'evals': ()}), str(path))
  return str(path)


def student_config(teacher, digits_npz, **overrides):
  """ViT-nano/4 student of the teacher: same patch size and prototypes, fresh heads, the
  official distillation objective (Sinkhorn-Knopp, KoLeo, iBOT) at 16 px."""
  return tiny_config(**{
      **IBOT, 'model.arch': 'vit_nano', 'distill.teacher': teacher,
      'loss.centering': 'sinkhorn_knopp', 'loss.koleo_weight': 0.1,
      'data.source': f'npz:{digits_npz}', 'evals': (), **overrides})


def np_sinkhorn_knopp(logits, temp, n_iters=3):
  """Sinkhorn-Knopp from its definition: Q = exp(t / temp) with total mass 1; n_iters times
  each prototype to mass 1/K, each sample to mass 1/B; times B (rows sum to 1)."""
  q = np.exp((logits - logits.max()) / temp).astype(np.float64)
  b, k = q.shape
  q /= q.sum()
  for _ in range(n_iters):
    q /= q.sum(0, keepdims=True) * k
    q /= q.sum(1, keepdims=True) * b
  return q * b


def steps(run, state, n, mesh):
  it = data.train_iterator(run.train_source, canvas_size=run.config.data.canvas_size,
                           global_batch=run.config.batch_size, seed=run.config.seed)
  batches, metrics = [], []
  for _ in range(n):
    batch = next(it)
    batches.append(batch)
    state, m = run.step_fn(state, sharding.to_global(batch, mesh))
    metrics.append(jax.device_get(m))
  return state, metrics, batches


def expected_losses(run, start, batch, teacher_dir):
  """The first step's DINO, iBOT and KoLeo terms composed by hand: the teacher network read
  back from its workdir (weights.load_model), its head and iBOT head logits turned into
  targets by the numpy Sinkhorn-Knopp, the student on unmasked crops (masks=None); also the
  iBOT term the student would have had on masked crops."""
  config = run.config
  spec = objective.Objective.from_config(config)
  key = jax.random.fold_in(start.rng, start.step)
  k_aug, k_drop, k_mask = jax.random.split(key, 3)
  g, l = augment.multicrop(k_aug, batch['image'], batch['hw'],
                           augment.AugmentConfig.from_config(config), np.float32)
  masks = masking.batch_masks(k_mask, g.shape[0], spec.mask)
  temp, s_temp = run.schedules.teacher_temp_at(0), run.schedules.student_temp
  teacher, _ = weights.load_model(teacher_dir, with_head=True, dtype='float32')
  t_out = teacher.backbone(g)
  q_cls = np_sinkhorn_knopp(np.asarray(teacher.head(t_out.cls)), temp).astype(np.float32)
  m = np.asarray(masks).reshape(-1)
  t_patches = np.asarray(t_out.patches).reshape(m.size, -1)[m]
  q_patch = np_sinkhorn_knopp(np.asarray(teacher.ibot_head(t_patches)), temp).astype(np.float32)
  per_token = 1.0 / np.repeat(np.asarray(masks).sum(1), np.asarray(masks).shape[1])[m]
  student = nnx.merge(run.student_def, start.params)
  b = config.batch_size
  out = {}
  for name, student_masks in (('unmasked', None), ('masked', masks)):
    g_out, cls = student.backbone_crops(g, l, k_drop, masks=student_masks)
    rows = np.asarray(g_out.patches).reshape(m.size, -1)[m]
    out[name] = {
        'dino_loss': losses.cross_entropy_pairs(student.head(cls), q_cls, s_temp, 2),
        'ibot_loss': losses.ibot_patch_loss(student.ibot_head(rows), q_patch, per_token,
                                            s_temp, g.shape[0]),
        'koleo': sum(losses.koleo(g_out.cls[c * b:(c + 1) * b]) for c in range(2))}
  return out


def test_distill_step_on_1_and_8_devices(teacher_dir, digits_npz):
  """Two steps: the losses are the hand composition (targets from the frozen teacher, student
  unmasked), the frozen teacher is the teacher run's EMA teacher and stays bitwise unchanged,
  teacher_params is the EMA of the student; 8 devices (data 4 x fsdp 2) give the same."""
  config = student_config(teacher_dir, digits_npz, **{'mesh.min_shard_size': 0})
  saved = weights.from_workdir(teacher_dir)
  results = []
  for devices, fsdp in ((jax.devices()[:1], 1), (jax.devices(), 2)):
    mesh = sharding.make_mesh(-1, fsdp, devices=devices)
    run = train.build(config, mesh)
    state = train.init_state(run)
    assert isinstance(state, DistillTrainState)
    params, _ = distill.load(teacher_dir, state.distill_params)
    state = state.replace(distill_params=params)
    start = jax.device_get(state)
    end, metrics, batches = steps(run, state, 2, mesh)
    results.append((run, start, jax.device_get(end), metrics, batches))
  (run, start, s1, m1, batches), (_, _, s8, m8, _) = results
  np.testing.assert_array_equal(start.distill_params['backbone']['cls_token'],
                                saved.backbone['cls_token'])
  for a, b in zip(jax.tree.leaves(start.distill_params['head']), jax.tree.leaves(saved.head)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(start.distill_params), jax.tree.leaves(s1.distill_params)):
    np.testing.assert_array_equal(a, b)
  # one step from `start` (same params, keys and batch) as composed by hand
  want = expected_losses(run, start, batches[0], teacher_dir)
  for k, v in want['unmasked'].items():
    np.testing.assert_allclose(m1[0][k], v, rtol=2e-5, atol=1e-6, err_msg=k)
  assert abs(float(want['masked']['ibot_loss']) - float(m1[0]['ibot_loss'])) > 1e-3
  # teacher_params: EMA of the student, momentum of each step
  t = start.teacher_params
  one, _, _ = steps(run, jax.device_put(start, run.state_shardings), 1, run.mesh)
  one = jax.device_get(one)
  mom = float(m1[0]['momentum'])
  for a, b, c in zip(jax.tree.leaves(one.teacher_params), jax.tree.leaves(t),
                     jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, mom * b + (1 - mom) * c, rtol=1e-6, atol=1e-7)
  for step in range(2):
    for key in ('loss', 'dino_loss', 'ibot_loss', 'koleo', 'teacher_entropy'):
      np.testing.assert_allclose(m1[step][key], m8[step][key], rtol=2e-4, atol=1e-6,
                                 err_msg=key)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_off_by_default_and_resume_is_exact(tmp_path, teacher_dir, digits_npz):
  """Without distill.teacher the state is the plain TrainState. A 4-step distillation run
  with its last checkpoint deleted and rerun from step 2 ends bitwise where the uninterrupted
  run did, the frozen teacher included."""
  plain = train.build(tiny_config(), sharding.make_mesh(-1, 1, jax.devices()[:1]))
  assert type(jax.eval_shape(plain.init_fn)) is TrainState  # pylint: disable=unidiomatic-typecheck
  config = student_config(teacher_dir, digits_npz, **{'checkpoint_every': 2, 'epochs': 1})
  work = tmp_path / 'student'
  full = train.train_and_evaluate(config, str(work))
  assert isinstance(full, DistillTrainState) and int(full.step) == 4
  shutil.rmtree(work / 'checkpoints' / '4')
  resumed = train.train_and_evaluate(config, str(work))
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  saved = weights.from_workdir(teacher_dir)
  for a, b in zip(jax.tree.leaves(full.distill_params['backbone']),
                  jax.tree.leaves(saved.backbone)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # the model kept is the EMA student: the workdir loads as a ViT-nano
  model, cfg = weights.load_model(str(work))
  assert cfg.model.arch == 'vit_nano' and model.cfg.width == 48


@pytest.fixture(scope='module')
def model_files(teacher_dir, tmp_path_factory):
  """The teacher as model files: converted-official-like (no config, no heads), an export
  (config, no heads), and one with config and heads whose run had a separate iBOT head."""
  out = tmp_path_factory.mktemp('files')
  w = weights.from_workdir(teacher_dir, with_config=True)
  files = {'official': w._replace(config=None, head=None, head_config=None, center=None),
           'export': w._replace(head=None, head_config=None, center=None), 'dino_head': w}
  for name, value in files.items():
    weights.save(value, out / f'{name}.safetensors')
  return {name: str(out / f'{name}.safetensors') for name in files}


@pytest.mark.parametrize('case,overrides,message', [
    ('missing', {'distill.teacher': '/no/such/dir'},
     'config.distill.teacher: .* is neither a directory'),
    ('empty_dir', {}, 'config.distill.teacher: cannot read the teacher .* neither a dino_jax '
                      'workdir'),
    ('official', {}, "config.distill.teacher: distillation needs the teacher's DINO and iBOT "
                     'heads, and .* has no run config'),
    ('export', {}, 'config.distill.teacher: .*DINO and iBOT heads, and .* has no heads'),
    ('dino_head', {}, 'config.distill.teacher: .* the DINO head only, not the separate iBOT'),
    ('patch', {'model.patch_size': 8}, 'config.model.patch_size: 8, but the teacher .* has '
                                      'patch size 4'),
    ('out_dim', {'model.out_dim': 128}, 'config.model.out_dim: 128, but the teacher .* has 64 '
                                        'DINO prototypes'),
    ('ibot', {'model.ibot_out_dim': 48}, "config.model.ibot_out_dim: the student's iBOT head "
                                         'has 48 prototypes'),
    ('ibot_shared', {'model.ibot_separate_head': False},
     "config.model.ibot_out_dim: the student's iBOT head has 64 prototypes "
     r'\(ibot_separate_head=False\)'),
    ('gram', {'gram.weight': 1.0}, 'config.distill.teacher: distillation with Gram anchoring'),
])
def test_refused_teachers_are_one_line_and_write_nothing(case, overrides, message, tmp_path,
                                                         teacher_dir, model_files, digits_npz):
  teacher = {'empty_dir': str(tmp_path)}.get(case, model_files.get(case, teacher_dir))
  config = student_config(teacher, digits_npz, **overrides)
  with pytest.raises(ConfigError, match=message) as e:
    validate(config, n_devices=8)
  assert '\n' not in str(e.value)
  work = tmp_path / 'work'
  with pytest.raises(ConfigError):
    train.train_and_evaluate(config, str(work))
  assert not work.exists()
  if case == 'empty_dir':
    assert os.listdir(tmp_path) == []


def test_recipe_loads_and_names_its_teacher(tmp_path):
  """configs/dinov3_distill.py: a ViT-nano student of the dinov3_cpu.py teacher, no Gram;
  without the teacher's workdir it stops on one line."""
  config = config_file.load(REPO / 'configs' / 'dinov3_distill.py')
  assert (config.model.arch, config.gram.weight) == ('vit_nano', 0.0)
  teacher = config_file.load(REPO / 'configs' / 'dinov3_cpu.py')
  assert (teacher.model.patch_size, teacher.model.out_dim) == (
      config.model.patch_size, config.model.out_dim)
  config.distill.teacher = str(tmp_path / 'no_teacher')
  with pytest.raises(ConfigError, match='config.distill.teacher: .* is neither a directory'):
    validate(config)
  config.distill.teacher = ''
  validate(config)


def test_model_file_teacher_with_config_and_heads(tmp_path, digits_npz):
  """A model file carrying its run config and heads (a shared iBOT head, so the DINO head is
  all of them) is a teacher: the state's frozen params are the file's tensors."""
  import json  # pylint: disable=import-outside-toplevel
  shared = tiny_config(**{**IBOT, 'model.ibot_separate_head': False})
  net = models.build(shared, teacher=True, seed=3)
  params = nnx.state(net, nnx.Param).to_pure_dict()
  path = tmp_path / 'teacher.safetensors'
  weights.save(weights.Weights(models.vit_config(shared, teacher=True), params['backbone'],
                               weights.head_config(params['head']), params['head'],
                               config=json.loads(json.dumps(shared.to_dict()))), path)
  config = student_config(str(path), digits_npz, **{'model.ibot_separate_head': False})
  run = train.build(config, sharding.make_mesh(-1, 1, jax.devices()[:1]))
  state = train.init_state(run)
  loaded, where = distill.load(str(path), state.distill_params)
  assert where == str(path) and set(loaded) == {'backbone', 'head'}
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
