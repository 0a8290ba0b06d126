"""Packed crops and remat policies: the same numbers as one backbone pass per crop size with
every activation kept, for the backbone alone and for the whole train step on 1 and 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import config_file, data, models, sharding, train
from dino_jax.models import packing
from dino_jax.models.vit import REMAT_POLICIES, ViT, ViTConfig
from dino_jax.validate import ConfigError, validate
from conftest import tiny_config

CFG = dict(width=48, depth=2, heads=3, patch_size=4, img_size=16, drop_path_rate=0.3,
           mask_token=True, layerscale=0.1, n_registers=2)
GLOBAL = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
LOCAL = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
MASKS = jax.random.bernoulli(jax.random.PRNGKey(2), 0.3, (4, 16))
KEYS = list(jax.random.split(jax.random.PRNGKey(3)))


def _loss(out_g, out_l):
  return (jnp.sum(out_g.cls ** 2) + jnp.sum(jnp.sin(out_g.patches)) +
          jnp.sum(out_g.registers ** 2) + jnp.sum(out_l.cls ** 3))


def _value_and_grad(remat='none', shards=None):
  """Loss and grads of the two crop sizes, one pass each (shards None) or packed."""
  gdef, params = nnx.split(ViT(ViTConfig(**CFG, remat=remat), rngs=nnx.Rngs(0)))

  def loss(p):
    vit = nnx.merge(gdef, p)
    if shards is None:
      return _loss(vit(GLOBAL, key=KEYS[0], masks=MASKS), vit(LOCAL, key=KEYS[1]))
    return _loss(*vit.packed([GLOBAL, LOCAL], keys=KEYS, masks=[MASKS, None], shards=shards))
  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_close(a, b, rtol):
  (va, ga), (vb, gb) = a, b
  np.testing.assert_allclose(vb, va, rtol=rtol)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    scale = float(np.max(np.abs(x)))
    np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * scale)


def test_layout_round_trip_and_per_token_values():
  xs = [jnp.arange(4 * 3 * 2.).reshape(4, 3, 2), jnp.arange(8 * 5 * 2.).reshape(8, 5, 2) + 100]
  for shards in (1, 2, 4):
    layout = packing.Layout(((4, 3), (8, 5)), shards)
    packed = layout.join(xs)
    assert packed.shape == (12 + 40, 2)
    for got, want in zip(layout.split(packed), xs):
      np.testing.assert_array_equal(got, want)
    # shard p's rows are contiguous and start with its own crops of group 0
    last_shard = packed.reshape(shards, -1, 2)[-1]
    np.testing.assert_array_equal(last_shard[0], xs[0][4 - 4 // shards, 0])
    ids = layout.per_token([jnp.arange(4), jnp.arange(8) + 10])
    assert ids.shape == (12 + 40,)
    for got, n, t, base in zip(layout.split(ids[:, None]), (4, 8), (3, 5), (0, 10)):
      np.testing.assert_array_equal(got[..., 0], np.repeat(np.arange(n)[:, None] + base, t, 1))
  with pytest.raises(ValueError, match='do not split over 3'):
    packing.Layout(((4, 3),), 3)


def test_packed_backbone_equals_one_pass_per_crop_size():
  """Same outputs and gradients with drop-path, masks, registers and LayerScale on: the
  packed pass draws the same drop-path masks from the same keys."""
  want = _value_and_grad()
  for shards in (1, 2, 4):
    _assert_close(want, _value_and_grad(shards=shards), 1e-5)


@pytest.mark.parametrize('policy', sorted(REMAT_POLICIES))
def test_remat_policies_give_the_loss_and_grads_of_none(policy):
  want = _value_and_grad()
  _assert_close(want, _value_and_grad(remat=policy), 1e-5)
  _assert_close(want, _value_and_grad(remat=policy, shards=2), 1e-5)


def _dot_count(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == 'dot_general'
    n += sum(_dot_count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
  return n


def test_remat_policies_recompute_what_they_should():
  """In the backward pass 'block' recomputes every product of the block, 'dots' only the
  attention products (batched), 'none' nothing; True / False are 'block' / 'none'."""
  counts = {}
  for policy in ('none', 'dots', 'block'):
    gdef, params = nnx.split(ViT(ViTConfig(**CFG, remat=policy), rngs=nnx.Rngs(0)))
    grad = jax.grad(lambda p, g=gdef: nnx.merge(g, p)(GLOBAL).cls.sum())
    counts[policy] = _dot_count(jax.make_jaxpr(grad)(params).jaxpr)
  per_block_products = 4 + 2  # qkv, proj, fc1, fc2 + the two attention products
  depth = CFG['depth']
  assert counts['block'] - counts['none'] == depth * per_block_products
  assert counts['dots'] - counts['none'] == depth * 2
  assert ViTConfig(**CFG, remat=True).remat == 'block'
  assert ViTConfig(**CFG, remat=False).remat == 'none'
  with pytest.raises(ValueError, match='unknown remat policy'):
    ViTConfig(**CFG, remat='everything')


def test_unknown_remat_policy_is_a_config_error():
  with pytest.raises(ConfigError, match=r"config.model.remat: 'everything' is not one of"):
    validate(tiny_config(**{'model.remat': 'everything'}), n_devices=8)
  validate(tiny_config(**{'model.remat': True}), n_devices=8)  # older configs' bools


def test_saved_configs_with_boolean_remat_still_load():
  for saved, want in ((False, 'none'), (True, 'block'), ('dots', 'dots')):
    config = config_file.from_saved({'model': {'remat': saved, 'arch': 'vit_pico'}})
    assert models.build(tiny_config(**{'model.remat': config.model.remat})).backbone.cfg.remat \
        == want


def _one_step(n_devices, mesh_shape=(-1, 1), **overrides):
  """State and metrics after one train step of tiny_config(**overrides)."""
  config = tiny_config(**overrides)
  mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:n_devices])
  run = train.build(config, mesh)
  batch = data.train_dataset(run.train_source, canvas_size=config.data.canvas_size,
                             global_batch=config.batch_size, seed=0)[0]
  state, metrics = run.step_fn(train.init_state(run), sharding.to_global(batch, mesh))
  return jax.device_get(state), jax.device_get(metrics)


def test_packed_step_equals_unpacked_step_on_1_and_8_devices():
  """A whole step (drop-path 0.1 on, 2 global + 2 local crops): losses, statistics and
  parameters after the update."""
  s0, m0 = _one_step(1, **{'model.pack_crops': False})
  for n in (1, 8):
    s1, m1 = _one_step(n, **{'model.pack_crops': True})
    for k in ('loss', 'dino_loss', 'grad_norm', 'kl', 'student_entropy', 'teacher_entropy'):
      np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=f'{k}, {n} devices')
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_dino_backbone_crops_packed_equals_one_pass_per_crop_size():
  """The student's pass of the train step (DINO.backbone_crops): the same CLS tokens, crop-major,
  and global outputs whether the crops are packed or not; global crops alone need no packing."""
  key = jax.random.PRNGKey(4)
  outs = {}
  for pack in (True, False):
    model = models.build(tiny_config(**{'model.pack_crops': pack, 'model.mask_token': True}))
    g = jnp.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3)))
    l = jnp.asarray(jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3)))
    masks = jax.random.bernoulli(jax.random.PRNGKey(2), 0.3, (4, 16))
    outs[pack] = model.backbone_crops(g, l, key, masks=masks)
    g_only, cls_only = model.backbone_crops(g, None, key, masks=masks)
    np.testing.assert_array_equal(cls_only, g_only.cls)
  (g_p, cls_p), (g_u, cls_u) = outs[True], outs[False]
  assert cls_p.shape == (12, g_p.cls.shape[-1])
  np.testing.assert_allclose(cls_p, cls_u, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_p.patches, g_u.patches, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cls_p[:4], g_p.cls, rtol=0, atol=0)
