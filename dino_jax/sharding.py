"""Mesh, name-based sharding rules and host->global batch conversion.

The mesh has axes ('data', 'fsdp'). Batches (and the crops made from them) are sharded over
both axes together. Parameters of the student and the teacher, their optimizer moments and
the center are sharded over 'fsdp' by the rules in `RULES`, looked up by the leaf's path in
the TrainState ('params/backbone/blocks/0/mlp/fc1/kernel', 'opt_state/.../mu/backbone/...'),
so a parameter, its EMA copy and its Adam moments always share one layout. Tensors smaller
than `config.mesh.min_shard_size` elements are replicated. Under jit with these global
arrays, a batch mean is already the global mean.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp')
BATCH = P(AXES)

# (regex searched in the leaf's '/'-joined path, dims to try in order). The first rule that
# matches decides; the first listed dim divisible by the fsdp size is sharded, and a leaf with
# no such dim (or an empty tuple) is replicated.
RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r'(^|/)(patch_)?center$', (-1,)),  # (1, K) teacher-logit centers: shard the prototypes
    (r'head/last_layer/weight_[vg]$', (-1,)),  # (bottleneck, K), (1, K): the prototypes
    (r'/kernel$', (-1, 0)),  # every Linear / Conv kernel: output features, else input
    (r'(^|/)pos_embed$', (-1,)),  # (1, N, D)
    (r'.', ()),  # biases, norms, cls / register tokens, LayerScale, step, rng: replicate
)


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


def path_name(path) -> str:
  """'opt_state/1/inner_states/rest/inner_state/mu/backbone/pos_embed' for a jax tree path
  (attribute, dict and sequence keys alike)."""
  def part(k):
    for attr in ('name', 'key', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return '/'.join(part(k) for k in path)


def param_spec(name: str, shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """The PartitionSpec `RULES` give the leaf `name` of `shape` on an fsdp axis of size fsdp."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = next(d for pattern, d in RULES if re.search(pattern, name))
  for dim in dims:
    dim = dim % len(shape) if shape else 0
    if shape and shape[dim] % fsdp == 0:
      return P(*([None] * dim + ['fsdp']))
  return P()


def tree_specs(tree, fsdp: int, min_size: int):
  """PartitionSpecs for a pytree of arrays or ShapeDtypeStructs (e.g. a TrainState)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: param_spec(path_name(path), tuple(x.shape), fsdp, min_size), tree)


def tree_shardings(mesh: Mesh, tree, min_size: int = 2 ** 16):
  """NamedShardings on `mesh` for a pytree of arrays or ShapeDtypeStructs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      tree_specs(tree, mesh.shape['fsdp'], min_size),
                      is_leaf=lambda x: isinstance(x, P))


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
