"""The benchmark's FLOP count (its MFU rests on it): matrix products counted exactly, through
jit, grad, scan and the model's attention, whatever kernel would run; and a smoke test of every
`python -m dino_jax.bench` subcommand (it runs and prints its numbers; no timing is checked)."""
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, shared_data
from dino_jax import bench
from dino_jax.models import attention as attention_lib


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
  assert bench._model_flops(lambda q: attention_lib.fused_attention(q, q, q, 0.5), q) == want  # pylint: disable=protected-access
  attn = attention_lib.Attention(h * d, h, dtype=jnp.float32, rngs=nnx.Rngs(0))
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


# ---- every subcommand runs and prints its numbers (smoke tests: tiny models, 1-2 steps) ----

def _tiny_config_file(tmp_path, **overrides):
  """A config file (what the bench's --config takes) that builds conftest's tiny_config."""
  path = tmp_path / 'tiny.py'
  path.write_text(f'import sys\nsys.path.insert(0, {str(REPO / "tests")!r})\n'
                  f'from conftest import tiny_config\n'
                  f'def get_config():\n  return tiny_config(**{overrides!r})\n')
  return str(path)


def test_bench_augment_prints_both_rates(tmp_path, capsys):
  bench.main(['augment', '--config', _tiny_config_file(tmp_path), '--batch', '2', '--canvas',
              '16', '--n-local', '2', '--iters', '1', '--pil-images', '2', '--dtype', 'float32'])
  out = capsys.readouterr().out
  assert 'augment: 2x16 + 2x8 crops from 16px canvases, batch 2' in out
  assert re.search(r'jax \(jit, on device\): +[\d.]+ images/s +\(compile [\d.]+ s\)', out), out
  assert re.search(r'PIL \(this process, 1 core\): +[\d.]+ images/s', out), out


def test_bench_data_prints_decode_rates_and_wait_shares(tmp_path, capsys, monkeypatch):
  shared = shared_data('cifar10_subset.npz').parent
  (tmp_path / 'tmp').mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))  # where it writes its JPEGs
  bench.main(['data', '--config', _tiny_config_file(tmp_path), '--data-dir', str(shared),
              '--images', '16', '--steps', '1', '--canvas', '32'])
  out = capsys.readouterr().out
  assert re.search(r'cifar10_subset: 16 JPEGs of 32x32 \([\d.]+ KB\) -> 16px canvas: +[\d.]+ '
                   r'images/s per worker', out), out
  waits = re.findall(r'(folder|npz):\S+: +[\d.]+% of \d+ ms/step waiting for the next batch', out)
  assert waits == ['folder', 'npz'], out
  assert not list((tmp_path / 'tmp').iterdir())  # the JPEGs it wrote are removed


def test_bench_train_prints_its_numbers_and_profile_writes_a_trace(tmp_path, capsys):
  """`bench train` (`bench step` is the same command) on the tiny model, with --profile DIR."""
  bench.main(['train', '--config', _tiny_config_file(tmp_path, **{'data.source': 'digits'}),
              '--steps', '1', '--warmup', '0', '--peak-tflops', '1',
              '--profile', str(tmp_path / 'prof'), '--profile-steps', '2'])
  out = capsys.readouterr().out
  for pattern in (r'train: vit_pico/4, batch 16, crops 2x16 \+ 2x8', r'compile [\d.]+ s',
                  r'step [\d.]+ ms \(median of 1; .*\), [\d.]+ images/s',
                  r'[\d.]+ GFLOP/step/device', r'MFU [\d.]+% of 1 TFLOP/s',
                  r'peak device memory [\d.]+ GiB'):
    assert re.search(pattern, out), (pattern, out)
  assert f'profile: 2 step(s) traced to {tmp_path / "prof"}' in out
  traces = list((tmp_path / 'prof').glob('plugins/profile/*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert list((tmp_path / 'prof').glob('plugins/profile/*/*.trace.json.gz'))


def test_bench_train_breakdown_times_the_parts_of_the_step(tmp_path, capsys):
  bench.main(['train', '--config', _tiny_config_file(tmp_path, **{'data.source': 'digits'}),
              '--steps', '1', '--warmup', '0', '--breakdown'])
  out = capsys.readouterr().out
  for part in ('augmentation (all crops)', 'teacher forward (global crops)',
               'student backbone forward+backward', 'student backbone+head forward+backward'):
    assert re.search(re.escape(part) + r' +[\d.]+ ms', out), (part, out)


def test_bench_reports_a_bad_config_in_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(['train', '--config', _tiny_config_file(tmp_path, **{'model.arch': 'vit_nope'}),
                '--steps', '1'])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: config.model.arch: unknown arch') and '\n' not in err
