"""Weights files with wrong contents: a wrong shape, a missing or an unexpected tensor, a cut-off
file, a file that is no dino_jax model. Every loader refuses each one before use with one line
naming the file (and the tensor), and leaves the file as it was."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx, serialization
from safetensors.numpy import save_file

from conftest import REPO, tiny_config
from dino_jax import checkpointing, convert, evaluate, models, weights
from dino_jax.models import ViTConfig

Mismatch = checkpointing.CheckpointMismatchError
VIT = ViTConfig(width=96, depth=2, heads=3, patch_size=4, img_size=16)  # qkv bias: (288,)

# name -> (edit of a flat {tensor name: array} dict, tensor named in the message, error)
BAD = {
    'qkv_bias': (lambda t: t.update({'blocks.0.attn.qkv.bias': np.zeros(1, np.float32)}),
                 'blocks.0.attn.qkv.bias', Mismatch),
    'pos_embed': (lambda t: t.update({'pos_embed': np.zeros((1, 10, 96), np.float32)}),
                  'pos_embed', Mismatch),
    'missing': (lambda t: t.pop('norm.bias'), 'norm.bias', Mismatch),
    'extra': (lambda t: t.update({'blocks.0.attn.q_bias': np.zeros(96, np.float32)}),
              'blocks.0.attn.q_bias', Mismatch),
}


def unflat(flat: dict) -> dict:
  tree = {}
  for name, v in flat.items():
    *parents, leaf = [int(p) if p.isdigit() else p for p in name.split('.')]
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def network_params(module) -> dict:
  return jax.tree.map(np.asarray, nnx.split(module)[1].to_pure_dict())


@pytest.fixture(scope='module')
def good(tmp_path_factory):
  """A converted .safetensors (backbone, head and center), an exported .msgpack of older
  versions and an exported .safetensors (a run's backbone and config)."""
  root = tmp_path_factory.mktemp('weights')
  backbone = network_params(models.ViT(VIT, rngs=nnx.Rngs(0)))
  head_cfg = weights.HeadConfig(out_dim=32, hidden_dim=48, bottleneck_dim=16, nlayers=3)
  head = network_params(models.DINOHead(96, 32, hidden_dim=48, bottleneck_dim=16, nlayers=3,
                                        rngs=nnx.Rngs(1)))
  converted = root / 'converted.safetensors'
  weights.save(weights.Weights(VIT, backbone, head_cfg, head, np.zeros((1, 32), np.float32)),
               converted)
  config = tiny_config()
  exported = root / 'exported.msgpack'
  network = models.build(config, teacher=True)
  write_msgpack_export(network_params(network.backbone), config.to_dict(), exported)
  new_export = root / 'exported.safetensors'
  weights.save(weights.Weights(network.backbone.cfg, network_params(network.backbone),
                               config=config.to_dict()), new_export)
  return root, converted, exported, new_export


def write_msgpack_export(backbone: dict, saved_config: dict, out) -> None:
  """A backbone file as `inference export` wrote it before model files became .safetensors."""
  out.write_bytes(serialization.msgpack_serialize({
      'format': 'dino_jax.backbone.v1', 'which': 'teacher', 'step': 0,
      'config': json.dumps(saved_config), 'params': backbone}))


def bad_safetensors(good_file, out, edit):
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(good_file), framework='numpy') as f:
    meta = f.metadata()
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  backbone = {k.removeprefix('backbone.'): v for k, v in tensors.items()
              if k.startswith('backbone.')}
  edit(backbone)
  save_file({**{k: v for k, v in tensors.items() if not k.startswith('backbone.')},
             **{'backbone.' + k: v for k, v in backbone.items()}}, str(out), metadata=meta)


def bad_export(good_file, out, edit):
  blob = serialization.msgpack_restore(good_file.read_bytes())
  flat = weights.flat(blob['params'])
  edit(flat)
  blob['params'] = unflat(flat)
  out.write_bytes(serialization.msgpack_serialize(blob))


def refused(load, path, error, *names):
  """load(path) raises `error`, one line naming the file and each of `names`; the file keeps
  its bytes."""
  before = path.read_bytes()
  with pytest.raises(error) as e:
    load(str(path))
  msg = str(e.value)
  assert str(path) in msg and '\n' not in msg, msg
  for n in names:
    assert n in msg, msg
  assert path.read_bytes() == before
  return msg


SAFETENSORS_LOADERS = {'load_model': weights.load_model, 'convert.load': convert.load,
                       'read_file': weights.read_file}


def test_good_files_load_and_run(good):
  _, converted, exported, new_export = good
  images = np.zeros((1, 16, 16, 3), np.float32)
  for path in (converted, exported, new_export):
    model, config = weights.load_model(str(path))
    assert model(images).cls.shape == (1, 96) and config.model.patch_size == 4
  c = weights.read_file(converted)
  assert c.head_config.out_dim == 32 and c.center.shape == (1, 32)


@pytest.mark.parametrize('bad', sorted(BAD))
@pytest.mark.parametrize('loader', sorted(SAFETENSORS_LOADERS))
def test_converted_safetensors_with_wrong_tensors(good, tmp_path, bad, loader):
  edit, tensor, error = BAD[bad]
  path = tmp_path / f'{bad}.safetensors'
  bad_safetensors(good[1], path, edit)
  refused(SAFETENSORS_LOADERS[loader], path, error, f"'backbone.{tensor}'")


def test_shape_messages_give_both_shapes(good, tmp_path):
  path = tmp_path / 'qkv.safetensors'
  bad_safetensors(good[1], path, BAD['qkv_bias'][0])
  msg = refused(weights.load_model, path, Mismatch)
  assert msg.endswith("['backbone.blocks.0.attn.qkv.bias'] is (1,), the model has (288,)")
  path = tmp_path / 'missing.safetensors'
  bad_safetensors(good[1], path, BAD['missing'][0])
  assert refused(convert.load, path, Mismatch).endswith(
      "no tensor 'backbone.norm.bias', which the model needs (shape (96,))")


def test_converted_head_and_center_are_checked_too(good, tmp_path):
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(good[1]), framework='numpy') as f:
    meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
  for name, value in (('head.last_layer.weight_v', np.zeros((16, 31), np.float32)),
                      ('center', np.zeros((1, 31), np.float32))):
    path = tmp_path / f'{name}.safetensors'
    save_file({**tensors, name: value}, str(path), metadata=meta)
    refused(weights.read_file, path, Mismatch, f"'{name}'", '(16, 31)' if 'head' in name
            else '(1, 31)')
  path = tmp_path / 'no_head_meta.safetensors'
  save_file(tensors, str(path), metadata={**meta, 'head': 'null'})
  refused(weights.read_file, path, Mismatch, 'unexpected tensor', "'head.")


@pytest.mark.parametrize('bad', sorted(BAD))
@pytest.mark.parametrize('kind', ['msgpack', 'safetensors'])  # older exports, today's
def test_exported_files_with_wrong_tensors(good, tmp_path, bad, kind):
  edit, tensor, error = BAD[bad]
  path = tmp_path / f'{bad}.{kind}'
  if kind == 'msgpack':
    bad_export(good[2], path, edit)
  else:
    bad_safetensors(good[3], path, edit)
    tensor = 'backbone.' + tensor
  refused(weights.load_model, path, error, f"'{tensor}'")


@pytest.mark.parametrize('which', ['converted', 'exported', 'new_export'])
def test_truncated_files(good, tmp_path, which):
  src = {'converted': good[1], 'exported': good[2], 'new_export': good[3]}[which]
  path = tmp_path / f'cut{src.suffix}'
  data = src.read_bytes()
  for cut in (len(data) // 2, len(data) - 7, 40):
    path.write_bytes(data[:cut])
    loaders = SAFETENSORS_LOADERS.values() if which != 'exported' else [weights.load_model]
    for load in loaders:
      refused(load, path, weights.ModelFileError)


def not_dino_jax_files(root):
  rng = np.random.default_rng(0)
  files = {'random.bin': rng.integers(0, 256, 4096, np.uint8).tobytes(),
           'random.safetensors': rng.integers(0, 256, 4096, np.uint8).tobytes(),
           'notes.txt': b'these are not weights\n' * 20,
           'model.msgpack': serialization.msgpack_serialize({'format': 'other', 'x': 1})}
  for name, data in files.items():
    (root / name).write_bytes(data)
  save_file({'pos_embed': np.zeros((1, 17, 96), np.float32)}, str(root / 'hub.safetensors'))
  return [root / n for n in [*files, 'hub.safetensors']]


def run_evaluate_knn(path, capsys):
  before = path.read_bytes()
  with pytest.raises(SystemExit) as e:
    evaluate.main(['knn', f'--model={path}', '--source=digits', '--k', '1'])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 1
  assert path.read_bytes() == before
  assert len(err.splitlines()) == 1 and err.startswith('error: ') and str(path) in err, err
  return err


def test_evaluate_refuses_files_that_are_no_dino_jax_model(tmp_path, capsys):
  for path in not_dino_jax_files(tmp_path):
    err = run_evaluate_knn(path, capsys)
    assert 'not a dino_jax' in err or 'cannot be read' in err, err


def test_evaluate_refuses_a_wrong_shape_instead_of_reporting_results(good, tmp_path, capsys):
  path = tmp_path / 'qkv.safetensors'
  bad_safetensors(good[1], path, BAD['qkv_bias'][0])
  assert "['backbone.blocks.0.attn.qkv.bias'] is (1,)" in run_evaluate_knn(path, capsys)
  path = tmp_path / 'pos.msgpack'
  bad_export(good[2], path, BAD['pos_embed'][0])
  assert "['pos_embed'] is (1, 10, 96)" in run_evaluate_knn(path, capsys)


def test_evaluate_cli_prints_one_line_and_no_traceback(tmp_path):
  path = tmp_path / 'random.bin'
  path.write_bytes(os.urandom(1000))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, '-m', 'dino_jax.evaluate', 'knn', f'--model={path}',
                      '--source=digits'], capture_output=True, text=True, timeout=300,
                     cwd=REPO, env=env, check=False)
  assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and str(path) in errors[0] and r.stdout == ''


def test_convert_cli_export_of_a_bad_file_is_one_line(good, tmp_path, capsys):
  path = tmp_path / 'qkv.safetensors'
  bad_safetensors(good[1], path, BAD['qkv_bias'][0])
  dst = tmp_path / 'out.safetensors'
  before = path.read_bytes()
  assert convert.main(['export', str(path), str(dst)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith(f'error: {path}') and 'qkv.bias' in err and len(err.splitlines()) == 1
  assert not dst.exists() and path.read_bytes() == before


def test_official_file_errors_name_the_file(tmp_path):
  sd = convert.to_state_dict(network_params(models.ViT(VIT, rngs=nnx.Rngs(0))))
  path = tmp_path / 'official.safetensors'
  save_file({**sd, 'blocks.0.attn.qkv.bias': np.zeros(1, np.float32)}, str(path))
  refused(convert.load, path, convert.CheckpointError, "'blocks.0.attn.qkv.bias'", '(1,)')


def test_a_fifo_named_like_weights_is_refused_unopened(tmp_path):
  import threading  # pylint: disable=import-outside-toplevel
  fifo = tmp_path / 'model.safetensors'
  os.mkfifo(fifo)
  errors = []
  def target():
    try:
      convert.load(str(fifo))
    except weights.ModelFileError as e:
      errors.append(str(e))
  t = threading.Thread(target=target, daemon=True)
  t.start()
  t.join(60)
  if t.is_alive():
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked reader go
    pytest.fail('convert.load blocked on a FIFO')
  assert errors == [f'{fifo}: not a regular file (a FIFO)']
