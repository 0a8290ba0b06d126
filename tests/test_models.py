"""ViT and DINOHead: shapes, init, parameter counts, pos-embed interpolation semantics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import models
from dino_jax.models import head as head_lib
from dino_jax.models import attention as attention_lib
from dino_jax.models import vit as vit_lib


def torch_upsample_bicubic_reference(x, out_h, out_w, scale_h, scale_w):
  """Per-pixel transcription of torch's upsample_bicubic2d (align_corners=False, explicit
  scale factors): src = (dst + 0.5) / scale - 0.5, cubic convolution A=-0.75, clamped taps."""
  a = -0.75

  def cc1(t):  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1

  def cc2(t):  # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

  def coeffs(t):
    return [cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t)]

  in_h, in_w = x.shape[:2]
  out = np.zeros((out_h, out_w) + x.shape[2:])
  for oy in range(out_h):
    sy = (oy + 0.5) / scale_h - 0.5
    iy = math.floor(sy)
    wy = coeffs(sy - iy)
    for ox in range(out_w):
      sx = (ox + 0.5) / scale_w - 0.5
      ix = math.floor(sx)
      wx = coeffs(sx - ix)
      acc = 0
      for m in range(4):
        yy = min(max(iy - 1 + m, 0), in_h - 1)
        for n in range(4):
          xx = min(max(ix - 1 + n, 0), in_w - 1)
          acc = acc + wy[m] * wx[n] * x[yy, xx]
      out[oy, ox] = acc
  return out


@pytest.mark.parametrize('src,h,w', [(14, 6, 6), (4, 2, 2), (4, 7, 5), (3, 8, 8)])
def test_pos_embed_interpolation_matches_torch_bicubic(src, h, w):
  rng = np.random.default_rng(src * 100 + h)
  pos = rng.normal(size=(1, src * src, 3)).astype(np.float32)
  got = np.asarray(vit_lib.interpolate_pos_embed(jnp.asarray(pos), h, w)).reshape(h, w, 3)
  want = torch_upsample_bicubic_reference(pos.reshape(src, src, 3).astype(np.float64), h, w,
                                          (h + 0.1) / src, (w + 0.1) / src)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_pos_embed_interpolation_matches_torch_when_installed():
  torch = pytest.importorskip('torch', reason='torch (the `torch` extra) is not installed')
  pos = np.random.default_rng(0).normal(size=(1, 196, 8)).astype(np.float32)
  t = torch.from_numpy(pos).reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
  for h, w in ((6, 6), (30, 40)):
    ref = torch.nn.functional.interpolate(t, scale_factor=((h + 0.1) / 14, (w + 0.1) / 14),
                                          mode='bicubic', align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, h * w, 8).numpy()
    got = vit_lib.interpolate_pos_embed(jnp.asarray(pos), h, w)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_interpolation_is_identity_at_native_size():
  pos = jnp.arange(16 * 3, dtype=jnp.float32).reshape(1, 16, 3)
  assert vit_lib.interpolate_pos_embed(pos, 4, 4) is pos


def count(module_fn):
  abstract = nnx.eval_shape(module_fn)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_parameter_counts_match_official_models():
  vit_s16 = vit_lib.ViTConfig.from_variant('vit_small', 16)
  assert count(lambda: vit_lib.ViT(vit_s16, rngs=nnx.Rngs(0))) == 21_665_664
  vit_b16 = vit_lib.ViTConfig.from_variant('vit_base', 16)
  assert count(lambda: vit_lib.ViT(vit_b16, rngs=nnx.Rngs(0))) == 85_798_656
  assert count(lambda: head_lib.DINOHead(384, 65536, rngs=nnx.Rngs(0))) == 22_352_128


def small_vit(**kw):
  cfg = vit_lib.ViTConfig(width=32, depth=3, heads=4, patch_size=4, img_size=16, **kw)
  return vit_lib.ViT(cfg, rngs=nnx.Rngs(0))


def test_outputs_shapes_and_attention():
  model = small_vit()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  out = model(x, n_last=2, return_attention=True)
  assert out.cls.shape == (2, 32) and out.patches.shape == (2, 16, 32)
  assert len(out.intermediates) == 2
  np.testing.assert_allclose(out.intermediates[-1][:, 0], out.cls, rtol=1e-6)
  assert out.attention.shape == (2, 4, 17, 17)
  np.testing.assert_allclose(out.attention.sum(-1), 1.0, rtol=1e-5)
  other = model(jax.random.normal(jax.random.PRNGKey(1), (2, 8, 12, 3)))  # other size
  assert other.patches.shape == (2, 6, 32)


def test_layernorm_eps_and_exact_gelu():
  model = small_vit()
  assert model.norm.epsilon == 1e-6 and model.blocks[0].norm1.epsilon == 1e-6
  mlp = model.blocks[0].mlp
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 32))
  h = mlp.fc1(x)
  want = mlp.fc2(0.5 * h * (1 + jax.scipy.special.erf(h / jnp.sqrt(2.0))))
  np.testing.assert_allclose(mlp(x), want, rtol=1e-5, atol=1e-6)


def test_gelu_matches_erfc_form_and_its_gradient():
  """vit.gelu (erf form, hand-written derivative) is jax.nn.gelu's exact GELU, value and
  gradient, over the tails too; it keeps the input dtype."""
  x = jnp.linspace(-12.0, 12.0, 20001)
  np.testing.assert_allclose(vit_lib.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
  grad = jax.vmap(jax.grad(vit_lib.gelu))(x)
  want = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x)
  np.testing.assert_allclose(grad, want, atol=2e-6)
  # the derivative at a few points by formula: Phi(x) + x phi(x)
  for t in (-2.0, 0.0, 0.5, 3.0):
    phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    np.testing.assert_allclose(jax.grad(vit_lib.gelu)(t), cdf + t * phi, rtol=1e-5)
  assert vit_lib.gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_drop_path_rates_and_behaviour():
  model = small_vit(drop_path_rate=0.2)
  np.testing.assert_allclose([b.drop_path_rate for b in model.blocks], [0.0, 0.1, 0.2])
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 16, 16, 3))
  a = model(x).cls
  np.testing.assert_array_equal(a, model(x).cls)  # no key: deterministic
  b = model(x, key=jax.random.PRNGKey(1)).cls
  assert not np.allclose(a, b)
  # drop_path itself: about rate of the rows zeroed, survivors scaled by 1/keep
  y = vit_lib.drop_path(jnp.ones((4000, 3)), 0.25, jax.random.PRNGKey(2))
  zero = np.all(np.asarray(y) == 0, axis=1)
  assert abs(zero.mean() - 0.25) < 0.03
  np.testing.assert_allclose(np.asarray(y)[~zero], 1 / 0.75, rtol=1e-6)


def test_init_statistics():
  model = vit_lib.ViT(vit_lib.ViTConfig.from_variant('vit_small', 16), rngs=nnx.Rngs(0))
  assert abs(float(jnp.std(model.blocks[0].mlp.fc1.kernel[...])) - 0.02) < 1e-3
  np.testing.assert_array_equal(model.blocks[0].mlp.fc1.bias[...], 0)
  assert abs(float(jnp.std(model.pos_embed[...])) - 0.02) < 1e-3
  bound = 1 / math.sqrt(3 * 16 * 16)
  w = np.asarray(model.patch_embed.kernel[...])
  assert w.min() >= -bound and w.max() <= bound and w.max() > 0.9 * bound


def test_head_weight_norm_and_l2():
  head = head_lib.DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 32))
  out = head(x)
  assert out.shape == (5, 50)
  # with g = 1 each logit is a cosine similarity: |logit| <= 1
  assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-5
  head.last_layer.weight_g[...] = jnp.full((1, 50), 2.0)
  np.testing.assert_allclose(head(x), 2 * out, rtol=1e-5)
  v = np.asarray(head.last_layer.weight_v[...])
  assert np.abs(v).max() <= 1 / 4 and np.abs(v).max() > 0.2  # U(+-1/sqrt(16))


def test_teacher_build_has_no_drop_path(config):
  student = models.build(config)
  teacher = models.build(config, teacher=True)
  assert student.backbone.blocks[-1].drop_path_rate == pytest.approx(0.1)
  assert all(b.drop_path_rate == 0 for b in teacher.backbone.blocks)


def test_unknown_arch_is_rejected():
  with pytest.raises(ValueError, match='unknown arch'):
    vit_lib.ViTConfig.from_variant('vit_huge_typo', 16)


@pytest.mark.parametrize('n,multiple', [(197, 8), (37, 64), (5, 2)])
def test_padded_attention_equals_unpadded(n, multiple):
  """The padding used to meet cuDNN's shape rules changes nothing: padded keys get no weight
  and padded queries are dropped (checked here through XLA's kernel, the one CPUs have)."""
  q, k, v = jax.random.normal(jax.random.PRNGKey(n), (3, 2, n, 3, 16))
  ref = jax.nn.dot_product_attention(q, k, v, scale=0.25, implementation='xla')
  out = attention_lib.padded_attention(q, k, v, 0.25, multiple, 'xla')
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=2e-6)
  grad = jax.grad(lambda q: attention_lib.padded_attention(q, k, v, 0.25, multiple, 'xla').sum())(q)
  np.testing.assert_allclose(grad, jax.grad(lambda q: jax.nn.dot_product_attention(
      q, k, v, scale=0.25).sum())(q), atol=2e-5)


def test_attention_path_choice(monkeypatch):
  assert attention_lib.attention_implementation(jnp.bfloat16) == 'xla'  # CPU: no cuDNN
  monkeypatch.setenv('DINO_JAX_ATTENTION', 'cudnn')
  assert attention_lib.attention_implementation(jnp.float32) == 'cudnn'
  monkeypatch.setenv('DINO_JAX_ATTENTION', 'flash')
  with pytest.raises(ValueError, match='DINO_JAX_ATTENTION'):
    attention_lib.attention_implementation(jnp.float32)


def _picky_cudnn(monkeypatch, refuse):
  """Stand-in for jax.nn.dot_product_attention whose 'cudnn' path, like cuDNN's, refuses some
  shapes only in its training forward rule; it computes with XLA otherwise."""
  real = jax.nn.dot_product_attention

  def fake(q, k, v, *, scale=None, implementation=None, query_seq_lengths=None,
           key_value_seq_lengths=None):
    xla = lambda q, k, v, ql, kl: real(q, k, v, scale=scale, query_seq_lengths=ql,
                                       key_value_seq_lengths=kl, implementation='xla')
    if implementation != 'cudnn':
      return xla(q, k, v, query_seq_lengths, key_value_seq_lengths)
    full = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    ql = full if query_seq_lengths is None else query_seq_lengths
    kl = full if key_value_seq_lengths is None else key_value_seq_lengths

    @jax.custom_vjp
    def attn(q, k, v, ql, kl):
      return xla(q, k, v, ql, kl)

    def fwd(q, k, v, ql, kl):
      if refuse(q.shape[1]):
        raise NotImplementedError(f'Unsupported sequence length Q {q.shape[1]}')
      return jax.vjp(lambda q, k, v: xla(q, k, v, ql, kl), q, k, v)

    attn.defvjp(fwd, lambda vjp, g: (*vjp(g), None, None))
    return attn(q, k, v, ql, kl)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake)
  monkeypatch.setattr(attention_lib, 'attention_implementation', lambda dtype: 'cudnn')
  attention_lib._cudnn_padding.cache_clear()  # pylint: disable=protected-access


@pytest.mark.parametrize('wrap', ['plain', 'remat', 'scan'])
def test_cudnn_refusal_in_training_pads_or_falls_back(monkeypatch, wrap):
  """cuDNN refusing odd lengths only in the gradient's forward rule (which under remat or scan
  runs outside the model's own code) still picks a padding it accepts; refusing every
  length falls back to XLA; the gradients equal XLA's throughout."""
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 37, 2, 8))

  def grad_of(fn):
    attn = lambda q: jnp.sum(jnp.sin(fn(q, q, q, 0.3)))
    if wrap == 'remat':
      attn = jax.checkpoint(attn)
    if wrap == 'scan':
      one = attn
      attn = lambda q: jax.lax.scan(lambda c, _: (c + one(q), None), 0.0, None, length=2)[0]
    return jax.jit(jax.grad(attn))(q)

  want = grad_of(lambda q, k, v, s: jax.nn.dot_product_attention(q, k, v, scale=s))
  _picky_cudnn(monkeypatch, refuse=lambda n: n % 8 != 0)
  np.testing.assert_allclose(grad_of(attention_lib.fused_attention), want, atol=1e-5)
  assert attention_lib._cudnn_padding((2, 37, 2, 8), jnp.dtype(jnp.float32))[0] == 8  # pylint: disable=protected-access
  _picky_cudnn(monkeypatch, refuse=lambda n: True)
  np.testing.assert_allclose(grad_of(attention_lib.fused_attention), want, atol=1e-5)
  assert attention_lib._cudnn_padding((2, 37, 2, 8), jnp.dtype(jnp.float32))[0] is None  # pylint: disable=protected-access


def test_forced_cudnn_without_cudnn_is_a_clear_error(monkeypatch):
  monkeypatch.setenv('DINO_JAX_ATTENTION', 'cudnn')
  attention_lib._cudnn_padding.cache_clear()  # pylint: disable=protected-access
  q = jnp.ones((1, 5, 1, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match=r'DINO_JAX_ATTENTION=cudnn, but cuDNN takes no '
                                       r'attention over \(1, 5, 1, 8\) bfloat16'):
    attention_lib.fused_attention(q, q, q, 0.5)
