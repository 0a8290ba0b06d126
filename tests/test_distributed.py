"""Multi-host: two processes on localhost (4 CPU devices each, JAX's CPU collectives) train
exactly as one process with 8 devices; only process 0 logs; every process checkpoints."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dino_jax import checkpointing, data, distributed, sharding, train
from conftest import REPO, tiny_config

STEPS = 3
BATCH = 16


@pytest.mark.parametrize('env, tpu, expected', [
    ({}, False, None),
    ({'SLURM_NTASKS': '1', 'SLURM_STEP_NODELIST': 'n1'}, False, None),  # one task: no init
    ({'SLURM_NTASKS': '8', 'SLURM_STEP_NODELIST': 'n[1-2]'}, False, 'SLURM'),
    ({'OMPI_COMM_WORLD_SIZE': '4'}, False, 'Open MPI'),
    ({}, True, 'Cloud TPU'),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, False, 'explicit coordinator'),
])
def test_auto_detects_clusters(env, tpu, expected):
  assert distributed.detect(env, tpu) == expected
  assert distributed.init_args('auto', env, tpu) == (None if expected is None else {})
  assert distributed.init_args('none', env, tpu) is None


def test_explicit_coordinator_reads_process_ids():
  env = {'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'}
  assert distributed.init_args('localhost:1234', env, False) == dict(
      coordinator_address='localhost:1234', num_processes=2, process_id=1)


@pytest.mark.parametrize('mode, env, message', [
    ('localhost', {}, "config.distributed: 'localhost' is not 'auto', 'none' or HOST:PORT"),
    ('10.0.0.1:80', {'JAX_PROCESS_ID': '0'},
     "config.distributed='10.0.0.1:80' needs JAX_NUM_PROCESSES in the environment"),
])
def test_bad_distributed_settings_fail_clearly(mode, env, message):
  with pytest.raises(distributed.DistributedConfigError) as e:
    distributed.init_args(mode, env, False)
  assert str(e.value) == message


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _overrides(npz: str, mode: str) -> dict:
  """STEPS steps of the tiny config, parameters sharded over all 8 devices of the job."""
  return {'batch_size': BATCH, 'epochs': 1, 'data.source': f'npz:{npz}', 'mesh.data': 1,
          'mesh.fsdp': 8, 'mesh.min_shard_size': 0, 'distributed': mode}


CONFIG_FILE = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
def get_config():
  return tiny_config(**{overrides!r})
'''


def _reference(config):
  """One process, 8 devices, fed the global batches the two processes assemble."""
  run = train.build(config, sharding.make_mesh(1, 8))
  kw = dict(canvas_size=config.data.canvas_size, global_batch=BATCH, seed=config.seed,
            process_count=2)
  shards = [data.train_dataset(run.train_source, process_index=i, **kw) for i in range(2)]
  state, losses = train.init_state(run), []
  for step in range(STEPS):
    batch = {k: np.concatenate([s[step][k] for s in shards]) for k in shards[0][step]}
    state, m = run.step_fn(state, sharding.to_global(batch, run.mesh))
    losses.append(float(m['loss']))
  return run, state, losses


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  rng = np.random.default_rng(0)
  npz = str(tmp_path / 'images.npz')
  np.savez(npz, x_train=rng.integers(0, 256, (STEPS * BATCH, 20, 24, 3), dtype=np.uint8))
  address = f'127.0.0.1:{_free_port()}'
  cfg_path = tmp_path / 'config.py'
  cfg_path.write_text(CONFIG_FILE.format(tests=str(REPO / 'tests'),
                                         overrides=_overrides(npz, address)))
  workdir = tmp_path / 'work'
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i),
               XLA_FLAGS='--xla_force_host_platform_device_count=4', PYTHONPATH=str(REPO))
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'dino_jax.main', f'--config={cfg_path}', f'--workdir={workdir}'],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-3000:]}'
  assert 'mesh {\'data\': 1, \'fsdp\': 8}' in outs[0]

  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  logged = [l['loss'] for l in lines if 'loss' in l]
  assert [l['step'] for l in lines if 'loss' in l] == list(range(1, STEPS + 1))  # once each

  config = tiny_config(**_overrides(npz, 'none'))
  run, ref_state, ref_losses = _reference(config)
  np.testing.assert_allclose(logged, ref_losses, rtol=1e-5)

  # The checkpoint both processes wrote (each its own shards) restores onto one process.
  mngr = checkpointing.manager(str(workdir))
  assert checkpointing.latest_step(mngr) == STEPS
  abstract = checkpointing.abstract_with_shardings(jax.eval_shape(run.init_fn),
                                                   run.state_shardings)
  restored = checkpointing.restore(mngr, abstract).state
  mngr.close()
  for a, b in zip(jax.tree.leaves(_without_key_bias(ref_state)),
                  jax.tree.leaves(_without_key_bias(restored))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def _without_key_bias(state):
  """Host copy with the key part of every qkv bias zeroed. Its gradient is exactly zero
  (softmax ignores a constant added to all logits of a query), so what it holds is rounding
  noise that Adam scales up to lr-sized steps, different for any summation order."""
  def strip(path, x):
    x = np.array(x)
    if sharding.path_name(path).endswith('attn/qkv/bias'):
      d = x.shape[-1] // 3
      x[..., d:2 * d] = 0
    return x
  return jax.tree_util.tree_map_with_path(strip, state)
