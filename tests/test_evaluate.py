"""python -m dino_jax.evaluate end to end on a tiny trained workdir: k-NN agrees with the
training loop's own evaluation, the linear probe, attention PNGs and DAVIS both mask formats."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from conftest import tiny_config
from dino_jax import evaluate, train


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  d = load_digits()
  x = np.round(d.images * 255 / 16).astype(np.uint8)
  root = tmp_path_factory.mktemp('eval')
  npz = root / 'digits.npz'
  np.savez(npz, x_train=x[:64], y_train=d.target[:64], x_test=x[64:101],
           y_test=d.target[64:101])  # 37 test images: fewer than the official script's 100
  workdir = root / 'wd'
  config = tiny_config(**{'data.source': f'npz:{npz}', 'eval_every': 4, 'knn.k': 20})
  train.train_and_evaluate(config, str(workdir))
  with open(workdir / 'metrics.jsonl') as f:
    knn = {l['step']: l['knn_top1'] for l in map(json.loads, f) if 'knn_top1' in l}
  return root, f'npz:{npz}', str(workdir), knn


def test_knn_cli_matches_the_training_evaluation(run):
  root, source, workdir, logged = run
  res = evaluate.main(['knn', f'--model={workdir}', f'--source={source}'])
  assert set(res) == {'10', '20', '100', '200'}
  assert res['20']['top1'] == pytest.approx(logged[8])
  assert res['200'] == res['100']  # 64 train images: both use all of them
  init = evaluate.main(['knn', f'--model={workdir}', f'--source={source}', '--init', '--k', '20',
                        f'--json={root}/init.json'])
  assert init['20']['top1'] == pytest.approx(logged[0])
  assert json.load(open(f'{root}/init.json'))['20']['top1'] == init['20']['top1']


def test_training_logs_attention_maps_to_tensorboard(run):
  _, _, workdir, _ = run
  import pathlib  # pylint: disable=import-outside-toplevel
  events = b''.join(p.read_bytes() for p in (pathlib.Path(workdir) / 'tensorboard').iterdir())
  assert events.count(b'attention/teacher') >= 3  # steps 0, 4 and 8


def test_linear_cli(run, capsys):
  _, source, workdir, _ = run
  best = evaluate.main(['linear', f'--model={workdir}', f'--source={source}', '--epochs=3',
                        '--lrs', '0.01', '0.1', '--batch_size=32'])
  assert best['lr'] in (0.01, 0.1) and 0 <= best['top1'] <= 100
  assert 'cls4 features (384-d), cached, 3 epochs' in capsys.readouterr().out


def test_attention_cli_writes_pngs(run, tmp_path):
  _, source, workdir, _ = run
  img = tmp_path / 'photo.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8)).save(img)
  res = evaluate.main(['attention', f'--model={workdir}', f'--images={img}',
                       f'--source={source}', '--index', '3', '--image_size', '34', '42',
                       f'--out={tmp_path}/out'])
  assert len(res['pngs']) == 2 * (1 + 3 * 2 + 2)
  assert Image.open(tmp_path / 'out' / 'photo-head2.png').size == (40, 32)


def test_video_cli_reads_davis_2017_and_2016_masks(run, tmp_path):
  _, _, workdir, _ = run
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 256, (64, 128, 3), np.uint8)
  for seq, palette in (('p', True), ('g', False)):
    (tmp_path / 'JPEGImages' / '480p' / seq).mkdir(parents=True)
    (tmp_path / 'Annotations' / '480p' / seq).mkdir(parents=True)
    mask = np.zeros((64, 128), np.uint8)
    mask[16:40, 20:60] = 1
    if palette:
      mask[40:60, 80:120] = 2
    for t in range(4):
      Image.fromarray(frame).save(tmp_path / f'JPEGImages/480p/{seq}/{t:05d}.jpg', quality=95)
      if palette:
        m = Image.fromarray(mask, 'P')
        m.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * 759)
      else:
        m = Image.fromarray(mask * 255, 'L')
      m.save(tmp_path / f'Annotations/480p/{seq}/{t:05d}.png')
  res = evaluate.main(['video', f'--model={workdir}', f'--davis={tmp_path}', '--short_side=64',
                       f'--out={tmp_path}/pred'])
  assert [len(res['sequences'][s]['J']) for s in ('g', 'p')] == [1, 2]
  assert 0 <= res['J&F'] <= 1 and res['copy_first'] == {'J': 1.0, 'F': 1.0, 'J&F': 1.0}
  assert Image.open(tmp_path / 'pred' / 'p' / '00003.png').mode == 'P'
  assert Image.open(tmp_path / 'pred' / 'g' / '00003.png').mode == 'L'
