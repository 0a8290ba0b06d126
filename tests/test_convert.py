"""Official DINO / DINOv2 checkpoints -> Flax: parity with a PyTorch reference, export, safety.

The PyTorch ViT below is written from the architecture description (reference/*_facts.md),
with the official module names so its state_dict has the official keys; it shares no code
with dino_jax. Models are small (width 128, depth 4, head dim 64) with the official key
layout and pos-embed sizes (224/16 for v1, 518/14 for v2); one check runs the real ViT-S/16.
"""
import argparse
import dataclasses
import math
import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dino_jax import checkpointing, convert, models, weights
from dino_jax import state as state_lib
from dino_jax.models import vit as vit_lib

try:
  import torch
  from torch import nn
  F = torch.nn.functional
except ImportError:  # the parity tests need the `torch` extra
  torch = None

needs_torch = pytest.mark.skipif(
    torch is None, reason="torch is not installed (pip install 'dino_jax[torch]', torch==2.13.0)")
TOL = dict(atol=1e-5, rtol=1e-5)

# ---------------------------------------------------------------------------------------------
# The PyTorch reference

if torch is not None:

  class RefAttention(nn.Module):

    def __init__(self, dim, heads):
      super().__init__()
      self.heads = heads
      self.qkv = nn.Linear(dim, 3 * dim)
      self.proj = nn.Linear(dim, dim)

    def forward(self, x):
      b, n, c = x.shape
      qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
      q, k, v = qkv[0], qkv[1], qkv[2]
      attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
      return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)), attn

  class RefMlp(nn.Module):

    def __init__(self, dim, hidden):
      super().__init__()
      self.fc1 = nn.Linear(dim, hidden)
      self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
      return self.fc2(F.gelu(self.fc1(x)))

  class RefSwiGLU(nn.Module):

    def __init__(self, dim, hidden):
      super().__init__()
      self.w12 = nn.Linear(dim, 2 * hidden)
      self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
      gate, value = self.w12(x).chunk(2, dim=-1)
      return self.w3(F.silu(gate) * value)

  class RefLayerScale(nn.Module):

    def __init__(self, dim):
      super().__init__()
      self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
      return x * self.gamma

  class RefBlock(nn.Module):

    def __init__(self, dim, heads, hidden, swiglu, layerscale):
      super().__init__()
      self.norm1 = nn.LayerNorm(dim, eps=1e-6)
      self.attn = RefAttention(dim, heads)
      self.ls1 = RefLayerScale(dim) if layerscale else nn.Identity()
      self.norm2 = nn.LayerNorm(dim, eps=1e-6)
      self.mlp = RefSwiGLU(dim, hidden) if swiglu else RefMlp(dim, hidden)
      self.ls2 = RefLayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x):
      y, attn = self.attn(self.norm1(x))
      x = x + self.ls1(y)
      return x + self.ls2(self.mlp(self.norm2(x))), attn

  class RefPatchEmbed(nn.Module):

    def __init__(self, dim, patch):
      super().__init__()
      self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

  class RefViT(nn.Module):
    """DINO (v2=False) or DINOv2 ViT. v2 register models resize pos-embeds antialiased."""

    def __init__(self, dim=128, depth=4, heads=2, patch=16, img=224, hidden=512, swiglu=False,
                 layerscale=False, registers=0, mask_token=False):
      super().__init__()
      self.patch, self.registers = patch, registers
      self.patch_embed = RefPatchEmbed(dim, patch)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
      self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img // patch) ** 2, dim))
      if registers:
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
      if mask_token:
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
      self.blocks = nn.ModuleList([RefBlock(dim, heads, hidden, swiglu, layerscale)
                                   for _ in range(depth)])
      self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos(self, h0, w0):
      n = self.pos_embed.shape[1] - 1
      m = int(math.sqrt(n))
      if h0 == m and w0 == m:
        return self.pos_embed
      grid = self.pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
      if self.registers:  # DINOv2 register models: exact size, antialiased
        grid = F.interpolate(grid, size=(h0, w0), mode='bicubic', antialias=True,
                             align_corners=False)
      else:  # DINO v1 and DINOv2 without registers: the +0.1 scale-factor offset
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m),
                             mode='bicubic', align_corners=False)
      assert grid.shape[-2:] == (h0, w0)
      return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)],
                       dim=1)

    def forward(self, x, masks=None):
      """x: (B, 3, H, W). Returns (cls, last 4 normed block outputs, last block attention)."""
      b, _, h, w = x.shape
      t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
      if masks is not None:
        t = torch.where(masks.unsqueeze(-1), self.mask_token.unsqueeze(0), t)
      t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
      t = t + self.pos(h // self.patch, w // self.patch)
      if self.registers:
        t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], dim=1)
      outs = []
      for blk in self.blocks:
        t, attn = blk(t)
        outs.append(t)
      normed = [self.norm(o) for o in outs[-4:]]
      return normed[-1][:, 0], normed, attn

  class RefLastLayer(nn.Module):

    def __init__(self, bottleneck, out_dim):
      super().__init__()
      self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
      self.weight_v = nn.Parameter(torch.zeros(out_dim, bottleneck))

    def forward(self, x):
      return x @ (self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)).T

  class RefHead(nn.Module):

    def __init__(self, in_dim, out_dim=96, hidden=64, bottleneck=32, nlayers=3):
      super().__init__()
      dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
      layers = []
      for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < nlayers - 1 else [])
      self.mlp = nn.Sequential(*layers)
      self.last_layer = RefLastLayer(bottleneck, out_dim)

    def forward(self, x):
      return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def randomize(module, seed):
  """Random weights that make every part matter (LayerScale away from 1e-5, etc.)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith('gamma'):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif name.endswith('weight_g'):
        p.copy_(1 + torch.rand(p.shape, generator=g))
      elif name in ('pos_embed', 'cls_token', 'register_tokens', 'mask_token'):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
  return module.eval()


def hub_sd(model):
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


# model kinds: constructor kwargs of RefViT
V1 = dict(patch=16, img=224)
V2 = dict(patch=14, img=518, layerscale=True, mask_token=True)
V2_REG = dict(V2, registers=4)
V2_G = dict(V2, swiglu=True, hidden=vit_lib.swiglu_hidden(128, 4.0))
SIZES = {16: [(224, 224), (96, 96), (480, 640)], 14: [(224, 224), (98, 98), (476, 644)]}


def write_format(fmt, tmp_path):
  """Save a random reference model in an official format. Returns (path, convert kwargs,
  reference backbone, reference head or None, center or None)."""
  kind = {'v1_hub': V1, 'v1_full': V1, 'v1_full_student': V1, 'v2_hub': V2,
          'v2_hub_reg': V2_REG, 'v2_g': V2_G, 'v2_train_chunked': V2_REG,
          'safetensors_v2_reg': V2_REG, 'safetensors_v1_full': V1}[fmt]
  ref = randomize(RefViT(**kind), 0)
  path = str(tmp_path / (fmt + ('.safetensors' if fmt.startswith('safetensors') else '.pth')))
  if fmt in ('v1_hub', 'v2_hub', 'v2_hub_reg', 'v2_g'):
    torch.save(hub_sd(ref), path)
    return path, {}, ref, None, None
  head = randomize(RefHead(128), 1)
  other, other_head = randomize(RefViT(**kind), 2), randomize(RefHead(128), 3)
  center = torch.randn(1, 96, generator=torch.Generator().manual_seed(4))
  if fmt in ('v1_full', 'v1_full_student', 'safetensors_v1_full'):
    student_is_ref = fmt == 'v1_full_student'
    s_model, s_head = (ref, head) if student_is_ref else (other, other_head)
    t_model, t_head = (other, other_head) if student_is_ref else (ref, head)
    student = {'module.backbone.' + k: v for k, v in hub_sd(s_model).items()}
    student.update({'module.head.' + k: v for k, v in hub_sd(s_head).items()})
    teacher = {'backbone.' + k: v for k, v in hub_sd(t_model).items()}
    teacher.update({'head.' + k: v for k, v in hub_sd(t_head).items()})
    if fmt == 'safetensors_v1_full':  # a flat file: the teacher's keys only
      from safetensors.numpy import save_file
      save_file({k: v.numpy() for k, v in teacher.items()}, path)
      return path, {}, ref, head, None
    opt = {'state': {0: {'step': torch.tensor(3.0), 'exp_avg': torch.zeros(3)}},
           'param_groups': [{'lr': 1e-3, 'params': [0]}]}
    torch.save({'student': student, 'teacher': teacher, 'optimizer': opt, 'epoch': 3,
                'args': argparse.Namespace(arch='vit_small', lr=5e-4, local_crops_scale=(0.05, 0.4)),
                'dino_loss': {'center': center}, 'fp16_scaler': {'scale': 65536.0}}, path)
    return path, {'key': 'student' if student_is_ref else 'teacher'}, ref, head, center
  if fmt == 'v2_train_chunked':  # 4 blocks in 2 chunks, global indices kept
    teacher = {}
    for k, v in hub_sd(ref).items():
      if k.startswith('blocks.'):
        i = int(k.split('.')[1])
        k = f'blocks.{i // 2}.' + k[len('blocks.'):]
      teacher['backbone.' + k] = v
    teacher.update({'dino_head.' + k: v for k, v in hub_sd(head).items()})
    teacher.update({'ibot_head.' + k: v for k, v in hub_sd(other_head).items()})
    torch.save({'teacher': teacher}, path)
    return path, {}, ref, head, None
  from safetensors.numpy import save_file
  save_file({k: v.numpy() for k, v in hub_sd(ref).items()}, path)
  return path, {}, ref, None, None


def compare(ref, flax_vit, sizes, seed=0):
  rng = np.random.default_rng(seed)
  for h, w in sizes:
    x = rng.normal(size=(2, 3, h, w)).astype(np.float32)
    with torch.no_grad():
      cls, inter, attn = ref(torch.from_numpy(x))
    out = flax_vit(jnp.asarray(x.transpose(0, 2, 3, 1)), n_last=4, return_attention=True)
    np.testing.assert_allclose(out.cls, cls.numpy(), **TOL, err_msg=f'cls at {h}x{w}')
    assert len(out.intermediates) == len(inter) == min(4, len(ref.blocks))
    for a, b in zip(out.intermediates, inter):
      np.testing.assert_allclose(a, b.numpy(), **TOL, err_msg=f'intermediate at {h}x{w}')
    np.testing.assert_allclose(out.attention, attn.numpy(), **TOL, err_msg=f'attn at {h}x{w}')
    r = 1 + ref.registers
    np.testing.assert_allclose(out.patches, inter[-1][:, r:].numpy(), **TOL)


# ---------------------------------------------------------------------------------------------
# Parity

FORMATS = ['v1_hub', 'v1_full', 'v1_full_student', 'v2_hub', 'v2_hub_reg', 'v2_g',
           'v2_train_chunked', 'safetensors_v2_reg', 'safetensors_v1_full']


@needs_torch
@pytest.mark.parametrize('fmt', FORMATS)
def test_parity_with_pytorch_reference(fmt, tmp_path):
  path, kw, ref, ref_head, center = write_format(fmt, tmp_path)
  c = convert.convert(path, **kw)
  assert (c.vit.width, c.vit.depth, c.vit.heads, c.vit.patch_size) == (
      128, 4, 2, ref.patch)
  assert c.vit.n_registers == ref.registers
  compare(ref, weights.build_backbone(c), SIZES[ref.patch])
  if ref_head is None:
    assert c.head is None
  else:
    x = np.random.default_rng(1).normal(size=(5, 128)).astype(np.float32)
    with torch.no_grad():
      want = ref_head(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(weights.build_head(c)(jnp.asarray(x)), want, **TOL)
  if center is None:
    assert c.center is None
  else:
    np.testing.assert_array_equal(c.center, center.numpy())
  if fmt == 'v2_train_chunked':
    assert c.ignored and all(k.startswith('ibot_head.') for k in c.ignored)


@needs_torch
def test_mask_token_parity():
  ref = randomize(RefViT(**V2_REG), 0)
  c = convert.convert({k: v.numpy() for k, v in hub_sd(ref).items()})
  x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
  masks = np.random.default_rng(1).random((2, 256)) < 0.4
  with torch.no_grad():
    want = ref(torch.from_numpy(x), torch.from_numpy(masks))[0].numpy()
  got = weights.build_backbone(c)(jnp.asarray(x.transpose(0, 2, 3, 1)), masks=jnp.asarray(masks))
  np.testing.assert_allclose(got.cls, want, **TOL)


@needs_torch
def test_real_size_dino_vits16_parity(tmp_path):
  ref = randomize(RefViT(dim=384, depth=12, heads=6, hidden=1536, **V1), 0)
  path = tmp_path / 'dino_deitsmall16_pretrain.pth'
  torch.save(hub_sd(ref), path)
  c = convert.convert(path)
  assert weights.arch_name(c.vit) == 'vit_small' and len(ref.state_dict()) == 150
  assert sum(v.size for v in jax.tree.leaves(c.backbone)) == 21_665_664
  compare(ref, weights.build_backbone(c), [(224, 224)])


# ---------------------------------------------------------------------------------------------
# Export and round trips

def random_flax(**kw):
  cfg = vit_lib.ViTConfig(**{'width': 128, 'depth': 2, 'heads': 2, 'patch_size': 14,
                             'img_size': 518, **kw})
  model = vit_lib.ViT(cfg, rngs=nnx.Rngs(3))
  params = state_lib.pure_params(model)
  key = jax.random.PRNGKey(7)
  # no zeros or ones left, weights small enough for a well-conditioned forward pass
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(key, p.shape), params)
  return cfg, jax.tree.map(np.asarray, params)


V2_REG_G = dict(layerscale=1e-5, n_registers=4, ffn='swiglu', mask_token=True,
                interpolate_offset=0.0, interpolate_antialias=True)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_safetensors_round_trip_is_exact_without_torch(tmp_path):
  cfg, params = random_flax(**V2_REG_G)
  sd = convert.export(params, tmp_path / 'm.safetensors')
  assert 'blocks.1.mlp.w12.weight' in sd and sd['patch_embed.proj.weight'].shape == (128, 3, 14, 14)
  assert sd['blocks.0.attn.qkv.weight'].shape == (384, 128) and 'register_tokens' in sd
  c = convert.convert(str(tmp_path / 'm.safetensors'))
  assert c.vit == cfg
  assert_trees_equal(c.backbone, params)


@needs_torch
def test_pth_round_trip_is_exact_and_loads_into_the_reference(tmp_path):
  cfg, params = random_flax(**V2_REG_G)
  path = tmp_path / 'm.pth'
  convert.export(params, path)
  assert_trees_equal(convert.convert(str(path)).backbone, params)
  ref = RefViT(depth=2, **dict(V2_G, registers=4)).eval()
  ref.load_state_dict(torch.load(path, weights_only=True), strict=True)  # official layout
  compare(ref, weights.build_backbone(convert.convert(str(path))), [(224, 224), (98, 98)])


@needs_torch
def test_pytorch_to_flax_to_pytorch_is_exact_with_head(tmp_path):
  path, _, ref, _, _ = write_format('v1_full', tmp_path)
  teacher = torch.load(path, weights_only=False)['teacher']
  c = convert.convert(path)
  back = convert.to_state_dict(c.backbone, c.head)
  assert set(back) == {k.removeprefix('backbone.') for k in teacher}
  for k, v in teacher.items():
    np.testing.assert_array_equal(back[k.removeprefix('backbone.')], v.numpy())


def test_converted_file_round_trip_and_cli(tmp_path):
  cfg, params = random_flax(**V2_REG_G)
  src = tmp_path / 'official.safetensors'
  official = convert.export(params, src)
  assert convert.main(['import', str(src), str(tmp_path / 'conv.safetensors')]) == 0
  c = weights.read_file(tmp_path / 'conv.safetensors')
  assert c.vit == cfg and c.head is None
  assert_trees_equal(c.backbone, params)
  assert weights.model_fields(c)['n_registers'] == 4
  model = convert.load(tmp_path / 'conv.safetensors')
  assert isinstance(model, vit_lib.ViT) and model.cfg == cfg
  assert convert.main(['export', str(tmp_path / 'conv.safetensors'),
                       str(tmp_path / 'back.safetensors')]) == 0
  from safetensors.numpy import load_file
  back = load_file(tmp_path / 'back.safetensors')
  assert set(back) == set(official)
  for k in official:
    np.testing.assert_array_equal(back[k], official[k])


def test_export_from_a_training_workdir(config, tmp_path):
  config.model.layerscale = 1e-5
  config.model.n_registers = 2
  student = models.build(config)
  import optax
  state = state_lib.create(student, optax.adamw(1e-3), config.model.out_dim,
                           jax.random.PRNGKey(0))
  teacher = jax.tree.map(lambda p: p + 1.0, state.teacher_params)
  state = state.replace(teacher_params=teacher, center=jnp.full((1, 64), 0.5))
  mngr = checkpointing.manager(str(tmp_path / 'run'))
  checkpointing.save(mngr, 7, state, config, {'next_step': 7})
  mngr.wait_until_finished()
  c = weights.from_workdir(str(tmp_path / 'run'))
  assert c.vit == dataclasses.replace(student.backbone.cfg, drop_path_rate=0.0)
  assert_trees_equal(c.backbone, jax.tree.map(np.asarray, teacher['backbone']))
  np.testing.assert_array_equal(c.center, np.full((1, 64), 0.5, np.float32))
  out = tmp_path / 'teacher.safetensors'
  assert convert.main(['export', str(tmp_path / 'run'), str(out), '--with-head']) == 0
  again = convert.convert(str(out))
  assert_trees_equal(again.backbone, c.backbone)
  assert_trees_equal(again.head, c.head)


# ---------------------------------------------------------------------------------------------
# Bad inputs

class Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@needs_torch
@pytest.mark.parametrize('writer', ['torch.save', 'pickle.dump'])
def test_malicious_pickle_is_refused(writer, tmp_path, capsys):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pth'
  obj = {'cls_token': torch.zeros(1, 1, 8), 'payload': Evil(marker)}
  if writer == 'torch.save':
    torch.save(obj, path)
  else:
    with open(path, 'wb') as f:
      pickle.dump(obj, f, protocol=2)
  with pytest.raises(convert.UnsafeCheckpointError, match=r'refusing to load: the file pickles '
                     r'objects other than tensors and plain containers'):
    convert.read_file(path)
  assert not marker.exists()
  assert convert.main(['import', str(path), str(tmp_path / 'out.safetensors')]) == 1
  assert 'refusing to load' in capsys.readouterr().err
  assert not marker.exists() and not (tmp_path / 'out.safetensors').exists()


def v1_state_dict():
  cfg, params = random_flax(patch_size=16, img_size=224)
  return convert.to_state_dict(params)


def test_shape_mismatch_names_the_key_and_both_shapes():
  sd = v1_state_dict()
  with pytest.raises(convert.CheckpointError, match=re.escape(
      "shape mismatch for 'blocks.0.mlp.fc1.bias': the checkpoint has (512,), the model "
      'expects (256,)')):
    convert.convert(sd, mlp_ratio=2.0)
  with pytest.raises(convert.CheckpointError, match=re.escape(
      "shape mismatch for 'pos_embed': the checkpoint has (1, 197, 128), the model expects "
      '(1, 50, 128)')):
    convert.convert(sd, patch_size=16, img_size=112)


def test_missing_and_unexpected_keys(tmp_path, capsys):
  sd = v1_state_dict()
  with pytest.raises(convert.CheckpointError, match=re.escape(
      "checkpoint has no 'norm.bias', which the model needs (shape (128,))")):
    convert.convert({k: v for k, v in sd.items() if k != 'norm.bias'})
  from safetensors.numpy import save_file
  save_file({k: v for k, v in sd.items() if k != 'norm.bias'}, str(tmp_path / 'bad.safetensors'))
  dst = tmp_path / 'out.safetensors'
  assert convert.main(['import', str(tmp_path / 'bad.safetensors'), str(dst)]) == 1
  assert "error: checkpoint has no 'norm.bias'" in capsys.readouterr().err and not dst.exists()
  with pytest.raises(convert.CheckpointError,
                     match=re.escape("keys the model has no place for: ['blocks.0.attn.q_bias']")):
    convert.convert({**sd, 'blocks.0.attn.q_bias': np.zeros(128, np.float32)})
  with pytest.raises(convert.CheckpointError, match="checkpoint has no 'patch_embed.proj.weight'"):
    convert.convert({'conv1.weight': np.zeros((64, 3, 7, 7), np.float32)})
  with pytest.raises(convert.CheckpointError, match=r"no 'student' weights in this checkpoint; "
                     r"its dict entries are \['teacher'\]"):
    convert.convert({'teacher': sd, 'epoch': 3}, key='student')


def test_safetensors_needs_no_torch_and_bad_converted_file(tmp_path):
  from safetensors.numpy import save_file
  save_file({'x': np.zeros(2, np.float32)}, str(tmp_path / 'x.safetensors'))
  with pytest.raises(ValueError, match='not a dino_jax converted model'):
    weights.read_file(tmp_path / 'x.safetensors')



def test_name_table():
  table = {
      'patch_embed.kernel': ('patch_embed.proj.weight', 'conv'),
      'blocks.3.norm1.scale': ('blocks.3.norm1.weight', 'same'),
      'blocks.3.attn.qkv.kernel': ('blocks.3.attn.qkv.weight', 'linear'),
      'blocks.3.mlp.w12.bias': ('blocks.3.mlp.w12.bias', 'same'),
      'blocks.3.ls2.gamma': ('blocks.3.ls2.gamma', 'same'),
      'norm.scale': ('norm.weight', 'same'),
      'register_tokens': ('register_tokens', 'same'),
      'head.mlp.2.kernel': ('head.mlp.4.weight', 'linear'),
      'head.last_layer.weight_g': ('head.last_layer.weight_g', 'linear'),
  }
  for name, want in table.items():
    assert convert.torch_key(name) == want, name
  assert convert.torch_key('head.mlp.0.bias', head_nlayers=1) == ('head.mlp.bias', 'same')


@pytest.mark.parametrize('nlayers', [1, 2, 3])
def test_head_round_trip_any_depth(nlayers):
  cfg, params = random_flax(patch_size=16, img_size=224)
  head = models.DINOHead(128, 40, hidden_dim=24, bottleneck_dim=8, nlayers=nlayers,
                         rngs=nnx.Rngs(1))
  head_params = jax.tree.map(np.asarray, state_lib.pure_params(head))
  sd = convert.to_state_dict(params, head_params, nlayers)
  assert sd['head.last_layer.weight_v'].shape == (40, 8)
  assert ('head.mlp.weight' in sd) == (nlayers == 1)
  c = convert.convert(sd)
  assert c.head_config == weights.HeadConfig(40, 24 if nlayers > 1 else 0, 8, nlayers)
  assert_trees_equal(c.head, head_params)


def test_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(__import__('sys').modules, 'torch', None)  # import torch -> ImportError
  with pytest.raises(ImportError, match=r"needs torch \(pip install 'dino_jax\[torch\]'\)"):
    convert.read_file(tmp_path / 'dino_deitsmall16_pretrain.pth')
  with pytest.raises(ImportError, match='write .safetensors instead'):
    convert.export(random_flax(depth=1)[1], tmp_path / 'x.pth')
