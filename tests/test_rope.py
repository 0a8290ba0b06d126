"""DINOv3 backbone options: axial RoPE (models/rope.py), untied CLS norms, masked key bias, no
qkv bias, LayerNorm eps, SwiGLU alignment and the DINOv3 sizes.

The references are written here from the definitions (README, "Where we differ": DINOv3):
coordinates (i + 0.5) / n mapped to [-1, 1], periods base ** (4j / D_head) or geometric
min..max, channel j rotating with channel j + D_head / 2 by 2 pi * coordinate / period_j (rows
for j < D_head / 4, columns after), shift / jitter / rescale of the coordinates in that order.
With every option off the ViT gives the numbers it gave before the options existed.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import models, validate
from dino_jax.models import rope
from dino_jax.models import vit as vit_lib

HD = 16  # head dim of the tiny models: 4 periods per axis


def tiny(**kw):
  kw = {'width': 32, 'depth': 2, 'heads': 2, 'patch_size': 4, 'img_size': 16, **kw}
  return vit_lib.ViT(vit_lib.ViTConfig(**kw), rngs=nnx.Rngs(0))


def flat_shapes(module):
  state = nnx.state(module, nnx.Param).to_pure_dict()
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {'.'.join(str(getattr(k, 'key', k)) for k in path): tuple(v.shape) for path, v in flat}


def ref_coords(gh, gw, normalize):
  n = {'separate': (gh, gw), 'max': (max(gh, gw),) * 2, 'min': (min(gh, gw),) * 2}[normalize]
  return np.array([[2 * (i + 0.5) / n[0] - 1, 2 * (j + 0.5) / n[1] - 1]
                   for i in range(gh) for j in range(gw)])


def ref_rotate(x, coords, periods):
  """(N, D) vectors rotated pairwise, one loop per pair, in float64."""
  x = np.asarray(x, np.float64)
  out = x.copy()
  d, q = x.shape[-1], x.shape[-1] // 4
  for t, (y, xc) in enumerate(coords):
    for j in range(2 * q):  # pairs (j, j + d/2): rows for j < d/4, columns after
      theta = 2 * math.pi * (y if j < q else xc) / periods[j % q]
      a, b = x[t, j], x[t, j + d // 2]
      out[t, j] = a * math.cos(theta) - b * math.sin(theta)
      out[t, j + d // 2] = b * math.cos(theta) + a * math.sin(theta)
  return out


def test_periods_and_coordinates_follow_their_definitions():
  np.testing.assert_allclose(rope.periods(HD, rope.Spec(base=100.0)),
                             [100.0 ** (4 * j / HD) for j in range(4)], rtol=1e-6)
  p = rope.periods(HD, rope.Spec(min_period=0.5, max_period=40.0))
  np.testing.assert_allclose(p, 0.5 * (80.0 ** (np.arange(4) / 3)), rtol=1e-6)
  assert p[0] == pytest.approx(0.5) and p[-1] == pytest.approx(40.0)
  for normalize in rope.NORMALIZE:
    np.testing.assert_allclose(rope.coords(3, 5, normalize), ref_coords(3, 5, normalize),
                               atol=1e-7)
  c = rope.coords(4, 4)
  assert c.min() == -0.75 and c.max() == 0.75 and c.dtype == np.float32
  with pytest.raises(ValueError, match='divisible by 4'):
    rope.periods(18, rope.Spec())


@pytest.mark.parametrize('normalize', rope.NORMALIZE)
def test_rotation_of_each_axis_matches_the_pairwise_reference(normalize):
  gh, gw, prefix = 3, 4, 2
  spec = rope.Spec(base=7.0, normalize=normalize)
  sin, cos = rope.tables(spec, gh, gw, prefix, HD)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, prefix + gh * gw, 3, HD))
  got = rope.apply(x, sin, cos)
  assert got.dtype == x.dtype
  want = ref_rotate(np.asarray(x[1, prefix:, 2]), ref_coords(gh, gw, normalize),
                    [7.0 ** (4 * j / HD) for j in range(4)])
  np.testing.assert_allclose(got[1, prefix:, 2], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[:, :prefix], x[:, :prefix])  # CLS, storage untouched
  # bf16 in, bf16 out, computed in f32
  xb = x.astype(jnp.bfloat16)
  got_b = rope.apply(xb, sin, cos)
  assert got_b.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got_b, rope.apply(xb.astype(jnp.float32), sin, cos)
                                .astype(jnp.bfloat16))


def test_logits_depend_only_on_the_coordinate_difference():
  period = rope.periods(HD, rope.Spec())
  q, k = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 6, 1, HD))
  c = jax.random.uniform(jax.random.PRNGKey(2), (6, 2), minval=-1, maxval=1)

  def logits(cq, ck):
    rq = rope.apply(q, *rope.sincos(cq, period))[0, :, 0]
    rk = rope.apply(k, *rope.sincos(ck, period))[0, :, 0]
    return rq @ rk.T

  base = logits(c, c)
  for delta in ([0.3, -1.7], [5.0, 0.0], [0.0, 2.5]):
    shifted = c + jnp.asarray(delta)
    np.testing.assert_allclose(logits(shifted, shifted), base, rtol=1e-4, atol=1e-4)
  # ... and do depend on it: moving only the keys changes them
  assert not np.allclose(logits(c, c + jnp.asarray([0.3, 0.0])), base, atol=1e-3)
  # a token against itself: the rotation is orthogonal, q.q unchanged wherever it sits
  rq = rope.apply(q, *rope.sincos(c, period))
  np.testing.assert_allclose(jnp.sum(rq ** 2, -1), jnp.sum(q ** 2, -1), rtol=1e-5)


def _augmented(spec, n_keys=256):
  c = jnp.asarray(rope.coords(4, 2))  # no zero coordinate: factors are ratios
  keys = jax.random.split(jax.random.PRNGKey(7), n_keys)
  return np.asarray(c), np.asarray(jax.vmap(lambda k: rope.augment(c, spec, k))(keys))


def test_shift_moves_all_coordinates_by_one_amount_per_axis():
  c, out = _augmented(rope.Spec(shift=0.25))
  d = out - c  # (keys, N, 2)
  np.testing.assert_allclose(d, np.broadcast_to(d[:, :1], d.shape), atol=1e-6)
  u = d[:, 0]
  assert np.all(np.abs(u) <= 0.25) and np.abs(u).max() > 0.23  # U[-s, s], range covered
  assert not np.allclose(u[:, 0], u[:, 1])  # the axes draw apart


def test_jitter_scales_each_axis_by_its_own_factor():
  c, out = _augmented(rope.Spec(jitter=1.5))
  f = out / c
  np.testing.assert_allclose(f, np.broadcast_to(f[:, :1], f.shape), rtol=1e-5)
  logf = np.log(f[:, 0])
  assert np.all(np.abs(logf) <= math.log(1.5) + 1e-6)
  assert np.abs(logf).max() > 0.9 * math.log(1.5)  # log-uniform over [1/j, j]
  assert not np.allclose(logf[:, 0], logf[:, 1])


def test_rescale_scales_both_axes_by_one_factor():
  c, out = _augmented(rope.Spec(rescale=2.0))
  f = out / c
  np.testing.assert_allclose(f, np.broadcast_to(f[:, :1, :1], f.shape), rtol=1e-5)
  logf = np.log(f[:, 0, 0])
  assert np.all(np.abs(logf) <= math.log(2.0) + 1e-6)
  assert np.abs(logf).max() > 0.9 * math.log(2.0)
  assert abs(np.mean(logf)) < 0.1  # symmetric in log space


def test_shift_then_jitter_then_rescale_with_independent_draws():
  key = jax.random.PRNGKey(3)
  c = jnp.asarray(rope.coords(2, 4))
  u = rope.augment(c, rope.Spec(shift=0.5), key) - c
  fj = rope.augment(c, rope.Spec(jitter=3.0), key) / c
  fr = rope.augment(c, rope.Spec(rescale=2.0), key) / c
  both = rope.augment(c, rope.Spec(shift=0.5, jitter=3.0, rescale=2.0), key)
  np.testing.assert_allclose(both, (c + u) * fj * fr, rtol=1e-5, atol=1e-6)


def test_augmentations_only_with_a_key_and_anew_in_every_block():
  model = tiny(pos_embed='rope', rope_shift=0.1, rope_jitter=1.2, rope_rescale=2.0,
               n_registers=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 12, 3))
  plain = tiny(pos_embed='rope', n_registers=1).rope_tables(x, None)[0]
  for t in model.rope_tables(x, None):  # eval: no augmentation
    np.testing.assert_array_equal(t[0], plain[0])
  assert plain[0].shape == (2 + 4 * 3, HD)  # CLS, 1 register, 4 x 3 patches
  train = model.rope_tables(x, jax.random.PRNGKey(1))
  assert not np.allclose(train[0][0], plain[0]) and not np.allclose(train[0][0], train[1][0])
  np.testing.assert_array_equal(model(x).cls, model(x).cls)  # eval is deterministic
  assert not np.allclose(model(x, key=jax.random.PRNGKey(1)).cls, model(x).cls)


def test_rope_model_has_no_pos_embed_and_leaves_cls_and_storage_unrotated():
  model = tiny(pos_embed='rope', n_registers=2)
  shapes = flat_shapes(model)
  assert 'pos_embed' not in shapes and model.pos_embed is None
  assert not any('rope' in k or 'period' in k for k in shapes)  # periods: constants
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  tokens = model.tokens(x)
  np.testing.assert_array_equal(tokens[:, 0], jnp.broadcast_to(model.cls_token[0, 0], (2, 32)))
  attn = model.blocks[0].attn
  qkv = attn.qkv(tokens)
  tables = model.rope_tables(x, None)[0]
  q0, k0, v0 = attn._heads(qkv, HD)
  q, k, v = attn._heads(qkv, HD, tables)
  np.testing.assert_array_equal(q[:, :3], q0[:, :3])
  np.testing.assert_array_equal(k[:, :3], k0[:, :3])
  np.testing.assert_array_equal(v, v0)
  assert not np.allclose(q[:, 3:], q0[:, 3:])
  out = model(x, n_last=2, return_attention=True)
  assert out.attention.shape == (2, 2, 19, 19) and out.registers.shape == (2, 2, 32)
  # the fused path and the attention-map path agree
  np.testing.assert_allclose(model(x).cls, out.cls, rtol=1e-5, atol=1e-5)
  # rectangular crops: one table row per patch
  assert model(jax.random.normal(jax.random.PRNGKey(1), (1, 8, 20, 3))).patches.shape == (
      1, 10, 32)


def test_a_shift_of_the_models_grid_leaves_its_attention_logits_unchanged():
  """In the model's own attention: every patch coordinate moved by one constant (a shift
  augmentation) leaves the patch-patch logits as they were; the unrotated CLS sits at angle 0,
  so its logits with the patches do see the absolute positions."""
  model = tiny(pos_embed='rope', depth=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 3))
  attn = model.blocks[0].attn
  tokens = model.tokens(x)
  qkv = attn.qkv(model.blocks[0].norm1(tokens))
  t = model.rope_tables(x, None)[0]
  q, k, _ = attn._heads(qkv, HD, t)
  # a table of the same grid shifted by a constant: logits among patches unchanged
  c = jnp.asarray(rope.coords(4, 4)) + jnp.asarray([0.4, -0.9])
  sin, cos = rope.sincos(c, rope.periods(HD, model.cfg.rope_spec))
  t2 = (jnp.concatenate([t[0][:1], sin]), jnp.concatenate([t[1][:1], cos]))
  q2, k2, _ = attn._heads(qkv, HD, t2)
  logits = lambda a, b: jnp.einsum('bqhd,bkhd->bhqk', a, b)
  np.testing.assert_allclose(logits(q2, k2)[..., 1:, 1:], logits(q, k)[..., 1:, 1:],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(logits(q2, k2)[..., 0, 0], logits(q, k)[..., 0, 0])
  assert not np.allclose(logits(q2, k2)[..., 0, 1:], logits(q, k)[..., 0, 1:], atol=1e-3)


def test_untied_norms_for_cls_storage_and_local_crops():
  model = tiny(pos_embed='rope', n_registers=1, untie_cls_and_patch_norms=True,
               untie_global_and_local_cls_norm=True)
  shapes = flat_shapes(model)
  assert shapes['cls_norm.scale'] == (32,) and shapes['local_cls_norm.scale'] == (32,)
  model.cls_norm.bias[...] = jnp.full(32, 1.0)
  model.local_cls_norm.bias[...] = jnp.full(32, 2.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 32))

  def ln(v, bias):
    v = np.asarray(v, np.float64)
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) + bias

  for local, bias in ((False, 1.0), (True, 2.0)):
    got = model.final_norm(y, local)
    np.testing.assert_allclose(got[:, :2], ln(y[:, :2], bias), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 2:], ln(y[:, 2:], 0.0), rtol=1e-5, atol=1e-5)
  g, l = model(x), model(x, local=True)
  np.testing.assert_allclose(l.cls - g.cls, 1.0, atol=1e-5)
  np.testing.assert_allclose(l.registers - g.registers, 1.0, atol=1e-5)
  np.testing.assert_array_equal(l.patches, g.patches)
  only_local = tiny(untie_global_and_local_cls_norm=True)
  assert only_local.cls_norm is None
  np.testing.assert_array_equal(only_local.final_norm(y)[:, 0], only_local.norm(y)[:, 0])


def test_masked_key_bias_and_no_qkv_bias():
  model = tiny(mask_k_bias=True)
  qkv = model.blocks[0].attn.qkv
  assert flat_shapes(model)['blocks.0.attn.qkv.bias'] == (96,)
  qkv.bias[...] = jax.random.normal(jax.random.PRNGKey(0), (96,))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 32))
  want = np.array(x @ qkv.kernel[...])
  b = np.asarray(qkv.bias[...])
  want[..., :32] += b[:32]
  want[..., 64:] += b[64:]  # q and v get their bias, k none
  np.testing.assert_allclose(qkv(x), want, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda bias: jnp.sum(jnp.sin(
      x @ qkv.kernel[...] + bias * np.r_[np.ones(32), np.zeros(32), np.ones(32)])))(qkv.bias[...])
  assert np.all(np.asarray(grad)[32:64] == 0)
  shapes = flat_shapes(tiny(qkv_bias=False, mask_k_bias=True))
  assert 'blocks.0.attn.qkv.bias' not in shapes and 'blocks.0.attn.proj.bias' in shapes


def test_ln_eps_and_storage_init():
  model = tiny(ln_eps=1e-5, n_registers=4, register_init_std=0.02)
  assert model.norm.epsilon == 1e-5 and model.blocks[1].norm2.epsilon == 1e-5
  assert 0.005 < float(jnp.std(model.register_tokens[...])) < 0.05


def test_swiglu_alignment_and_the_dinov3_sizes():
  assert vit_lib.swiglu_hidden(100, 4.0) == 272  # int(400 * 2/3) = 266 -> multiple of 8
  assert vit_lib.swiglu_hidden(100, 4.0, 64) == 320
  # official constructors: (width, depth, heads), FFN ratio, SwiGLU hidden
  want = {'vit_small': (384, 12, 6, 'mlp', 1536), 'vit_small_plus': (384, 12, 6, 'swiglu', 1536),
          'vit_base': (768, 12, 12, 'mlp', 3072), 'vit_large': (1024, 24, 16, 'mlp', 4096),
          'vit_large_plus': (1024, 24, 16, 'swiglu', 4096),
          'vit_huge_plus': (1280, 32, 20, 'swiglu', 5120),
          'vit_7b': (4096, 40, 32, 'swiglu', 8192)}
  for arch, (d, depth, heads, ffn, hidden) in want.items():
    cfg = vit_lib.ViTConfig.from_variant(arch, 16)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.ffn) == (d, depth, heads, ffn), arch
    got = (vit_lib.swiglu_hidden(d, cfg.mlp_ratio, cfg.swiglu_align) if ffn == 'swiglu'
           else int(d * cfg.mlp_ratio))
    assert got == hidden, (arch, got)
  assert vit_lib.ViTConfig.from_variant('vit_7b', 16).swiglu_align == 64


def _param_count(d, depth, hidden, swiglu, qkv_bias, grid_tokens=0, untie_local=False):
  """Parameters of a DINOv3 ViT/16 from its description: patch conv, CLS, 4 storage tokens,
  mask token, per block two norms, qkv (+ bias), proj, FFN, two LayerScales; final norm(s)."""
  ffn = d * 2 * hidden + 2 * hidden + hidden * d + d if swiglu else (
      d * hidden + hidden + hidden * d + d)
  block = 2 * 2 * d + 3 * d * d + (3 * d if qkv_bias else 0) + d * d + d + ffn + 2 * d
  return (3 * 16 * 16 * d + d + d + 4 * d + d + depth * block + 2 * d
          + (2 * d if untie_local else 0) + grid_tokens)


def test_dinov3_parameter_counts():
  def count(cfg):
    shapes = flat_shapes(nnx.eval_shape(lambda: vit_lib.ViT(cfg, rngs=nnx.Rngs(0))))
    assert 'pos_embed' not in shapes
    return sum(math.prod(s) for s in shapes.values())

  v3 = dict(pos_embed='rope', n_registers=4, layerscale=1e-5, mask_token=True, mask_k_bias=True)
  s16 = count(vit_lib.ViTConfig.from_variant('vit_small', 16, **v3))
  assert s16 == _param_count(384, 12, 1536, False, True)
  assert round(s16 / 1e6, 1) == 21.6  # DINOv3 ViT-S/16: 21M in the model card
  b7 = count(vit_lib.ViTConfig.from_variant('vit_7b', 16, qkv_bias=False,
                                             untie_global_and_local_cls_norm=True, **v3))
  assert b7 == _param_count(4096, 40, 8192, True, False, untie_local=True)
  assert round(b7 / 1e9, 1) == 6.7  # "6.7B parameters"


def test_packed_equals_one_pass_per_crop_size_with_rope():
  cfg = vit_lib.ViTConfig(width=32, depth=2, heads=2, patch_size=4, img_size=16,
                          drop_path_rate=0.3, mask_token=True, layerscale=0.1, n_registers=2,
                          pos_embed='rope', rope_shift=0.1, rope_jitter=1.3, rope_rescale=2.0,
                          untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True,
                          mask_k_bias=True)
  g = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  loc = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 12, 3))  # rectangular local crops
  masks = jax.random.bernoulli(jax.random.PRNGKey(2), 0.3, (4, 16))
  keys = list(jax.random.split(jax.random.PRNGKey(3)))
  gdef, params = nnx.split(vit_lib.ViT(cfg, rngs=nnx.Rngs(0)))

  def loss(p, packed, shards=1):
    vit = nnx.merge(gdef, p)
    if packed:
      og, ol = vit.packed([g, loc], keys=keys, masks=[masks, None], shards=shards,
                          local=[False, True])
    else:
      og, ol = vit(g, key=keys[0], masks=masks), vit(loc, key=keys[1], local=True)
    return (jnp.sum(og.cls ** 2) + jnp.sum(jnp.sin(og.patches)) + jnp.sum(og.registers ** 2)
            + jnp.sum(ol.cls ** 3) + jnp.sum(ol.registers))

  va, ga = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
  vb, gb = jax.jit(jax.value_and_grad(lambda p: loss(p, True, 2)))(params)
  np.testing.assert_allclose(vb, va, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(x))))
  assert float(jnp.max(jnp.abs(ga['local_cls_norm']['bias']))) > 0


def test_options_off_give_the_numbers_of_before():
  """Recorded with the ViT of commit 47f689a (before the DINOv3 options), same call."""
  model = tiny(n_registers=1, layerscale=0.1, drop_path_rate=0.3)
  assert model.cls_norm is None and model.local_cls_norm is None
  assert set(flat_shapes(model)) == set(flat_shapes(tiny(n_registers=1, layerscale=0.1)))
  out = model(jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3)),
              key=jax.random.PRNGKey(1))
  np.testing.assert_allclose(out.cls[:, :4], [
      [0.4591207802295685, 1.390248417854309, 0.9437896609306335, -1.036659598350525],
      [0.4841654896736145, 1.3576782941818237, 0.9461466670036316, -1.0230844020843506]],
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.patches[1, 5:7, :4], [
      [0.6114925146102905, 0.1948697865009308, -1.2095136642456055, 2.286771297454834],
      [-0.19792459905147552, -1.436694622039795, -0.16241681575775146, 0.9104205965995789]],
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.registers[0, 0, :4], [
      -0.7457534074783325, 0.122116819024086, -1.3122276067733765, -0.0037026358768343925],
      rtol=1e-5, atol=1e-6)


def test_config_maps_and_validates_the_dinov3_fields(config):
  cfg = models.vit_config(config)
  assert (cfg.pos_embed, cfg.mask_k_bias, cfg.qkv_bias, cfg.ln_eps) == ('learned', False,
                                                                         True, 1e-6)
  assert not (cfg.untie_cls_and_patch_norms or cfg.untie_global_and_local_cls_norm)
  assert (cfg.rope_shift, cfg.rope_jitter, cfg.rope_rescale) == (0.0, 0.0, 0.0)
  m = config.model
  m.pos_embed, m.rope_rescale, m.rope_normalize = 'rope', 2.0, 'max'
  m.untie_global_and_local_cls_norm, m.mask_k_bias, m.ln_eps = True, True, 1e-5
  m.n_registers, m.register_init_std, m.mask_token = 4, 0.02, True
  validate.validate(config)
  cfg = models.vit_config(config)
  assert (cfg.pos_embed, cfg.rope_rescale, cfg.rope_normalize, cfg.ln_eps) == (
      'rope', 2.0, 'max', 1e-5)
  assert cfg.untie_global_and_local_cls_norm and cfg.mask_k_bias
  student, teacher = models.build(config), models.build(config, teacher=True)
  assert student.backbone.pos_embed is None and student.backbone.local_cls_norm is not None
  assert teacher.backbone.cfg.rope_rescale == 2.0  # the teacher runs without a key: no effect
  for field, value, match in (
      ('pos_embed', 'sincos', "'sincos' is not one of"),
      ('rope_normalize', 'mean', "'mean' is not one of"),
      ('rope_jitter', 0.5, 'must be 0 \\(off\\) or >= 1'),
      ('rope_min_period', 1.0, 'rope_min_period and rope_max_period must both be 0'),
      ('ln_eps', 0.0, 'must be positive')):
    bad = config.copy_and_resolve_references()
    bad.model[field] = value
    with pytest.raises(validate.ConfigError, match=f'config.model.{field}: {match}'):
      validate.validate(bad)
  bad = config.copy_and_resolve_references()
  bad.model.arch = 'vit_small_plus'
  with pytest.raises(validate.ConfigError, match="config.model.ffn: vit_small_plus has a SwiGLU"):
    validate.validate(bad)
  with pytest.raises(ValueError, match='divisible by 4'):
    vit_lib.ViTConfig(width=36, depth=1, heads=2, patch_size=4, pos_embed='rope')


def test_the_students_local_crops_take_the_local_cls_norm_packed_or_not(config):
  """DINO.backbone_crops (the train step's student pass) marks its local crops as local."""
  m = config.model
  m.arch, m.pos_embed, m.rope_rescale, m.n_registers = 'vit_pico', 'rope', 2.0, 1
  m.untie_global_and_local_cls_norm = True
  g = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  loc = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  key = jax.random.PRNGKey(2)
  cls = {}
  for pack in (True, False):
    m.pack_crops = pack
    model = models.build(config)
    model.backbone.local_cls_norm.bias[...] = jnp.full(96, 3.0)
    g_out, cls[pack] = model.backbone_crops(g, loc, key)
    np.testing.assert_array_equal(cls[pack][:2], g_out.cls)
    assert float(jnp.min(jnp.mean(cls[pack][2:], -1))) > 2.9  # local: shifted by the bias
    assert float(jnp.max(jnp.abs(jnp.mean(cls[pack][:2], -1)))) < 0.1
  np.testing.assert_allclose(cls[True], cls[False], rtol=1e-5, atol=1e-5)
