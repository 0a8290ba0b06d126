"""DINOv2 backbone options: LayerScale, registers, SwiGLU, mask token, pos-embed resize modes.

Defaults must leave the DINO v1 ViT unchanged; each option is checked against its formula.
PyTorch parity of whole converted models is in test_convert.py.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import models, validate
from dino_jax.models import vit as vit_lib

V1_KEYS = {'cls_token', 'pos_embed', 'patch_embed.kernel', 'patch_embed.bias', 'norm.scale',
           'norm.bias'} | {f'blocks.0.{k}' for k in (
               'norm1.scale', 'norm1.bias', 'attn.qkv.kernel', 'attn.qkv.bias',
               'attn.proj.kernel', 'attn.proj.bias', 'norm2.scale', 'norm2.bias',
               'mlp.fc1.kernel', 'mlp.fc1.bias', 'mlp.fc2.kernel', 'mlp.fc2.bias')}


def flat_shapes(module):
  state = nnx.state(module, nnx.Param).to_pure_dict()
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {'.'.join(str(getattr(k, 'key', k)) for k in path): tuple(v.shape) for path, v in flat}


def tiny(**kw):
  kw = {'width': 32, 'depth': 2, 'heads': 2, 'patch_size': 4, 'img_size': 16, **kw}
  return vit_lib.ViT(vit_lib.ViTConfig(**kw), rngs=nnx.Rngs(0))


def images(b=2, h=16, w=16, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, h, w, 3))


def test_defaults_are_the_v1_vit(config):
  model = tiny(depth=1)
  assert set(flat_shapes(model)) == V1_KEYS
  assert model.register_tokens is None and model.mask_token is None
  assert model.blocks[0].ls1 is None and model.blocks[0].ls2 is None
  cfg = models.build(config).backbone.cfg
  assert (cfg.layerscale, cfg.n_registers, cfg.ffn, cfg.mask_token) == (0.0, 0, 'mlp', False)
  assert (cfg.interpolate_offset, cfg.interpolate_antialias) == (0.1, False)


def test_dinov2_vits14_parameter_count():
  """DINOv2 hub ViT-S/14: pos_embed for 518 px (1370 tokens), LayerScale, mask token."""
  cfg = vit_lib.ViTConfig.from_variant('vit_small', 14, img_size=518, layerscale=1e-5,
                                       mask_token=True)
  shapes = flat_shapes(nnx.eval_shape(lambda: vit_lib.ViT(cfg, rngs=nnx.Rngs(0))))
  d = 384
  v1_s16 = 21_665_664
  want = (v1_s16 - (d * 3 * 16 * 16 + d) + (d * 3 * 14 * 14 + d)  # patch conv 16 -> 14
          - 197 * d + 1370 * d  # pos_embed for 224/16 -> 518/14
          + 12 * 2 * d + d)  # two gammas per block, the mask token
  assert sum(math.prod(s) for s in shapes.values()) == want
  assert shapes['blocks.3.ls1.gamma'] == (d,) and shapes['mask_token'] == (1, d)
  assert len(shapes) == 175  # one Flax leaf per key of the official 175-key state_dict
  assert round(want / 1e6, 2) == 22.06


def test_vit_giant2_swiglu_shapes():
  cfg = vit_lib.ViTConfig.from_variant('vit_giant2', 14, ffn='swiglu', layerscale=1e-5)
  assert vit_lib.swiglu_hidden(1536, 4.0) == 4096
  shapes = flat_shapes(nnx.eval_shape(lambda: vit_lib.ViT(cfg, rngs=nnx.Rngs(0))))
  assert shapes['blocks.39.mlp.w12.kernel'] == (1536, 8192)
  assert shapes['blocks.39.mlp.w3.kernel'] == (4096, 1536)
  assert 'blocks.0.mlp.fc1.kernel' not in shapes


def test_swiglu_formula():
  model = tiny(ffn='swiglu')
  mlp = model.blocks[0].mlp
  hidden = vit_lib.swiglu_hidden(32, 4.0)
  assert hidden == 88  # int(128 * 2 / 3) = 85 -> 88
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 32))
  h = x @ mlp.w12.kernel[...] + mlp.w12.bias[...]
  gate, val = h[:, :hidden], h[:, hidden:]
  want = (gate * jax.nn.sigmoid(gate) * val) @ mlp.w3.kernel[...] + mlp.w3.bias[...]
  np.testing.assert_allclose(mlp(x), want, rtol=1e-5, atol=1e-6)


def test_layerscale_scales_both_branches():
  model = tiny(layerscale=1e-5)
  np.testing.assert_array_equal(model.blocks[1].ls2.gamma[...], np.full(32, 1e-5, np.float32))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
  block = model.blocks[0]
  for ls in (block.ls1, block.ls2):
    ls.gamma[...] = jnp.zeros(32)
  np.testing.assert_array_equal(block(x)[0], x)  # gamma 0: the block is the identity
  block.ls1.gamma[...] = jnp.full(32, 0.5)
  attn_only = x + 0.5 * block.attn(block.norm1(x))[0]
  np.testing.assert_allclose(block(x)[0], attn_only, rtol=1e-5, atol=1e-6)


def test_registers_order_shapes_and_no_pos_embed():
  model = tiny(n_registers=3)
  x = images()
  tokens = model.tokens(x)
  assert tokens.shape == (2, 1 + 3 + 16, 32)
  # registers sit after CLS, untouched by the positional embedding
  np.testing.assert_array_equal(tokens[:, 1:4], jnp.broadcast_to(model.register_tokens[...],
                                                                  (2, 3, 32)))
  np.testing.assert_allclose(tokens[:, 0], jnp.broadcast_to(
      model.cls_token[0, 0] + model.pos_embed[0, 0], (2, 32)), rtol=1e-6)
  out = model(x, n_last=2, return_attention=True)
  assert out.cls.shape == (2, 32) and out.patches.shape == (2, 16, 32)
  assert out.registers.shape == (2, 3, 32)
  assert out.attention.shape == (2, 2, 20, 20)
  np.testing.assert_allclose(out.intermediates[-1][:, 4:], out.patches, rtol=1e-6)
  assert float(jnp.std(model.register_tokens[...])) < 1e-5  # N(0, 1e-6) init
  assert tiny()(x).registers is None


def test_mask_token_replaces_masked_patches_before_pos_embed():
  model = tiny(mask_token=True, n_registers=1)
  np.testing.assert_array_equal(model.mask_token[...], 0)  # zero init, as DINOv2
  model.mask_token[...] = jax.random.normal(jax.random.PRNGKey(5), (1, 32))
  x = images()
  masks = jnp.zeros((2, 16), bool).at[0, 3].set(True).at[1, 0].set(True).at[1, 15].set(True)
  plain, masked = model.tokens(x), model.tokens(x, masks)
  pos = model.pos_embed[0, 1:]
  flat = np.asarray(masks)
  np.testing.assert_allclose(masked[:, 2:][flat], (model.mask_token[0] + pos)[
      np.nonzero(flat)[1]], rtol=1e-6)
  np.testing.assert_array_equal(masked[:, 2:][~flat], plain[:, 2:][~flat])
  np.testing.assert_array_equal(masked[:, :2], plain[:, :2])  # CLS and register untouched
  np.testing.assert_array_equal(model(x, masks=jnp.zeros((2, 16), bool)).cls, model(x).cls)
  assert not np.allclose(model(x, masks=masks).cls, model(x).cls)


def test_mask_errors():
  with pytest.raises(ValueError, match='no mask token'):
    tiny()(images(), masks=jnp.zeros((2, 16), bool))
  with pytest.raises(ValueError, match=r'masks shape \(2, 15\) != \(batch, patches\) \(2, 16\)'):
    tiny(mask_token=True)(images(), masks=jnp.zeros((2, 15), bool))


def test_bad_options_are_rejected(config):
  with pytest.raises(ValueError, match="unknown ffn 'glu'"):
    vit_lib.ViTConfig(width=32, depth=1, heads=2, patch_size=4, ffn='glu')
  config.model.ffn = 'glu'
  with pytest.raises(validate.ConfigError, match=r"config.model.ffn: 'glu' is not one of"):
    validate.validate(config)


def test_build_passes_the_dinov2_options(config):
  config.model.layerscale = 1e-5
  config.model.n_registers = 2
  config.model.ffn = 'swiglu'
  config.model.mask_token = True
  config.model.interpolate_offset = 0.0
  config.model.interpolate_antialias = True
  validate.validate(config)
  shapes = flat_shapes(models.build(config).backbone)
  assert shapes['register_tokens'] == (1, 2, 96) and shapes['mask_token'] == (1, 96)
  assert 'blocks.0.ls2.gamma' in shapes and 'blocks.0.mlp.w12.kernel' in shapes
  assert models.build(config).backbone.cfg.interpolate_antialias


def torch_resize(pos, s, h, w, **kw):
  torch = pytest.importorskip('torch', reason='torch (the `torch` extra) is not installed')
  t = torch.from_numpy(pos).reshape(1, s, s, -1).permute(0, 3, 1, 2)
  out = torch.nn.functional.interpolate(t, mode='bicubic', align_corners=False, **kw)
  return out.permute(0, 2, 3, 1).reshape(1, h * w, -1).numpy()


@pytest.mark.parametrize('h,w', [(16, 16), (6, 6), (34, 45), (37, 37), (50, 20)])
def test_register_model_resize_matches_torch_antialiased_bicubic(h, w):
  pos = np.random.default_rng(h * w).normal(size=(1, 37 * 37, 4)).astype(np.float32)
  want = torch_resize(pos, 37, h, w, size=(h, w), antialias=True)
  got = vit_lib.interpolate_pos_embed(jnp.asarray(pos), h, w, offset=0.0, antialias=True)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('h,w', [(6, 6), (34, 45)])
def test_explicit_size_resize_matches_torch_bicubic(h, w):
  pos = np.random.default_rng(h).normal(size=(1, 16 * 16, 4)).astype(np.float32)
  want = torch_resize(pos, 16, h, w, size=(h, w))
  got = vit_lib.interpolate_pos_embed(jnp.asarray(pos), h, w, offset=0.0)
  np.testing.assert_allclose(got, want, atol=1e-5)
