"""The prototype head and loss in chunks (prototype_loss.py) against the plain path (losses.py):
values, gradients, center updates and the statistics the step reports, in f32 to 1e-6."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import losses, prototype_loss as pl
from dino_jax.models.head import l2_normalize
from dino_jax.validate import ConfigError, validate
from conftest import tiny_config
from test_losses import update_center
from test_packed import _one_step

K, E, B, N_GLOBAL, N_CROPS = 64, 16, 4, 2, 5
S_TEMP, T_TEMP = 0.1, 0.04
_k = jax.random.split(jax.random.PRNGKey(0), 8)
S_FEATS = l2_normalize(jax.random.normal(_k[0], (N_CROPS * B, E)))
T_FEATS = l2_normalize(jax.random.normal(_k[1], (N_GLOBAL * B, E)))
# the head's logits are cosine similarities times g (1 with norm_last_layer): |logit| <= 1.5
W = l2_normalize(jax.random.normal(_k[2], (K, E))).T * 1.5
W_T = l2_normalize(W.T + 0.3 * jax.random.normal(_k[3], (K, E))).T * 1.5
CENTER = 0.3 * jax.random.normal(_k[4], (1, K))
ROWS = 12  # iBOT: masked tokens, the last 3 padding
VALID = jnp.arange(ROWS) < 9
WEIGHTS = jnp.where(VALID, 1.0 / jnp.array([3, 3, 3, 2, 2, 4, 4, 4, 4, 1, 1, 1]), 0.0)
P_FEATS = l2_normalize(jax.random.normal(_k[5], (ROWS, E)))
P_T_FEATS = l2_normalize(jax.random.normal(_k[6], (ROWS, E)))


def _close(got, want, rtol=1e-6):
  """Within rtol of the largest magnitude of `want` (elementwise rtol for near-zero entries of
  a gradient would be testing float noise)."""
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.max(np.abs(want))))


def _plain_dino(s_feats, w):
  t = T_FEATS @ W_T
  q = losses.teacher_probs(t, CENTER, T_TEMP)
  s = s_feats @ w
  stats = {**losses.distill_stats(s, q, S_TEMP, N_GLOBAL),
           **losses.collapse_stats(t, CENTER, q)}
  return losses.cross_entropy_pairs(s, q, S_TEMP, N_GLOBAL), (q, update_center(
      CENTER, t), stats)


def _chunked_dino(s_feats, w, chunk):
  t = pl.centered_targets(T_FEATS, W_T, CENTER, T_TEMP, chunk)
  loss, aux = pl.cross_entropy(s_feats, w, t.q, pl.dino_pairs(N_GLOBAL, N_CROPS, B), S_TEMP)
  stats = {'kl': -t.stats['teacher_entropy'] - aux['cross_self'],
           'student_entropy': aux['student_entropy'], **t.stats}
  return loss, (pl.from_chunks(t.q), losses.center_ema(CENTER, t.batch_mean), stats)


@pytest.mark.parametrize('chunk', [0, 8, 16, 64, 1000])
def test_chunked_dino_loss_equals_plain(chunk):
  """Loss, gradients (features and prototypes), targets, the center update and every
  statistic the step reports, for one chunk and for several."""
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  (want, (q0, c0, st0)), g0 = grad(_plain_dino)(S_FEATS, W)
  (got, (q1, c1, st1)), g1 = grad(lambda s, w: _chunked_dino(s, w, chunk))(S_FEATS, W)
  _close(got, want)
  for a, b in zip(g1, g0):
    _close(a, b)
  _close(q1, q0)
  _close(c1, c0)
  for k in ('teacher_entropy', 'kl', 'student_entropy', 'prototypes_used', 'logit_std'):
    _close(st1[k], st0[k])


@pytest.mark.parametrize('chunk', [0, 16])
def test_chunked_ibot_loss_and_patch_center_equal_plain(chunk):
  def plain(s_feats, w):
    t = P_T_FEATS @ W_T
    q = losses.teacher_probs(t, CENTER, T_TEMP)
    loss = losses.ibot_patch_loss(s_feats @ w, q, WEIGHTS, S_TEMP, 2 * B)
    return loss, losses.update_patch_center(CENTER, t, VALID)

  def chunked(s_feats, w):
    t = pl.centered_targets(P_T_FEATS, W_T, CENTER, T_TEMP, chunk, VALID)
    loss, _ = pl.cross_entropy(s_feats, w, t.q, pl.row_pairs(WEIGHTS, 2 * B), S_TEMP)
    return loss, losses.center_ema(CENTER, t.batch_mean)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  (want, c0), g0 = grad(plain)(P_FEATS, W)
  (got, c1), g1 = grad(chunked)(P_FEATS, W)
  _close(got, want)
  _close(c1, c0)
  for a, b in zip(g1, g0):
    _close(a, b)


def test_handwritten_backward_equals_autodiff_of_the_chunked_forward():
  q = pl.centered_targets(T_FEATS, W_T, CENTER, T_TEMP, 16).q
  coef = pl.dino_pairs(N_GLOBAL, N_CROPS, B)
  forward = pl._student_pass  # pylint: disable=protected-access
  auto = jax.grad(lambda f, w: forward(f, w, q, coef, S_TEMP)[0], (0, 1))
  custom = jax.grad(lambda f, w: pl.cross_entropy(f, w, q, coef, S_TEMP)[0], (0, 1))
  for a, b in zip(custom(S_FEATS, W), auto(S_FEATS, W)):
    _close(a, b)
  assert not np.any(jax.grad(lambda q: pl.cross_entropy(S_FEATS, W, q, coef, S_TEMP)[0])(q))


def test_bfloat16_features_keep_f32_statistics():
  """bf16 features and prototypes (f32 accumulation) stay close to f32, and every output,
  gradient to the f32 prototypes included, is f32 where the plain path's is."""
  def loss(s_feats, w):
    t = pl.centered_targets(T_FEATS.astype(jnp.bfloat16), W_T, CENTER, T_TEMP, 16)
    return pl.cross_entropy(s_feats, w, t.q, pl.dino_pairs(N_GLOBAL, N_CROPS, B), S_TEMP)[0]
  value, (g_feats, g_w) = jax.value_and_grad(loss, (0, 1))(S_FEATS.astype(jnp.bfloat16), W)
  assert value.dtype == g_w.dtype == jnp.float32 and g_feats.dtype == jnp.bfloat16
  np.testing.assert_allclose(value, _plain_dino(S_FEATS, W)[0], rtol=2e-2)


def test_chunk_must_divide_the_prototypes():
  assert pl.chunking(64, 0) == (64, 1) and pl.chunking(64, 128) == (64, 1)
  assert pl.chunking(64, 16) == (16, 4)
  with pytest.raises(ValueError, match='does not divide'):
    pl.chunking(64, 24)
  with pytest.raises(ConfigError, match='config.loss.prototype_chunk: 24 does not divide 64'):
    validate(tiny_config(**{'loss.prototype_chunk': 24}), n_devices=8)
  ibot = {'loss.ibot_weight': 1.0, 'model.mask_token': True, 'model.ibot_separate_head': True,
          'model.ibot_out_dim': 48}
  with pytest.raises(ConfigError, match='32 does not divide 48'):
    validate(tiny_config(**ibot, **{'loss.prototype_chunk': 32}), n_devices=8)
  validate(tiny_config(**ibot, **{'loss.prototype_chunk': 16}), n_devices=8)


STEP_KEYS = ('loss', 'dino_loss', 'grad_norm', 'last_layer_grad_norm', 'kl', 'student_entropy',
             'teacher_entropy', 'prototypes_used', 'logit_std', 'center_norm')


@pytest.mark.parametrize('overrides', [
    {},
    {'loss.centering': 'sinkhorn_knopp'},
    {'loss.ibot_weight': 1.0, 'loss.koleo_weight': 0.1, 'model.mask_token': True,
     'model.ibot_separate_head': True, 'model.ibot_out_dim': 48},
], ids=['dino', 'sinkhorn', 'ibot_koleo'])
def test_chunked_step_equals_plain_step(overrides):
  """Whole train steps, chunks of 16 prototypes against none, on one device: every loss and
  statistic, and the state after the update (parameters, teacher, centers). The step's
  statistics sum more terms than the functions above, so 1e-5."""
  s0, m0 = _one_step(1, **overrides, **{'loss.prototype_chunk': 0})
  s1, m1 = _one_step(1, **overrides, **{'loss.prototype_chunk': 16})
  for k in STEP_KEYS + (('ibot_loss', 'koleo') if overrides.get('loss.ibot_weight') else ()):
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_chunked_step_is_the_same_on_8_devices():
  """Data-parallel over 2 and the prototypes sharded over 4 (fsdp): chunks cut across shards."""
  overrides = {'loss.prototype_chunk': 16, 'mesh.min_shard_size': 0}
  s1, m1 = _one_step(1, **overrides)
  s8, m8 = _one_step(8, (2, 4), **overrides)
  for k in STEP_KEYS:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
