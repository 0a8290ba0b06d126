"""Name-based sharding rules: which tensors of the TrainState shard over 'fsdp', and how."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from dino_jax import sharding, train
from conftest import tiny_config

FSDP = P(None, 'fsdp')


@pytest.mark.parametrize('name, shape, spec', [
    ('params/backbone/blocks/0/attn/qkv/kernel', (384, 1152), FSDP),
    ('params/backbone/blocks/11/mlp/fc2/kernel', (1536, 384), FSDP),
    ('params/backbone/blocks/3/attn/qkv/kernel', (96, 300), P('fsdp')),  # 300 % 8: input dim
    ('params/backbone/blocks/3/attn/qkv/kernel', (90, 300), P()),  # neither dim divides
    ('params/backbone/patch_embed/kernel', (16, 16, 3, 384), P(None, None, None, 'fsdp')),
    ('params/backbone/pos_embed', (1, 197, 384), P(None, None, 'fsdp')),
    ('params/backbone/cls_token', (1, 1, 384), P()),
    ('params/backbone/blocks/0/attn/qkv/bias', (1152,), P()),
    ('params/backbone/blocks/0/norm1/scale', (384,), P()),
    ('params/head/last_layer/weight_v', (256, 65536), FSDP),
    ('params/head/last_layer/weight_g', (1, 65536), FSDP),
    ('teacher_params/head/mlp/0/kernel', (384, 2048), FSDP),
    ('opt_state/1/inner_states/rest/inner_state/mu/head/mlp/1/kernel', (2048, 2048), FSDP),
    ('opt_state/1/inner_states/rest/inner_state/nu/backbone/pos_embed', (1, 197, 384),
     P(None, None, 'fsdp')),
    ('center', (1, 65536), FSDP),
    ('step', (), P()),
    ('rng', (2,), P()),
])
def test_rules_table(name, shape, spec):
  assert sharding.param_spec(name, shape, fsdp=8, min_size=0) == spec


def test_small_tensors_and_fsdp_one_replicate():
  name = 'params/head/mlp/1/kernel'
  assert sharding.param_spec(name, (64, 64), fsdp=8, min_size=2 ** 16) == P()
  assert sharding.param_spec(name, (2048, 2048), fsdp=8, min_size=2 ** 16) == FSDP
  assert sharding.param_spec(name, (2048, 2048), fsdp=1, min_size=0) == P()


def test_student_teacher_and_moments_share_one_layout():
  """Over the real TrainState: every parameter's spec is also its EMA's and its moments'."""
  config = tiny_config(**{'mesh.min_shard_size': 0})
  run = train.build(config, sharding.make_mesh(2, 4))
  abstract = jax.eval_shape(run.init_fn)
  specs = {sharding.path_name(p): s.spec for p, s in
           jax.tree_util.tree_flatten_with_path(run.state_shardings)[0]}
  params = [n[len('params/'):] for n in specs if n.startswith('params/')]
  for p in params:
    assert specs['teacher_params/' + p] == specs['params/' + p], p
    moments = [n for n in specs if n.startswith('opt_state/') and n.endswith('/' + p)]
    assert all(specs[m] == specs['params/' + p] for m in moments), p
  sharded = {p for p in params if 'fsdp' in specs['params/' + p]}
  kernels = {p for p in params if p.endswith('kernel')}
  assert kernels <= sharded  # every kernel of the tiny model has a dim divisible by 4
  assert not any(p.endswith(('bias', 'scale', 'cls_token')) for p in sharded)
  assert len(jax.tree.leaves(abstract)) == len(specs)


@pytest.mark.parametrize('data, fsdp, n, message', [
    (-1, -1, 8, 'config.mesh: at most one of data, fsdp may be -1'),
    (3, -1, 8, 'config.mesh: data=3 x fsdp=2 does not use the 8 available devices'),
    (2, 2, 8, 'config.mesh: data=2 x fsdp=2 does not use the 8 available devices'),
])
def test_bad_mesh_fails_clearly(data, fsdp, n, message):
  with pytest.raises(ValueError) as e:
    sharding.mesh_shape(data, fsdp, n)
  assert str(e.value) == message


def test_mesh_fills_minus_one():
  assert sharding.mesh_shape(-1, 4, 8) == (2, 4)
  assert sharding.mesh_shape(1, -1, 8) == (1, 8)
