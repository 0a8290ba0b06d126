"""The benchmark's FLOP count (its MFU rests on it): matrix products counted exactly, through
jit, grad, scan and the model's attention, whatever kernel would run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax import bench
from dino_jax.models import vit


def test_dot_flops_counts_2mnk_through_jit_grad_and_scan():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
  fwd = 2 * 8 * 16 * 32
  assert bench._model_flops(jax.jit(lambda x, w: x @ w), x, w) == fwd  # pylint: disable=protected-access
  # the gradient w.r.t. both operands adds two products of the same size
  grad = jax.grad(lambda x, w: jnp.sum(x @ w), argnums=(0, 1))
  assert bench._model_flops(grad, x, w) == 3 * fwd  # pylint: disable=protected-access

  def body(c, _):
    return c @ jnp.ones((16, 16)), None
  scanned = lambda c: jax.lax.scan(body, c, None, length=5)[0]
  assert bench._model_flops(scanned, jnp.ones((8, 16))) == 5 * 2 * 8 * 16 * 16  # pylint: disable=protected-access
  # one branch of a cond runs: the costlier one is counted, not both
  branchy = lambda p, x: jax.lax.cond(p, lambda x: x @ w, lambda x: (x @ w) @ w.T @ w, x)
  assert bench._model_flops(branchy, True, x) == fwd + 2 * 8 * 32 * 16 + fwd  # pylint: disable=protected-access


def test_attention_is_counted_as_plain_products(monkeypatch):
  """4 * B * H * N^2 * D for QK^T and PV, plus the Attention module's linears."""
  b, n, h, d = 2, 10, 3, 8
  q = jnp.ones((b, n, h, d))
  want = 2 * (2 * b * h * n * n * d)
  assert bench._model_flops(lambda q: vit.fused_attention(q, q, q, 0.5), q) == want  # pylint: disable=protected-access
  attn = vit.Attention(h * d, h, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.ones((b, n, h * d))
  gd, params = nnx.split(attn)
  got = bench._model_flops(lambda p, x: nnx.merge(gd, p)(x)[0], params, x)  # pylint: disable=protected-access
  linears = 2 * b * n * (h * d) * (3 * h * d) + 2 * b * n * (h * d) * (h * d)
  np.testing.assert_equal(got, want + linears)


def test_count_is_not_taken_from_an_earlier_trace(monkeypatch):
  """The bench lowers the step (with cuDNN attention on GPUs) before counting; the count must
  come from a fresh trace with XLA's attention, not from JAX's cached one."""
  monkeypatch.delenv('DINO_JAX_ATTENTION', raising=False)
  f = jax.jit(lambda x: x @ x if os.environ.get('DINO_JAX_ATTENTION') == 'xla' else x + 1)
  x = jnp.ones((4, 4))
  f.lower(x)  # cached trace: no product
  assert bench._model_flops(f, x) == 2 * 4 * 4 * 4  # pylint: disable=protected-access
  assert 'DINO_JAX_ATTENTION' not in os.environ
