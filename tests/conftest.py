"""Test setup: 8 virtual CPU devices (so sharding is exercised), a persistent compile cache,
and a tiny config shared by the tests."""
import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402

CACHE = pathlib.Path(os.environ.get('DINO_JAX_TEST_CACHE',
                                    pathlib.Path(__file__).resolve().parent.parent / '.jax_cache'))
jax.config.update('jax_compilation_cache_dir', str(CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / 'shared' / 'data'


def tiny_config(**overrides):
  """The CPU recipe shrunk until a train step compiles in seconds."""
  from dino_jax import config_file  # pylint: disable=import-outside-toplevel
  c = config_file.load(REPO / 'configs' / 'cpu.py')
  c.batch_size = 16
  c.epochs = 2
  c.data.canvas_size = 16
  c.model.arch = 'vit_pico'
  c.model.patch_size = 4
  c.model.out_dim = 64
  c.model.head_hidden_dim = 32
  c.model.head_bottleneck_dim = 16
  c.model.drop_path_rate = 0.1
  c.crops.global_size = 16
  c.crops.local_size = 8
  c.crops.n_local = 2
  c.loss.koleo_weight = 0.0  # the plain DINO objective unless a test asks (cpu.py adds KoLeo)
  c.optim.warmup_epochs = 1
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 1000
  c.knn.batch_size = 64
  return config_file.override(c, overrides)


@pytest.fixture
def config():
  return tiny_config()


def shared_data(name: str) -> pathlib.Path:
  path = SHARED_DATA / name
  if not path.exists():
    pytest.skip(f'{path} is absent: the shared data folder (../shared/data beside the repo) '
                f'is needed for this test')
  return path


@pytest.fixture(scope='session')
def digits_npz(tmp_path_factory):
  """64 train / 40 test real images (scikit-learn digits) as an npz source."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  x = np.round(d.images * 255 / 16).astype(np.uint8)
  path = tmp_path_factory.mktemp('data') / 'digits.npz'
  np.savez(path, x_train=x[:64], y_train=d.target[:64], x_test=x[64:104],
           y_test=d.target[64:104])
  return str(path)


@pytest.fixture
def bucket(tmp_path):
  """gs://test-bucket served from a local folder through etils.epath's mock backend (where
  gcsfs would serve it on a cloud VM): the code under test sees only gs:// URLs."""
  from etils.epath import testing as epath_testing  # pylint: disable=import-outside-toplevel
  url, root = 'gs://test-bucket', tmp_path / 'bucket'
  root.mkdir()

  def local(p):
    return str(p).replace(url, str(root), 1) if str(p).startswith(url) else str(p)

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def open_(fn, path, mode):
    if 'w' in mode:  # buckets have no folders to create first
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return fn(local(path), mode)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  def walk(fn, top, **kwargs):
    for d, dirs, files in fn(local(top), **kwargs):
      yield str(d).replace(str(root), url, 1), dirs, files  # fsspec-style: same lists, pruned

  with epath_testing.mock_epath(open=open_, exists=one, isdir=one, listdir=one, makedirs=one,
                                mkdir=one, stat=one, remove=one, rmtree=one, walk=walk,
                                copy=two, rename=two, replace=two):
    yield url, root
