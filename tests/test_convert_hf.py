"""Hugging Face transformers DINOv2 layout (Dinov2Model, Dinov2WithRegistersModel) -> Flax.

The HF state_dicts here are made from official-layout ones by a key mapping written in this
test from the transformers model definitions (embeddings.*, encoder.layer.N.*, layernorm.*,
the fused qkv split into query/key/value rows), independent of dino_jax/convert_hf.py. Both
layouts must convert to bit-identical Flax params. Tiny models (width 64, depth 2).
"""
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dino_jax import convert, weights
from dino_jax import state as state_lib
from dino_jax.models import vit as vit_lib

V2 = dict(layerscale=1e-5, mask_token=True)  # Dinov2Model: LayerScale and a mask token
V2_REG_SWIGLU = dict(V2, n_registers=4, ffn='swiglu', interpolate_offset=0.0,
                     interpolate_antialias=True)
VARIANTS = {'dinov2': V2, 'registers_swiglu': V2_REG_SWIGLU}


def random_official(seed=3, **kw):
  """(ViTConfig, Flax params, official state_dict) of a tiny random DINOv2 ViT."""
  cfg = vit_lib.ViTConfig(**{'width': 64, 'depth': 2, 'heads': 1, 'patch_size': 14,
                             'img_size': 56, **kw})
  params = state_lib.pure_params(vit_lib.ViT(cfg, rngs=nnx.Rngs(seed)))
  key = jax.random.PRNGKey(seed)
  params = jax.tree.map(lambda p: np.asarray(p + 0.05 * jax.random.normal(key, p.shape)), params)
  return cfg, params, convert.to_state_dict(params)


TOP = {  # official key -> HF key, outside the blocks
    'cls_token': 'embeddings.cls_token', 'mask_token': 'embeddings.mask_token',
    'register_tokens': 'embeddings.register_tokens',
    'pos_embed': 'embeddings.position_embeddings',
    'patch_embed.proj.weight': 'embeddings.patch_embeddings.projection.weight',
    'patch_embed.proj.bias': 'embeddings.patch_embeddings.projection.bias',
    'norm.weight': 'layernorm.weight', 'norm.bias': 'layernorm.bias'}
IN_BLOCK = {  # official name inside blocks.N -> HF name inside encoder.layer.N
    'norm1': 'norm1', 'norm2': 'norm2', 'attn.proj': 'attention.output.dense',
    'ls1.gamma': 'layer_scale1.lambda1', 'ls2.gamma': 'layer_scale2.lambda1',
    'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2', 'mlp.w12': 'mlp.weights_in',
    'mlp.w3': 'mlp.weights_out'}


def hf_from_official(sd, prefix=''):
  """The HF state_dict of an official one (transformers' names, q/k/v as separate rows)."""
  out = {}
  for k, v in sd.items():
    if k in TOP:
      out[prefix + TOP[k]] = v
      continue
    i, rest = re.fullmatch(r'blocks\.(\d+)\.(.+)', k).groups()
    layer = f'{prefix}encoder.layer.{i}.'
    if rest.startswith('attn.qkv.'):
      d = v.shape[0] // 3
      for j, name in enumerate(('query', 'key', 'value')):
        out[f'{layer}attention.attention.{name}.{rest.split(".")[-1]}'] = v[j * d:(j + 1) * d]
      continue
    stem, param = (rest, '') if rest.endswith('gamma') else rest.rsplit('.', 1)
    out[layer + IN_BLOCK[stem] + (f'.{param}' if param else '')] = v
  return out


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def save_safetensors(sd, path, metadata=None):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path), metadata=metadata)
  return path


@pytest.fixture
def no_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch -> ImportError


# ---------------------------------------------------------------------------------------------
# Import

@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_hf_layout_converts_to_the_same_params_as_official(variant, tmp_path, no_torch):
  cfg, params, official = random_official(**VARIANTS[variant])
  hf = hf_from_official(official)
  assert len(hf) == len(official) + 2 * 2 * 2  # qkv weight and bias: 1 -> 3 tensors per block
  from_official = convert.convert(official)
  from_hf = convert.convert(str(save_safetensors(hf, tmp_path / 'model.safetensors')))
  assert from_hf.vit == from_official.vit == cfg  # architecture and official numerics
  assert_trees_equal(from_hf.backbone, from_official.backbone)
  assert_trees_equal(from_hf.backbone, params)
  assert from_hf.head is None and from_hf.ignored == ()


def test_pos_embed_resize_follows_the_official_models(no_torch):
  # DINOv2 without registers: scale factor (n + 0.1) / N, no antialias; with: exact size,
  # antialiased (the official models; transformers' Dinov2 resizes to the exact size).
  plain = convert.convert(hf_from_official(random_official(**V2)[2])).vit
  assert (plain.interpolate_offset, plain.interpolate_antialias) == (0.1, False)
  reg = convert.convert(hf_from_official(random_official(**V2_REG_SWIGLU)[2])).vit
  assert (reg.interpolate_offset, reg.interpolate_antialias) == (0.0, True)
  assert reg.n_registers == 4 and reg.ffn == 'swiglu' and reg.mask_token


@pytest.mark.parametrize('prefix,variant', [('dinov2.', 'dinov2'),
                                            ('dinov2_with_registers.', 'registers_swiglu')])
def test_image_classification_checkpoints(prefix, variant, tmp_path, capsys):
  _, params, official = random_official(**VARIANTS[variant])
  hf = hf_from_official(official, prefix)
  hf.update({'classifier.weight': np.ones((10, 128), np.float32),
             'classifier.bias': np.zeros(10, np.float32)})
  src = save_safetensors(hf, tmp_path / 'model.safetensors', {'format': 'pt'})
  dst = tmp_path / 'conv.safetensors'
  assert convert.main(['import', str(src), str(dst)]) == 0
  assert 'left out 2 keys (classifier.' in capsys.readouterr().out
  c = weights.read_file(dst)
  assert_trees_equal(c.backbone, params)


@pytest.mark.parametrize('suffix', ['.pth', '.bin'])
def test_pytorch_state_dict_files(suffix, tmp_path):
  torch = pytest.importorskip('torch', reason="reading .pth/.bin needs torch (pip install "
                              "'dino_jax[torch]', torch==2.13.0)")
  _, params, official = random_official(**V2_REG_SWIGLU)
  path = tmp_path / f'pytorch_model{suffix}'
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in hf_from_official(official).items()},
             path)
  assert_trees_equal(convert.convert(str(path)).backbone, params)
  out = tmp_path / f'again{suffix}'
  convert.export(params, out, layout='hf')
  back = torch.load(out, weights_only=True)
  want = hf_from_official(official)
  assert set(back) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(back[k].numpy(), v)


# ---------------------------------------------------------------------------------------------
# Export

@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_export_hf_layout_round_trip_is_exact(variant, tmp_path, no_torch, capsys):
  cfg, params, official = random_official(**VARIANTS[variant])
  model = tmp_path / 'ours.safetensors'
  assert convert.main(['import', str(save_safetensors(official, tmp_path / 'o.safetensors')),
                       str(model)]) == 0
  out = tmp_path / 'model.safetensors'
  assert convert.main(['export', str(model), str(out), '--layout', 'hf']) == 0
  assert 'in the hf layout' in capsys.readouterr().out
  from safetensors import safe_open
  with safe_open(str(out), framework='numpy') as f:
    assert f.metadata() == {'format': 'pt'}  # transformers refuses safetensors without it
    written = {k: f.get_tensor(k) for k in f.keys()}
  want = hf_from_official(official)
  assert set(written) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(written[k], v)
  again = convert.convert(str(out))
  assert again.vit == cfg
  assert_trees_equal(again.backbone, params)
  assert convert.main(['export', str(model), str(tmp_path / 'off.safetensors')]) == 0
  from safetensors.numpy import load_file
  assert set(load_file(tmp_path / 'off.safetensors')) == set(official)  # default: official


def test_export_hf_refuses_what_the_layout_cannot_hold(tmp_path, capsys):
  _, v1, _ = random_official()  # DINO v1: no LayerScale
  with pytest.raises(ValueError, match=r'every Hugging Face DINOv2 layer has LayerScale'):
    convert.export(v1, tmp_path / 'x.safetensors', layout='hf')
  _, params, _ = random_official(**V2)
  with pytest.raises(ValueError, match='has no DINO head'):
    convert.export(params, tmp_path / 'x.safetensors', head={'x': np.zeros(1)}, layout='hf')
  assert not (tmp_path / 'x.safetensors').exists()


# ---------------------------------------------------------------------------------------------
# Bad HF files: one line naming the key, no output file

@pytest.mark.parametrize('change,message', [
    (lambda sd: sd.pop('encoder.layer.1.attention.attention.key.weight'),
     "checkpoint has no 'encoder.layer.1.attention.attention.key.weight', which the model "
     'needs (shape (64, 64))'),
    (lambda sd: sd.update({'encoder.layer.0.attention.attention.value.bias':
                           np.zeros(63, np.float32)}),
     "shape mismatch for 'encoder.layer.0.attention.attention.value.bias': the checkpoint has "
     '(63,), the model expects (64,)'),
    (lambda sd: sd.pop('encoder.layer.0.layer_scale2.lambda1'),
     "checkpoint has no 'encoder.layer.0.layer_scale2.lambda1', which the model needs (shape "
     '(64,))'),
    (lambda sd: sd.update({'layernorm.bias': np.zeros(32, np.float32)}),
     "shape mismatch for 'layernorm.bias': the checkpoint has (32,), the model expects (64,)"),
    (lambda sd: sd.update({'encoder.layer.0.attention.attention.q_norm.weight':
                           np.zeros(64, np.float32)}),
     "checkpoint keys the model has no place for: "
     "['encoder.layer.0.attention.attention.q_norm.weight']"),
    (lambda sd: sd.pop('embeddings.patch_embeddings.projection.weight'),
     "checkpoint has no 'embeddings.patch_embeddings.projection.weight'"),
], ids=['missing_key', 'value_bias_shape', 'missing_layerscale', 'layernorm_shape', 'extra_key',
        'no_patch_embed'])
def test_bad_key_or_shape_is_one_clear_line(change, message, tmp_path, capsys, no_torch):
  hf = hf_from_official(random_official(**V2)[2])
  change(hf)
  with pytest.raises(convert.CheckpointError, match=re.escape(message)):
    convert.convert(hf)
  src = save_safetensors(hf, tmp_path / 'model.safetensors')
  dst = tmp_path / 'out.safetensors'
  assert convert.main(['import', str(src), str(dst)]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f'error: {message}') and err.count('\n') == 1
  assert not dst.exists() and not list(tmp_path.glob('out*'))
