"""DINOv3 distillation's frozen teacher (config.distill.teacher): its run config, its network
and its params.

The teacher is a dino_jax run: a workdir or WORKDIR/checkpoints/<step> (its EMA teacher: the
backbone, the DINO head and the iBOT head when separate), or a .safetensors model file
(dino_jax/weights.py) that carries its run config and heads. Its architecture always comes
from the run config saved with it, never from the student's config. Official converted
weights have neither heads nor a run config: distillation needs the teacher's DINO and iBOT
heads, so they are refused. Its network is weights.network of that config. The step (train_step.py) runs the teacher in eval mode (no drop
path) on the global crops; nothing here updates it.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections

from dino_jax import checkpointing, config_file, weights

NO_HEADS = ('distillation needs the teacher\'s DINO and iBOT heads, and {what}; give the '
            'teacher\'s workdir (or WORKDIR/checkpoints/<step>)')


def teacher_config(path: str) -> tuple[ml_collections.ConfigDict, str | None]:
  """(the teacher's run config, None) or (its config or None, why it cannot be distilled
  from). Reads only the config (a checkpoint's JSON, a model file's metadata)."""
  if not path.endswith('.safetensors'):
    saved, _ = checkpointing.read_config(path)
    return config_file.from_saved(saved), None
  meta = weights.in_safetensors(path, lambda f: f.metadata() or {})
  if meta.get('format') not in (weights.FORMAT, weights.OLD_SAFETENSORS):
    raise weights.ModelFileError(f'{path}: not a dino_jax model file (metadata format '
                                 f'{meta.get("format")!r})')
  if 'config' not in meta:
    return None, NO_HEADS.format(what=f'{path} has no run config (converted official '
                                      f'weights have no heads)')
  config = config_file.from_saved(json.loads(meta['config']))
  if not json.loads(meta.get('head') or 'null'):
    return config, NO_HEADS.format(what=f'{path} has no heads (an exported backbone)')
  if config.model.ibot_separate_head:
    return config, NO_HEADS.format(what=f'{path} holds the DINO head only, not the separate '
                                        f'iBOT head its run had')
  return config, None


def load(path: str, current: dict) -> tuple[dict, str]:
  """(the teacher's params, where they came from), each placed like the leaf of `current`
  (the state's distill_params: arrays or ShapeDtypeStructs with shardings)."""
  if path.endswith('.safetensors'):
    w = weights.read_file(path)
    return checkpointing.put_fitting({'backbone': w.backbone, 'head': w.head}, current,
                                     f'config.distill.teacher: {path}'), path
  parts, step = checkpointing.restore_parts(
      path, {'teacher_params': checkpointing.abstract_with_shardings(current)})
  return parts['teacher_params'], f'{path} (step {step})'


def placeholder(abstract: dict) -> dict:
  """Zeros of the teacher's params' shapes: what a fresh state holds until `load` fills it."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
