"""Config files: load a `get_config()` module by path, apply dotted-field overrides, and
complete a saved config from the package defaults."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from dino_jax import defaults


def load(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (e.g. configs/vit_s16.py)."""
  name = 'dino_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def override(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Set {'model.arch': 'vit_tiny', ...} on `config` in place; returns it."""
  for key, value in values.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run's config as a checkpoint saved it, with the fields that newer code added (absent
  from older checkpoints) taken from the package defaults (dino_jax/defaults.py)."""
  config = defaults.get_config()

  def merge(node, values):
    for k, v in values.items():
      if isinstance(v, dict) and k in node and isinstance(node[k], ml_collections.ConfigDict):
        merge(node[k], v)
      elif k in node:
        node[k] = type(node[k])(v) if isinstance(node[k], tuple) else v
      else:
        node[k] = v
  with config.unlocked():
    merge(config, saved)
  return config
