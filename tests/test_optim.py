"""The optimizer: per-tensor clipping, AdamW param groups, the frozen last layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import optim
from dino_jax.schedules import Schedules


def toy_params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {'backbone': {'pos_embed': f(1, 5, 4), 'blocks': {0: {'fc': {'kernel': f(4, 4),
                                                                       'bias': f(4)},
                                                               'norm': {'scale': f(4)}}}},
          'head': {'last_layer': {'weight_v': f(3, 6), 'weight_g': jnp.ones((1, 6))}}}


def sched(freeze_steps=2, total=10):
  return Schedules(steps_per_epoch=1, total_steps=total, lr_peak=0.1, min_lr=0.01,
                   warmup_steps=0, wd=0.04, wd_end=0.4, momentum=0.996, student_temp=0.1,
                   teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                   freeze_last_layer_steps=freeze_steps)


def test_clip_is_per_tensor_not_global():
  tx = optim.clip_by_norm_per_param(3.0)
  grads = {'a': jnp.array([30.0, 40.0]), 'b': jnp.array([0.3, 0.4])}
  out, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(out['a'], np.array([30.0, 40.0]) * 3.0 / (50.0 + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(out['b'], grads['b'])  # small tensors untouched


def test_decay_mask_follows_official_groups():
  mask = optim.decay_mask(toy_params())
  assert mask['backbone']['pos_embed'] and mask['backbone']['blocks'][0]['fc']['kernel']
  assert not mask['backbone']['blocks'][0]['fc']['bias']
  assert not mask['backbone']['blocks'][0]['norm']['scale']
  assert mask['head']['last_layer']['weight_v'] and mask['head']['last_layer']['weight_g']


def numpy_adamw(p, g, m, v, t, lr, wd, b1=0.9, b2=0.999, eps=1e-8, decay=True):
  """torch.optim.AdamW's update for one tensor at step t (1-based)."""
  if decay:
    p = p * (1 - lr * wd)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
  return p - lr * mhat / (np.sqrt(vhat) + eps), m, v


@pytest.mark.parametrize('norm_last_layer', [True, False])
def test_matches_torch_adamw_with_frozen_last_layer(config, norm_last_layer):
  config.model.norm_last_layer = norm_last_layer
  config.optim.clip_grad = 0.0
  s = sched(freeze_steps=2)
  params = toy_params()
  tx = optim.make(config, s, params)
  state = tx.init(params)
  flat = {n: np.asarray(p, np.float64) for n, p in zip(
      jax.tree.leaves(optim.param_names(params)), jax.tree.leaves(params))}
  moments = {n: (0.0, 0.0, 0) for n in flat}
  decay = dict(zip(jax.tree.leaves(optim.param_names(params)),
                   jax.tree.leaves(optim.decay_mask(params))))
  rng = np.random.default_rng(1)
  for step in range(5):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    lr, wd = float(s.lr(step)), float(s.weight_decay(step))
    for n, g in zip(jax.tree.leaves(optim.param_names(grads)), jax.tree.leaves(grads)):
      in_last = 'last_layer' in n
      if (in_last and step < 2) or (norm_last_layer and n.endswith('weight_g')):
        continue  # no grad in PyTorch: no update, no decay, no step count
      m, v, t = moments[n]
      flat[n], m, v = numpy_adamw(flat[n], np.asarray(g, np.float64), m, v, t + 1, lr, wd,
                                  decay=decay[n])
      moments[n] = (m, v, t + 1)
    got = dict(zip(jax.tree.leaves(optim.param_names(params)), jax.tree.leaves(params)))
    for n in flat:
      np.testing.assert_allclose(np.asarray(got[n]), flat[n], rtol=2e-5, atol=1e-5, err_msg=n)
  g_final = got['head/last_layer/weight_g']
  if norm_last_layer:
    np.testing.assert_array_equal(g_final, 1.0)
  else:
    assert not np.allclose(g_final, 1.0)
