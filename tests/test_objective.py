"""The objective as a list of terms (objective.py): which terms a config turns on, and the total
against weight x value computed directly from losses.py, on tiny arrays through linear heads
(no model, no compile of a step)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_config
from dino_jax import config_file, losses, masking, objective
from dino_jax.models.head import l2_normalize
from dino_jax.models.vit import ViTOutput

B, N_GLOBAL, N_LOCAL, N_PATCHES, D, E, K = 4, 2, 2, 6, 8, 5, 16
S_TEMP, T_TEMP = 0.1, 0.04


class LinearHead:
  """The head's interface (features, last_layer.weight(), __call__) on two matrices."""

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.a = jax.random.normal(k1, (D, E))
    self.w = l2_normalize(jax.random.normal(k2, (K, E))).T * 1.5
    self.last_layer = self

  def weight(self):
    return self.w

  def features(self, x):
    return l2_normalize(x @ self.a)

  def __call__(self, x):
    return self.features(x) @ self.w


class Heads:
  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.head, self.patch_head = LinearHead(k1), LinearHead(k2)


def _out(key, rows):
  k1, k2 = jax.random.split(key)
  return ViTOutput(cls=jax.random.normal(k1, (rows, D)),
                   patches=jax.random.normal(k2, (rows, N_PATCHES, D)),
                   intermediates=(), attention=None)


def _setup(spec):
  """Teacher and student on random tokens, targets, masked tokens: everything `total` reads."""
  k = jax.random.split(jax.random.PRNGKey(0), 8)
  n_img = N_GLOBAL * B
  teacher, student = Heads(k[0]), Heads(k[1])
  t_out, g_out = _out(k[2], n_img), _out(k[3], n_img)
  cls = jnp.concatenate([g_out.cls, jax.random.normal(k[4], (N_LOCAL * B, D))])
  masks = jax.random.bernoulli(k[5], 0.4, (n_img, N_PATCHES)).at[0, 0].set(True)
  masked = objective.Masked(*masking.gather_masked(masks, n_img * N_PATCHES // 2 + 4))
  center = 0.3 * jax.random.normal(k[6], (1, K))
  patch_center = 0.3 * jax.random.normal(k[7], (1, K))
  targets = objective.teacher_targets(spec, teacher, t_out, center, patch_center, T_TEMP,
                                      masked if spec.ibot else None)
  x = objective.Inputs(student, g_out, cls, targets, masked if spec.ibot else None, N_GLOBAL,
                       S_TEMP)
  return x, dict(teacher=teacher, student=student, t_out=t_out, g_out=g_out, cls=cls,
                 masked=masked, center=center, patch_center=patch_center, n_img=n_img)


def _direct(spec, s):
  """Each term straight from losses.py."""
  q = losses.teacher_probs(s['teacher'].head(s['t_out'].cls), s['center'], T_TEMP)
  values = {'dino_loss': losses.cross_entropy_pairs(s['student'].head(s['cls']), q, S_TEMP,
                                                    N_GLOBAL)}
  if spec.koleo_weight > 0:
    values['koleo'] = sum(losses.koleo(s['g_out'].cls[c * B:(c + 1) * B])
                          for c in range(N_GLOBAL))
  if spec.ibot_weight > 0:
    idx, weights = s['masked'].idx, s['masked'].weights
    t_rows = s['t_out'].patches.reshape(-1, D)[idx]
    s_rows = s['g_out'].patches.reshape(-1, D)[idx]
    q_p = losses.teacher_probs(s['teacher'].patch_head(t_rows), s['patch_center'], T_TEMP)
    values['ibot_loss'] = losses.ibot_patch_loss(s['student'].patch_head(s_rows), q_p, weights,
                                                 S_TEMP, s['n_img'])
  return values


V2 = objective.Objective(koleo_weight=0.1, ibot_weight=0.5)


def test_terms_follow_the_config():
  assert [t.name for t in objective.Objective.from_config(tiny_config()).terms] == ['dino_loss']
  v2 = config_file.load(REPO / 'configs' / 'dinov2_vits14.py')
  assert v2.model.mask_token and v2.loss.koleo_weight > 0 and v2.loss.ibot_weight > 0
  spec = objective.Objective.from_config(v2)
  assert [t.name for t in spec.terms] == ['dino_loss', 'koleo', 'ibot_loss']
  assert [t.weight(spec) for t in spec.terms] == [1.0, v2.loss.koleo_weight, v2.loss.ibot_weight]
  assert spec.ibot and spec.mask.n_patches == (224 // 14) ** 2


@pytest.mark.parametrize('spec', [objective.Objective(), objective.Objective(koleo_weight=0.1),
                                  V2], ids=['dino', 'dino+koleo', 'dinov2'])
def test_total_is_the_weighted_sum_of_the_losses_py_terms(spec):
  x, s = _setup(spec)
  total, values, stats = objective.total(spec, x)
  want = _direct(spec, s)
  assert list(values) == list(want)
  for name in want:
    np.testing.assert_allclose(values[name], want[name], rtol=1e-6, err_msg=name)
  weights = {'dino_loss': 1.0, 'koleo': spec.koleo_weight, 'ibot_loss': spec.ibot_weight}
  np.testing.assert_allclose(total, sum(weights[n] * v for n, v in want.items()), rtol=1e-6)
  assert set(stats) == {'kl', 'student_entropy'}
  assert (x.targets.ibot is None) == (not spec.ibot)


def test_chunked_and_sinkhorn_objectives_give_the_plain_values():
  """prototype_loss.py's chunked path and Sinkhorn-Knopp targets through the same seam."""
  _, want, want_stats = objective.total(V2, _setup(V2)[0])
  for chunk in (4, 8):
    spec = objective.Objective(koleo_weight=0.1, ibot_weight=0.5, prototype_chunk=chunk)
    total, values, stats = objective.total(spec, _setup(spec)[0])
    for name in want:
      np.testing.assert_allclose(values[name], want[name], rtol=1e-5, err_msg=name)
    for name in want_stats:
      np.testing.assert_allclose(stats[name], want_stats[name], rtol=1e-4, atol=1e-6)
  sk = objective.Objective(koleo_weight=0.1, ibot_weight=0.5, centering='sinkhorn_knopp')
  x, s = _setup(sk)
  _, values, _ = objective.total(sk, x)
  q = losses.sinkhorn_knopp(s['teacher'].head(s['t_out'].cls), T_TEMP)
  np.testing.assert_allclose(values['dino_loss'], losses.cross_entropy_pairs(
      s['student'].head(s['cls']), q, S_TEMP, N_GLOBAL), rtol=1e-6)
  sk_chunk = objective.Objective(koleo_weight=0.1, ibot_weight=0.5, centering='sinkhorn_knopp',
                                 prototype_chunk=8)
  _, chunked, _ = objective.total(sk_chunk, _setup(sk_chunk)[0])
  for name in values:
    np.testing.assert_allclose(chunked[name], values[name], rtol=1e-5, err_msg=name)


def test_a_new_term_is_one_row_of_terms(monkeypatch):
  """The step sums what `total` returns: a row added to TERMS joins the total, its metric and
  its statistics; a weight of 0 leaves it out."""
  extra = lambda spec, x: (2.0 * jnp.mean(x.global_out.cls ** 2), {'extra_stat': jnp.ones(())})
  x, s = _setup(V2)
  before, _, _ = objective.total(V2, x)
  monkeypatch.setattr(objective, 'TERMS', objective.TERMS + (
      objective.Term('extra', lambda spec: 0.25, extra),))
  total, values, stats = objective.total(V2, x)
  assert list(values) == ['dino_loss', 'koleo', 'ibot_loss', 'extra']
  np.testing.assert_allclose(total, before + 0.5 * jnp.mean(s['g_out'].cls ** 2), rtol=1e-6)
  assert 'extra_stat' in stats
  monkeypatch.setattr(objective, 'TERMS', objective.TERMS[:3] + (
      objective.Term('extra', lambda spec: 0.0, extra),))
  assert [t.name for t in V2.terms] == ['dino_loss', 'koleo', 'ibot_loss']


def test_gradients_reach_the_student_not_the_teacher():
  """Every enabled term sends a gradient to the student's tokens; the targets send none to
  the teacher's."""
  _, s = _setup(V2)

  def f(g_cls, g_patches, t_cls, t_patches):
    t_out = s['t_out']._replace(cls=t_cls, patches=t_patches)
    targets = objective.teacher_targets(V2, s['teacher'], t_out, s['center'], s['patch_center'],
                                        T_TEMP, s['masked'])
    g_out = s['g_out']._replace(cls=g_cls, patches=g_patches)
    cls = jnp.concatenate([g_cls, s['cls'][N_GLOBAL * B:]])
    x = objective.Inputs(s['student'], g_out, cls, targets, s['masked'], N_GLOBAL, S_TEMP)
    return objective.total(V2, x)[0]

  grads = jax.grad(f, argnums=(0, 1, 2, 3))(s['g_out'].cls, s['g_out'].patches,
                                            s['t_out'].cls, s['t_out'].patches)
  assert np.any(np.asarray(grads[0])) and np.any(np.asarray(grads[1]))
  assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))
