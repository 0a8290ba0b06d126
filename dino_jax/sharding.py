"""Mesh, sharding rules and host->global batch conversion.

The mesh has axes ('data', 'fsdp'). Batches are sharded over both axes together; parameters
and optimizer state shard their largest divisible dimension over 'fsdp' when they are big
enough to matter, and are replicated otherwise. Under jit with these global arrays, a batch
mean is already the global mean.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp')
BATCH = P(AXES)
MIN_SHARD_SIZE = 2 ** 16  # elements; smaller tensors are replicated


def mesh_shape(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
  """Resolve -1 (fill with the remaining devices) and check the product."""
  if data == -1 and fsdp == -1:
    raise ValueError('config.mesh: at most one of data, fsdp may be -1')
  if data == -1:
    data = n_devices // fsdp
  if fsdp == -1:
    fsdp = n_devices // data
  if data < 1 or fsdp < 1 or data * fsdp != n_devices:
    raise ValueError(f'config.mesh: data={data} x fsdp={fsdp} does not use the '
                     f'{n_devices} available devices')
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, fsdp, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shard the largest dimension divisible by the fsdp size; replicate small tensors."""
  if fsdp == 1 or math.prod(shape) < MIN_SHARD_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*([None] * dim + ['fsdp']))
  return P()


def tree_shardings(mesh: Mesh, tree):
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs (e.g. a TrainState)."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays sharded over the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def global_batch_check(global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f'config.batch_size={global_batch} is not divisible by the {n} devices')
  if global_batch % jax.process_count():
    raise ValueError(f'config.batch_size={global_batch} is not divisible by the '
                     f'{jax.process_count()} processes')
