"""Multi-host start-up: `jax.distributed.initialize()` when the config or the environment asks.

config.distributed:
  'none'       never (one process; the default of the CPU recipes)
  'auto'       initialize when a cluster is detected (see `detect`), and let JAX find the
               coordinator, the process count and this process's id itself
  'HOST:PORT'  this coordinator; JAX_NUM_PROCESSES and JAX_PROCESS_ID from the environment
               (e.g. two processes on one machine, or a scheduler JAX does not know)

After it, every process sees all devices of the job (`jax.devices()`), `jax.process_index()`
tells them apart, and the jitted step runs as one program over the global mesh.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Mapping

import jax

from dino_jax.errors import DinoJaxError

# (name, test on the environment): the clusters `auto` initializes on. jax.distributed finds
# their coordinator and process ids itself.
CLUSTERS = (
    ('explicit coordinator', lambda env, tpu: bool(env.get('JAX_COORDINATOR_ADDRESS'))),
    ('SLURM', lambda env, tpu: int(env.get('SLURM_NTASKS', '1')) > 1 and
     'SLURM_STEP_NODELIST' in env),
    ('Open MPI', lambda env, tpu: int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1),
    ('Cloud TPU', lambda env, tpu: tpu),
)
ADDRESS = re.compile(r'^[^\s:]+:\d+$')


class DistributedConfigError(DinoJaxError, ValueError):
  """config.distributed or the cluster environment cannot start a multi-host run."""


def tpu_vm() -> bool:
  """True on a Cloud TPU VM: the TPU runtime is installed and TPU chips are attached."""
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def detect(env: Mapping[str, str], tpu: bool) -> str | None:
  """The name of the first cluster in `CLUSTERS` the environment belongs to, else None."""
  return next((name for name, present in CLUSTERS if present(env, tpu)), None)


def init_args(mode: str, env: Mapping[str, str], tpu: bool) -> dict | None:
  """Keyword arguments for jax.distributed.initialize(), or None for a single process."""
  if mode == 'none':
    return None
  if mode == 'auto':
    return {} if detect(env, tpu) else None
  if not ADDRESS.match(mode):
    raise DistributedConfigError(
        f"config.distributed: {mode!r} is not 'auto', 'none' or HOST:PORT")
  missing = [k for k in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID') if k not in env]
  if missing:
    raise DistributedConfigError(f'config.distributed={mode!r} needs {" and ".join(missing)} '
                                 f'in the environment')
  return dict(coordinator_address=mode, num_processes=int(env['JAX_NUM_PROCESSES']),
              process_id=int(env['JAX_PROCESS_ID']))


def initialize(mode: str) -> bool:
  """Start JAX's multi-host runtime if `mode` and the environment ask; True when it did.
  Call before anything touches a device."""
  args = init_args(mode, os.environ, tpu_vm() if mode == 'auto' else False)
  if args is None:
    return False
  jax.distributed.initialize(**args)
  return True


def compile_on_all(fns, *args, timeout_s: int = 3600) -> list:
  """With several processes: compile each jitted function of `fns` for `args` ahead of time,
  then wait until every process has (a coordination-service barrier). JAX's CPU collectives
  (gloo) give a peer only 30 s to join the first collective, less than a slow compile on a busy
  host. Returns what to call instead of `fns`; with one process, `fns` themselves."""
  if jax.process_count() == 1:
    return list(fns)
  compiled = [fn.lower(*args).compile() for fn in fns]
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  jax_distributed.global_state.client.wait_at_barrier('dino_jax_compiled', timeout_s * 1000)
  return compiled
