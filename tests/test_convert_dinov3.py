"""Released DINOv3 ViT checkpoints (official .pth layout and transformers' DINOv3ViTModel) -> Flax.

The reference is a small PyTorch module written here from the DINOv3 architecture description
(patch conv; CLS + storage tokens; pre-norm blocks whose attention rotates the patch tokens'
q and k by axial RoPE, base 100, coordinates normalised to [-1, 1] per axis, and masks the key
bias; LayerScale; MLP or SwiGLU; final LayerNorm eps 1e-5, an untied CLS norm where set), with
the official key names and buffers and random weights. Its HF state_dict comes from a key
mapping written in this test, independent of dino_jax/convert_dinov3.py. Tiny models (width 64,
depth 4, patch 16) at the released models' 224x224 px (14x14 = 196 patches) and at 112x176 px
(7x11: odd, non-square, so a transposed axis fails): CLS, storage and patch tokens and the last
4 block outputs within 1e-5. The converted model runs under one jit per architecture and size;
the reference outputs are computed once per model and size and shared by every file layout.
"""
import functools
import math
import re

import numpy as np
import pytest

import jax
from flax import nnx

from dino_jax import convert, convert_dinov3, weights
from dino_jax.models import ViTConfig

torch = pytest.importorskip('torch', reason='the DINOv3 reference model is a PyTorch module')
nn = torch.nn
F = torch.nn.functional

SIZES = ((224, 224), (112, 176))  # (H, W): 14x14 and 7x11 patch grids
DEPTH, N_LAST = 4, 4  # parity on the last 4 block outputs, as DINOv3's evaluations take them
# (heads, ffn, hidden, untied CLS norm, local CLS norm)
MODELS = {'mlp_cls_norm': (4, 'mlp', 256, True, False),
          'swiglu_local_norm': (2, 'swiglu', 256, False, True)}


class LayerScale(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(d))


class Block(nn.Module):
  def __init__(self, d, heads, ffn, hidden):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(d, eps=1e-5)
    self.attn = nn.Module()
    self.attn.qkv = nn.Linear(d, 3 * d)
    mask = torch.ones(3 * d)
    mask[d:2 * d] = 0  # no bias on the keys
    self.attn.qkv.register_buffer('bias_mask', mask)
    self.attn.proj = nn.Linear(d, d)
    self.ls1, self.ls2 = LayerScale(d), LayerScale(d)
    self.norm2 = nn.LayerNorm(d, eps=1e-5)
    self.mlp = nn.Module()
    if ffn == 'mlp':
      self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
    else:
      self.mlp.w1, self.mlp.w2 = nn.Linear(d, hidden), nn.Linear(d, hidden)
      self.mlp.w3 = nn.Linear(hidden, d)
    self.ffn = ffn

  def forward(self, x, sin, cos, prefix):
    b, t, d = x.shape
    hd = d // self.heads
    qkv = F.linear(self.norm1(x), self.attn.qkv.weight,
                   self.attn.qkv.bias * self.attn.qkv.bias_mask)
    q, k, v = qkv.reshape(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)

    def rotate(z):  # patch tokens only: z cos + [-z2 | z1] sin
      zp = z[:, :, prefix:]
      z1, z2 = zp[..., :hd // 2], zp[..., hd // 2:]
      return torch.cat([z[:, :, :prefix], zp * cos + torch.cat([-z2, z1], -1) * sin], dim=2)

    q, k = rotate(q), rotate(k)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, t, d)
    x = x + self.ls1.gamma * self.attn.proj(y)
    h = self.norm2(x)
    h = (self.mlp.fc2(F.gelu(self.mlp.fc1(h))) if self.ffn == 'mlp'
         else self.mlp.w3(F.silu(self.mlp.w1(h)) * self.mlp.w2(h)))
    return x + self.ls2.gamma * h


class RefViT(nn.Module):
  def __init__(self, d=64, depth=2, heads=4, patch=16, storage=4, ffn='mlp', hidden=256,
               cls_norm=False, local_cls_norm=False):
    super().__init__()
    self.patch = patch
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, d, patch, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    self.storage_tokens = nn.Parameter(torch.zeros(1, storage, d))
    self.mask_token = nn.Parameter(torch.zeros(1, d))
    hd = d // heads
    self.rope_embed = nn.Module()
    self.rope_embed.register_buffer(
        'periods', 100.0 ** (torch.arange(hd // 4, dtype=torch.float64) * 4 / hd).float())
    self.blocks = nn.ModuleList([Block(d, heads, ffn, hidden) for _ in range(depth)])
    self.norm = nn.LayerNorm(d, eps=1e-5)
    self.cls_norm = nn.LayerNorm(d, eps=1e-5) if cls_norm else None
    self.local_cls_norm = nn.LayerNorm(d, eps=1e-5) if local_cls_norm else None  # training only

  def rope(self, gh, gw):
    """(sin, cos) (N, hd): per-axis centres in [-1, 1]; rows' angles then columns', twice."""
    ch = (torch.arange(gh) + 0.5) / gh * 2 - 1
    cw = (torch.arange(gw) + 0.5) / gw * 2 - 1
    c = torch.stack(torch.meshgrid(ch, cw, indexing='ij'), -1).reshape(-1, 2)
    ang = (2 * math.pi * c[:, :, None] / self.rope_embed.periods).reshape(len(c), -1)
    ang = torch.cat([ang, ang], -1)
    return torch.sin(ang), torch.cos(ang)

  def forward(self, img, n_last=N_LAST):
    b, _, h, w = img.shape
    x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
    prefix = 1 + self.storage_tokens.shape[1]
    x = torch.cat([self.cls_token.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1), x], 1)
    sin, cos = self.rope(h // self.patch, w // self.patch)
    outs = []
    for blk in self.blocks:
      x = blk(x, sin, cos, prefix)
      outs.append(x)
    normed = []
    for o in outs[-n_last:]:
      head = (self.cls_norm or self.norm)(o[:, :prefix])
      normed.append(torch.cat([head, self.norm(o[:, prefix:])], 1))
    return normed


def reference(name, seed=0):
  heads, ffn, hidden, cls_norm, local = MODELS[name]
  torch.manual_seed(seed)
  model = RefViT(depth=DEPTH, heads=heads, ffn=ffn, hidden=hidden, cls_norm=cls_norm,
                 local_cls_norm=local)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      base = 1.0 if pname.endswith('norm.weight') or re.search(r'norm\d?\.weight', pname) else 0.0
      p.copy_(base + 0.1 * torch.randn_like(p))
  return model.eval()


def official_sd(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_from_official(sd, layer='layer.'):
  """transformers' DINOv3ViTModel names, written from its model definition."""
  out = {}
  top = {'cls_token': 'embeddings.cls_token', 'storage_tokens': 'embeddings.register_tokens',
         'patch_embed.proj.weight': 'embeddings.patch_embeddings.weight',
         'patch_embed.proj.bias': 'embeddings.patch_embeddings.bias',
         'norm.weight': 'norm.weight', 'norm.bias': 'norm.bias'}
  inner = {'norm1': 'norm1', 'norm2': 'norm2', 'attn.proj': 'attention.o_proj',
           'ls1.gamma': 'layer_scale1.lambda1', 'ls2.gamma': 'layer_scale2.lambda1',
           'mlp.fc1': 'mlp.up_proj', 'mlp.fc2': 'mlp.down_proj', 'mlp.w1': 'mlp.gate_proj',
           'mlp.w2': 'mlp.up_proj', 'mlp.w3': 'mlp.down_proj'}
  for k, v in sd.items():
    if k in top:
      out[top[k]] = v
    elif k == 'mask_token':
      out['embeddings.mask_token'] = v[:, None]  # (1, 1, D)
    elif k.startswith(('rope_embed.', 'local_cls_norm.')) or k.endswith('bias_mask'):
      continue  # buffers; the training-only local CLS norm
    else:
      i, rest = re.fullmatch(r'blocks\.(\d+)\.(.+)', k).groups()
      pre = f'{layer}{i}.'
      if rest.startswith('attn.qkv.'):
        p = rest.rsplit('.', 1)[1]
        for n, part in zip('qkv', np.split(v, 3)):
          if not (n == 'k' and p == 'bias'):  # the masked key bias is not stored
            out[f'{pre}attention.{n}_proj.{p}'] = part
        continue
      mod, p = rest.rsplit('.', 1) if not rest.endswith('gamma') else (rest, None)
      out[pre + inner[mod] + (f'.{p}' if p else '')] = v
  return out


def save(sd, path):
  if path.suffix == '.safetensors':
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  else:
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)


def image(size):
  h, wd = size
  return np.random.default_rng(h * 1000 + wd).normal(size=(2, 3, h, wd)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def reference_outputs(name, size):
  """The reference's last N_LAST normed block outputs (B, T, D) at `size`, once per test run."""
  with torch.no_grad():
    return tuple(o.numpy() for o in reference(name)(torch.from_numpy(image(size))))


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, images):
  """The converted backbone, jitted: one compile per (architecture, image size)."""
  out = nnx.merge(graphdef, state)(images, n_last=N_LAST)
  return out.cls, out.registers, out.patches, out.intermediates


def check_parity(name, w):
  graphdef, state = nnx.split(weights.build_backbone(w))
  r = 1 + w.vit.n_registers
  for size in SIZES:
    ref = reference_outputs(name, size)
    assert len(ref) == N_LAST and ref[-1].shape[1] == r + (size[0] // 16) * (size[1] // 16)
    cls, registers, patches, inter = forward(graphdef, state, image(size).transpose(0, 2, 3, 1))
    np.testing.assert_allclose(cls, ref[-1][:, 0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(registers, ref[-1][:, 1:r], atol=1e-5, rtol=0)
    np.testing.assert_allclose(patches, ref[-1][:, r:], atol=1e-5, rtol=0)
    assert len(inter) == N_LAST
    for i, (ours, theirs) in enumerate(zip(inter, ref, strict=True)):
      np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0,
                                 err_msg=f'{size}: block output -{N_LAST - i}')


@pytest.mark.parametrize('name', sorted(MODELS))
def test_official_and_hf_files_match_the_reference(name, tmp_path):
  model = reference(name)
  sd = official_sd(model)
  files = [('official', tmp_path / 'm.pth', sd), ('official', tmp_path / 'm.safetensors', sd)]
  if not MODELS[name][3]:  # the HF layout has no untied CLS norm
    files += [('hf', tmp_path / 'hf.safetensors', hf_from_official(sd)),
              ('hf', tmp_path / 'hf.pth', hf_from_official(sd, 'model.layer.'))]
  first = None
  for layout, path, d in files:
    save(d, path)
    # HF files keep the head count in config.json, not the weights: width / 64 unless given
    w = convert.convert(path, **({'heads': MODELS[name][0]} if layout == 'hf' else {}))
    heads, ffn, hidden, cls_norm, local = MODELS[name]
    assert (w.vit.heads, w.vit.ffn, w.vit.n_registers, w.vit.pos_embed) == (heads, ffn, 4, 'rope')
    assert w.vit.mask_k_bias and w.vit.ln_eps == 1e-5 and w.vit.rope_base == 100.0
    assert w.vit.untie_cls_and_patch_norms == cls_norm
    assert w.vit.untie_global_and_local_cls_norm == (local and layout == 'official')
    check_parity(name, w)
    if first is None:
      first = w
    elif layout == 'official':  # .pth and .safetensors: the same params, bit for bit
      for a, b in zip(weights.flat(first.backbone).values(), weights.flat(w.backbone).values()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_export_import_round_trip_is_exact(name, tmp_path, capsys):
  sd = official_sd(reference(name))
  save(sd, tmp_path / 'm.pth')
  assert convert.main(['import', str(tmp_path / 'm.pth'), str(tmp_path / 'ours.safetensors')]) == 0
  layouts = ['official'] + ([] if MODELS[name][3] else ['hf'])
  for layout in layouts:
    out = tmp_path / f'{layout}.pth'
    assert convert.main(['export', str(tmp_path / 'ours.safetensors'), str(out),
                         '--layout', layout]) == 0
    written = {k: v.numpy() for k, v in torch.load(out, weights_only=True).items()}
    want = sd if layout == 'official' else hf_from_official(sd)  # HF: no k bias, no buffers
    assert sorted(written) == sorted(want)
    for k in want:
      if k == convert_dinov3.PERIODS:
        np.testing.assert_allclose(written[k], want[k], rtol=1e-6)
      else:
        np.testing.assert_array_equal(written[k], want[k], err_msg=k)
    assert convert.main(['import', str(out), str(tmp_path / 'again.safetensors'),
                         '--heads', str(MODELS[name][0])]) == 0
    again = convert.export(weights.read_file(tmp_path / 'again.safetensors').backbone,
                           tmp_path / 'again.safetensors.pth', layout=layout,
                           vit=weights.read_file(tmp_path / 'again.safetensors').vit)
    for k in written:
      np.testing.assert_array_equal(again[k], written[k], err_msg=k)
  capsys.readouterr()


@pytest.mark.parametrize('layout,change,message', [
    ('official', lambda sd: sd.pop('blocks.1.norm2.weight'), "no 'blocks.1.norm2.weight'"),
    ('official', lambda sd: sd.update({'blocks.0.attn.qkv.bias_mask': np.ones(192, np.float32)}),
     'bias_mask'),
    ('official', lambda sd: sd.update({'rope_embed.periods': np.arange(1, 9, dtype=np.float32)}),
     'rope_embed.periods'),
    ('hf', lambda sd: sd.update({'layer.0.attention.q_proj.weight': np.zeros((63, 64))}),
     "shape mismatch for 'layer.0.attention.q_proj.weight'"),
])
def test_bad_key_or_shape_is_one_clear_line(layout, change, message, tmp_path, capsys):
  sd = official_sd(reference('swiglu_local_norm'))
  sd = sd if layout == 'official' else hf_from_official(sd)
  change(sd)
  save(sd, tmp_path / 'm.safetensors')
  dst = tmp_path / 'out.safetensors'
  assert convert.main(['import', str(tmp_path / 'm.safetensors'), str(dst)]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err
  assert not dst.exists()


def test_plus_variants_are_told_apart_by_their_ffn():
  """S/16 and S+/16 share width, depth and heads: the FFN keys and shapes decide (shapes only)."""
  def sd(ffn, hidden, d=384, depth=12):
    z = lambda *s: np.broadcast_to(np.float32(0), s)
    out = {'patch_embed.proj.weight': z(d, 3, 16, 16), 'storage_tokens': z(1, 4, d),
           'rope_embed.periods': 100.0 ** (np.arange(16, dtype=np.float32) / 16)}
    for i in range(depth):
      out.update({f'blocks.{i}.ls1.gamma': z(d), f'blocks.{i}.attn.qkv.bias': z(3 * d),
                  f'blocks.{i}.attn.qkv.bias_mask': z(3 * d)})
      out.update({f'blocks.{i}.mlp.{n}.weight': z(hidden, d) for n in
                  (('w1', 'w2') if ffn == 'swiglu' else ('fc1',))})
    return out
  small = convert_dinov3.infer_vit_config(sd('mlp', 1536), 'official')
  plus = convert_dinov3.infer_vit_config(sd('swiglu', 1536), 'official')
  assert weights.arch_name(small) == 'vit_small' and small.mlp_ratio == 4.0
  assert weights.arch_name(plus) == 'vit_small_plus' and plus.mlp_ratio == 6.0
  assert weights.arch_name(ViTConfig.from_variant('vit_large_plus', 16)) == 'vit_large_plus'
  assert weights.arch_name(ViTConfig.from_variant('vit_large', 16)) == 'vit_large'
  h7 = convert_dinov3.infer_vit_config(
      {'layer.0.mlp.gate_proj.weight': np.broadcast_to(np.float32(0), (8192, 4096)),
       'layer.0.mlp.up_proj.weight': np.broadcast_to(np.float32(0), (8192, 4096)),
       'embeddings.patch_embeddings.weight': np.broadcast_to(np.float32(0), (4096, 3, 16, 16))},
      'hf')
  assert (h7.heads, h7.mlp_ratio, h7.swiglu_align, h7.qkv_bias) == (32, 3.0, 64, False)


def test_model_file_loads_and_keeps_the_dinov3_fields(tmp_path):
  model = reference('mlp_cls_norm')
  save(official_sd(model), tmp_path / 'm.pth')
  assert convert.main(['import', str(tmp_path / 'm.pth'), str(tmp_path / 'o.safetensors')]) == 0
  vit, config = weights.load_model(str(tmp_path / 'o.safetensors'))
  assert config.model.pos_embed == 'rope' and config.model.untie_cls_and_patch_norms
  assert config.model.ln_eps == 1e-5 and config.model.mask_k_bias
  img = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(img), n_last=1)[-1].numpy()
  np.testing.assert_allclose(vit(img.transpose(0, 2, 3, 1)).cls, ref[:, 0], atol=1e-5, rtol=0)


def test_init_from_continues_pretraining_with_fresh_heads(tmp_path):
  """A converted DINOv3 file starts student and teacher backbones (the config's model.* set to
  the fields `convert import` prints); the DINO head keeps its fresh init."""
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from dino_jax import checkpointing, train  # pylint: disable=import-outside-toplevel
  torch.manual_seed(1)
  model = RefViT(d=96, depth=4, heads=3, patch=4, hidden=384)  # vit_pico, patch 4
  save(official_sd(model), tmp_path / 'm.pth')
  w = convert.convert(tmp_path / 'm.pth')
  fields = {f'model.{k}': v for k, v in weights.model_fields(w).items()
            if k not in ('img_size', 'width', 'depth', 'heads', 'mlp_ratio')}
  assert fields['model.arch'] == 'vit_pico'
  path = str(tmp_path / 'converted.safetensors')
  weights.save(w, path)
  run = train.build(tiny_config(**{**fields, 'init_from': path}))
  mngr = checkpointing.manager(str(tmp_path / 'w'))
  start, _, mngr = train._start_state(run, str(tmp_path / 'w'), mngr)  # pylint: disable=protected-access
  mngr.close()
  for ours in (start.params['backbone'], start.teacher_params['backbone']):
    for k, v in weights.flat(w.backbone).items():
      np.testing.assert_array_equal(np.asarray(weights.flat(ours)[k]), v, err_msg=k)
  assert 'head' in start.params and int(start.step) == 0
