"""DINO loss and centering against a direct numpy transcription of the formula."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from dino_jax import losses


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def dino_loss(student_logits, teacher_logits, center, student_temp, teacher_temp, n_global=2):
  """The DINO loss of Caron et al. (2021) in one call, composed as objective.py composes it
  (the step computes the targets once and shares them with the statistics)."""
  q = losses.teacher_probs(teacher_logits, center, teacher_temp)
  return losses.cross_entropy_pairs(student_logits, q, student_temp, n_global)


def update_center(center, teacher_logits, momentum=0.9):
  """The center update as the step does it: an EMA of the batch mean of the teacher logits."""
  return losses.center_ema(
      center, jnp.mean(teacher_logits.astype(jnp.float32), axis=0, keepdims=True), momentum)


def np_dino_loss(student, teacher, center, s_temp, t_temp, n_global):
  """Loop over (teacher global view iq, student view v != iq) pairs, as in the paper."""
  n_crops = student.shape[0] // (teacher.shape[0] // n_global)
  s_chunks = np.split(student / s_temp, n_crops)
  q_chunks = np.split(np_softmax((teacher - center) / t_temp), n_global)
  total, n_terms = 0.0, 0
  for iq, q in enumerate(q_chunks):
    for v, s in enumerate(s_chunks):
      if v == iq:
        continue
      logp = s - s.max(-1, keepdims=True)
      logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
      total += np.mean(np.sum(-q * logp, axis=-1))
      n_terms += 1
  return total / n_terms


class DinoLossTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((2, 0, 4, 16), (2, 6, 3, 32), (2, 10, 5, 8), (1, 3, 2, 10))
  def test_matches_numpy(self, n_global, n_local, batch, k):
    rng = np.random.default_rng(n_local + k)
    student = rng.normal(size=((n_global + n_local) * batch, k)).astype(np.float32) * 3
    teacher = rng.normal(size=(n_global * batch, k)).astype(np.float32) * 3
    center = rng.normal(size=(1, k)).astype(np.float32)
    fn = self.variant(lambda s, t, c: dino_loss(s, t, c, 0.1, 0.04, n_global))
    got = fn(student, teacher, center)
    want = np_dino_loss(student.astype(np.float64), teacher.astype(np.float64),
                        center.astype(np.float64), 0.1, 0.04, n_global)
    np.testing.assert_allclose(got, want, rtol=2e-5)

  def test_uniform_student_gives_log_k(self):
    k, b = 64, 4
    student = jnp.zeros((8 * b, k))
    teacher = jax.random.normal(jax.random.PRNGKey(0), (2 * b, k))
    loss = dino_loss(student, teacher, jnp.zeros((1, k)), 0.1, 0.04)
    np.testing.assert_allclose(loss, np.log(k), rtol=1e-6)

  def test_permuting_local_views_changes_nothing(self):
    b, k = 3, 20
    key_s, key_t = jax.random.split(jax.random.PRNGKey(1))
    student = jax.random.normal(key_s, (6 * b, k))
    teacher = jax.random.normal(key_t, (2 * b, k))
    chunks = jnp.split(student, 6)
    permuted = jnp.concatenate(chunks[:2] + [chunks[5], chunks[3], chunks[2], chunks[4]])
    a = dino_loss(student, teacher, jnp.zeros((1, k)), 0.1, 0.05)
    c = dino_loss(permuted, teacher, jnp.zeros((1, k)), 0.1, 0.05)
    np.testing.assert_allclose(a, c, rtol=1e-6)

  def test_swapping_global_views_together_changes_nothing(self):
    b, k = 3, 20
    key_s, key_t = jax.random.split(jax.random.PRNGKey(2))
    student = jax.random.normal(key_s, (4 * b, k))
    teacher = jax.random.normal(key_t, (2 * b, k))
    s, t = jnp.split(student, 4), jnp.split(teacher, 2)
    swapped_s = jnp.concatenate([s[1], s[0], s[2], s[3]])
    swapped_t = jnp.concatenate([t[1], t[0]])
    a = dino_loss(student, teacher, jnp.zeros((1, k)), 0.1, 0.05)
    c = dino_loss(swapped_s, swapped_t, jnp.zeros((1, k)), 0.1, 0.05)
    np.testing.assert_allclose(a, c, rtol=1e-6)

  def test_no_gradient_through_teacher(self):
    k = 8
    student = jax.random.normal(jax.random.PRNGKey(3), (4, k))
    teacher = jax.random.normal(jax.random.PRNGKey(4), (2, k))
    g = jax.grad(lambda t: dino_loss(student, t, jnp.zeros((1, k)), 0.1, 0.04))(teacher)
    np.testing.assert_array_equal(g, 0)

  def test_rows_not_multiple_of_batch_raise(self):
    with pytest.raises(ValueError, match='not multiples'):
      dino_loss(jnp.zeros((7, 4)), jnp.zeros((4, 4)), jnp.zeros((1, 4)), 0.1, 0.04)


def test_update_center_is_ema_of_batch_mean():
  rng = np.random.default_rng(0)
  center = rng.normal(size=(1, 16)).astype(np.float32)
  teacher = rng.normal(size=(10, 16)).astype(np.float32)
  got = update_center(center, teacher, 0.9)
  np.testing.assert_allclose(got, 0.9 * center + 0.1 * teacher.mean(0, keepdims=True),
                             rtol=1e-6)


def test_update_center_sharded_equals_single_device():
  """A mean under jit over a batch sharded on 8 devices is the global mean."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from dino_jax import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(-1, 1)
  teacher = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
  x = jax.device_put(teacher, NamedSharding(mesh, P(sharding.AXES)))
  got = jax.jit(update_center)(jnp.zeros((1, 8)), x, 0.9)
  np.testing.assert_allclose(got, 0.1 * teacher.mean(0, keepdims=True), rtol=1e-6)


def test_entropy_of_uniform_is_log_k():
  np.testing.assert_allclose(losses.entropy(jnp.full((3, 50), 1 / 50)), np.log(50), rtol=1e-6)
