"""Checkpoints: the only module that talks to orbax.

WORKDIR/checkpoints/<step>/ holds four items: `state` (the whole TrainState: student, teacher,
optimizer state, center, step, rng), `data` (the input iterator's state, JSON), `config` (the
run's config, JSON) and `checksums` (one per state array, JSON; dino_jax.checksum). Saves are
asynchronous; orbax writes each step to a temporary directory and renames it when complete, so
a half-written save is never mistaken for a checkpoint. `restore_latest` first compares the
checkpoint's config and state structure with this run's (a difference is refused by name, the
checkpoint untouched), then restores and verifies the checksums; a checkpoint that fails to
read or to verify is damaged: set aside and the previous one tried.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dino_jax import checksum, paths, sharding
from dino_jax.errors import DinoJaxError, error_line

ITEMS = ('state', 'data', 'config', 'checksums')

# Config fields a resumed run must share with the run that wrote the checkpoint: they fix the
# parameter shapes, the data order or the meaning of a step. Any other difference (lr, epochs,
# logging, evaluation, mesh ...) is allowed and logged.
RESUME_CRITICAL = ('model', 'batch_size', 'data.source', 'data.canvas_size', 'seed',
                   'crops.global_size', 'crops.n_local', 'crops.local_size', 'crops.size_sets',
                   'crops.size_set_ratios')


class CheckpointMismatchError(DinoJaxError, ValueError):
  """A checkpoint or weights file that does not fit this run (a config field, the state's
  structure, a tensor's shape); the message names the difference. Nothing is touched."""


class DamagedCheckpointError(DinoJaxError, IOError):
  """A checkpoint that fails to read or to verify its checksums."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; a bucket URL stays one (os.path.abspath would turn gs://b/run into
  ./gs:/b/run, a local folder that vanishes with the VM)."""
  return paths.join(paths.absolute(workdir), 'checkpoints')


def manager(workdir: str, keep: int = 3, keep_every: int = 0,
            read_only: bool = False) -> ocp.CheckpointManager:
  """Keep the newest `keep` checkpoints plus every step divisible by `keep_every` (0: none)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_every or None, create=not read_only,
      read_only=read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, state, config, data_state: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config.to_dict()),
      checksums=ocp.args.JsonSave(checksum.tree_checksums(state))), force=True)


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
  return mngr.latest_step()


@dataclasses.dataclass
class Restored:
  state: object
  data: dict
  config: dict
  step: int


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None) -> Restored:
  """The checkpoint at `step` (default: latest), its state laid out like `abstract_state`
  (ShapeDtypeStructs carrying the target shardings: any mesh or device count)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {mngr.directory}')
  r = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore()))
  return Restored(r['state'], r['data'], r['config'], step)


def restore_latest(workdir: str, mngr: ocp.CheckpointManager, abstract_state,
                   config) -> tuple[Restored | None, ocp.CheckpointManager]:
  """Restore the newest readable checkpoint of `workdir`, or None when it has none.

  A checkpoint that fails to read (an error `is_damage` accepts) is reported, renamed to
  `<step>.damaged` (kept for inspection, never deleted) and the previous one is tried; any
  other error propagates and sets nothing aside. A checkpoint written under a config
  that cannot resume this one raises CheckpointMismatchError. Returns the (possibly reopened)
  manager too, since renaming changes the steps it knows.
  """
  while (step := mngr.latest_step()) is not None:
    try:
      step_dir = epath.Path(str(mngr.directory)) / str(step)
      saved_config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      check_resumable(saved_config['config'], config.to_dict(), workdir)
      check_structure(step_dir, abstract_state, saved_config['config'], config.to_dict(),
                      workdir)
      restored = restore(mngr, abstract_state, step)
      verify(mngr, restored)
      return restored, mngr
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not is_damage(e):
        raise  # a bug, not a damaged file: nothing is set aside
      msg = error_line(e, limit=300)
      logging.warning('checkpoint %d in %s is damaged (%s); trying the previous one', step,
                      mngr.directory, msg)
      print(f'warning: checkpoint {step} in {mngr.directory} is damaged ({msg}); '
            f'moved to {step}.damaged, trying the previous one', flush=True)
      mngr.close()
      _set_aside(os.path.join(str(mngr.directory), str(step)))
      mngr = manager(workdir, keep=config.keep_checkpoints,
                     keep_every=config.keep_checkpoint_every)
  return None, mngr


# What reading a truncated, corrupt or missing checkpoint file raises: OSError (a missing file
# or item folder: FileNotFoundError; our checksum check: DamagedCheckpointError), ValueError
# (tensorstore's status errors, DATA_LOSS, OUT_OF_RANGE, NOT_FOUND ...; json.JSONDecodeError of
# a garbled metadata or JSON item) and KeyError (orbax: an item missing from the step folder).
DAMAGE_ERRORS = (OSError, ValueError, KeyError)


def is_damage(e: BaseException) -> bool:
  """Whether `e` says a checkpoint file is damaged (anything else, a TypeError of our own
  checks say, is a bug and must propagate). orbax re-raises tensorstore's read errors as a bare
  Exception (`Encountered error while reading array index`) whose cause is the real error."""
  if type(e) is Exception and e.__cause__ is not None:  # pylint: disable=unidiomatic-typecheck
    return is_damage(e.__cause__)
  return isinstance(e, DAMAGE_ERRORS)


def verify(mngr: ocp.CheckpointManager, restored: Restored) -> None:
  """Raise DamagedCheckpointError when a restored array's checksum differs from the saved one.
  Checkpoints written before checksums existed have none and are accepted as they are."""
  if not (epath.Path(str(mngr.directory)) / str(restored.step) / 'checksums').exists():
    logging.warning('checkpoint %d has no checksums (written by an older dino_jax): '
                    'not verified', restored.step)
    return
  saved = mngr.restore(restored.step, args=ocp.args.Composite(
      checksums=ocp.args.JsonRestore()))['checksums']
  bad = checksum.mismatches(restored.state, saved)
  if bad:
    raise DamagedCheckpointError(
        f'checksum mismatch in {len(bad)} array(s): {", ".join(bad[:3])}'
        f'{" ..." if len(bad) > 3 else ""}')


def _state_metadata(step_dir):
  """The tree of array metadata (shapes, dtypes) of a step's `state` item, no arrays read."""
  metadata = ocp.StandardCheckpointHandler().metadata(step_dir / 'state')
  return getattr(metadata, 'item_metadata', metadata)


def _is_empty(x) -> bool:
  return x is None or (isinstance(x, (tuple, list, dict)) and len(x) == 0)


def _shapes(tree) -> dict[str, tuple | None]:
  """{path: shape} of the arrays, and {path: None} of the empty nodes (optax's EmptyState,
  MaskedNode), which orbax's metadata lists too: a change of optimizer chain shows there."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_empty)[0]
  return {sharding.path_name(p): None if _is_empty(x) else tuple(getattr(x, 'shape', ()))
          for p, x in flat}


def check_structure(step_dir, abstract_state, saved_config: dict, current_config: dict,
                    workdir: str) -> None:
  """Raise CheckpointMismatchError when the checkpoint's state (read from its metadata, no
  arrays) has other arrays or shapes than this config's state, e.g. after a change of
  optim.clip_grad or optim.layer_decay, naming the config fields that differ."""
  saved = _shapes(_state_metadata(step_dir))
  wanted = _shapes(abstract_state)
  only_here, only_saved = key_diff(saved, wanted)
  reshaped = sorted(k for k in set(saved) & set(wanted)
                    if wanted[k] is not None and saved[k] != wanted[k])
  if not (only_saved or only_here or reshaped):
    return
  what = []
  for label, keys in (('only in the checkpoint', only_saved), ('only in this run', only_here),
                      ('shaped differently', reshaped)):
    if keys:
      what.append(f'{len(keys)} entries {label}, e.g. {keys[0]}')
  fields = config_diff(saved_config, current_config)
  raise CheckpointMismatchError(
      f'{workdir} holds a run whose training state does not fit this config '
      f'({"; ".join(what)}); config fields that differ: {fields or "none"}. '
      f'Use a new --workdir, or set those fields as the checkpoint has them.')


def _set_aside(path: str) -> None:
  if jax.process_index() == 0 and epath.Path(path).exists():
    target = path + '.damaged'
    if epath.Path(target).exists():
      target += f'.{int(time.time())}'
    epath.Path(path).rename(target)
  multihost_utils.sync_global_devices(f'set aside {path}')


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = _tuples(v)
  return out


def _tuples(v):
  """Lists (a saved config's, nested too) as tuples, so they compare equal to the config's."""
  return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def config_diff(saved: dict, current: dict, fields=None) -> str:
  """'field: checkpoint X, this run Y; ...' for each field both configs have that differs
  (only those under `fields`, dotted prefixes, when given); '' when none. A field only one side
  has was added (or removed) by a newer version of the code, which resumes with its default:
  not a difference."""
  a, b = _flatten(saved), _flatten(current)
  keys = [k for k in sorted(set(a) & set(b)) if a[k] != b[k] and (
      fields is None or any(k == p or k.startswith(p + '.') for p in fields))]
  return '; '.join(f'{k}: checkpoint {a[k]!r}, this run {b[k]!r}' for k in keys)


def check_resumable(saved: dict, current: dict, workdir: str) -> None:
  """Raise CheckpointMismatchError naming every resume-critical field that differs."""
  diffs = config_diff(saved, current, RESUME_CRITICAL)
  if diffs:
    raise CheckpointMismatchError(
        f'{workdir} holds a run this config cannot resume ({diffs}). Use a new --workdir, '
        f'or set those fields as the checkpoint has them.')
  a, b = _flatten(saved), _flatten(current)
  other = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  if other:
    if jax.process_index() == 0:
      print(f'dino_jax: resuming with changed config fields: {", ".join(other)}', flush=True)


def _open(path: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
  """A read-only manager and a step for a workdir or a WORKDIR/checkpoints/<step> path."""
  path = paths.absolute(path).rstrip('/')
  base = os.path.basename(path)
  if base.isdigit() and paths.isdir(paths.join(path, 'state')):
    root, step = os.path.dirname(path), int(base) if step is None else step
  elif paths.isdir(paths.join(path, 'checkpoints')):
    root = paths.join(path, 'checkpoints')
  elif base == 'checkpoints' and paths.isdir(path):
    root = path
  else:
    raise FileNotFoundError(f'{path} is neither a dino_jax workdir nor a checkpoint step '
                            f'directory (WORKDIR/checkpoints/<step>)')
  mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_names=ITEMS)
  step = mngr.latest_step() if step is None else step
  if step is None:
    mngr.close()
    raise FileNotFoundError(f'no checkpoint in {root}')
  return mngr, step


def read_config(path: str, step: int | None = None) -> tuple[dict, int]:
  """(saved config dict, step) of a workdir's newest checkpoint or of a step directory."""
  mngr, step = _open(path, step)
  try:
    r = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return r['config'], step
  finally:
    mngr.close()


def restore_params(path: str, abstract_params: dict, which: str = 'teacher',
                   step: int | None = None) -> tuple[dict, int]:
  """(params of `which` ('teacher' | 'student'), step) from a workdir or a step directory,
  reading only that part of the state. abstract_params: ShapeDtypeStructs of the params
  tree; with shardings they come back as sharded jax Arrays, without as numpy arrays."""
  key = {'teacher': 'teacher_params', 'student': 'params'}.get(which)
  if key is None:
    raise ValueError(f"which={which!r}: choose 'teacher' or 'student'")
  parts, step = restore_parts(path, {key: abstract_params}, step)
  return parts[key], step


def restore_parts(path: str, abstract: dict, step: int | None = None) -> tuple[dict, int]:
  """({TrainState field: tree}, step) of the fields named in `abstract` (e.g. 'teacher_params',
  'center': ShapeDtypeStructs) from a workdir or a step directory, reading only those."""

  def restore_arg(x):
    if getattr(x, 'sharding', None) is None:
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)

  mngr, step = _open(path, step)
  try:
    r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract, partial_restore=True, restore_args=jax.tree.map(restore_arg, abstract))))
    return r['state'], step
  finally:
    mngr.close()


class PreemptionWatch:
  """Step-boundary preemption check. One process: a SIGTERM handler sets a flag. Several
  processes: JAX's preemption sync point (it listens for the signal itself), so all processes
  agree on the step at which to save."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      except ValueError:  # not the main thread: leave signals alone
        logging.warning('not in the main thread: SIGTERM will not save a checkpoint')

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def key_diff(have, want) -> tuple[list[str], list[str]]:
  """(sorted keys of `want` missing from `have`, sorted keys of `have` not in `want`)."""
  return sorted(set(want) - set(have)), sorted(set(have) - set(want))


def put_fitting(loaded, current, what: str):
  """`loaded` (arrays from a file) placed like `current` (the state's arrays or
  ShapeDtypeStructs with shardings: each leaf's dtype and sharding), after check_fits."""
  check_fits(loaded, current, what)
  return jax.tree.map(lambda a, b: jax.device_put(np.asarray(b, a.dtype), a.sharding),
                      current, loaded)


def check_fits(loaded, model_tree, what: str) -> None:
  """Raise CheckpointMismatchError unless `loaded` (arrays from a file) has the tree structure
  and the shapes of `model_tree` (the model's arrays or ShapeDtypeStructs); `what` names the
  source in the message."""
  if jax.tree.structure(loaded) != jax.tree.structure(model_tree):
    raise CheckpointMismatchError(f'{what}: the parameter tree does not fit the model')
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(loaded)[0],
                          jax.tree.leaves(model_tree)):
    if np.shape(a) != tuple(b.shape):
      raise CheckpointMismatchError(f'{what}: {jax.tree_util.keystr(path)} is {np.shape(a)}, '
                                    f'the model has {tuple(b.shape)}')


def abstract_with_shardings(tree, shardings=None):
  """ShapeDtypeStructs of `tree` carrying `shardings` (default: each array's own), the
  targets that orbax restores onto."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore_raw(workdir: str, step: int | None = None):
  """(state, config) of a run's checkpoint as plain nested dicts of arrays, without knowing
  the model (for export tools). step: default latest."""
  mngr = manager(workdir)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {mngr.directory}')
    # numpy arrays, so a checkpoint saved on 8 devices reads in a process that has 1
    metadata = _state_metadata(epath.Path(str(mngr.directory)) / str(step))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=restore_args),
        config=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  return restored['state'], restored['config']
