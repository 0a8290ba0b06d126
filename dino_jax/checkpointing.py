"""Checkpoints: the only module that talks to orbax.

A checkpoint holds the whole TrainState (student, teacher, optimizer state, center, step, rng)
and the run's config as JSON, under WORKDIR/checkpoints/<step>.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_names=('state', 'config'))


def save(mngr: ocp.CheckpointManager, step: int, state, config) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          config=ocp.args.JsonSave(config.to_dict())),
            force=True)


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
  return mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """The TrainState at `step` (default: latest) laid out like `abstract_state`
  (ShapeDtypeStructs with shardings), and the saved config dict."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {mngr.directory}')
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()))
  return restored['state'], restored['config']


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore_raw(workdir: str, step: int | None = None):
  """(state, config) of a run's checkpoint as plain nested dicts of arrays, without knowing
  the model (for export tools). step: default latest."""
  mngr = manager(workdir)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {mngr.directory}')
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
  return restored['state'], restored['config']
