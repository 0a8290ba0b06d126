"""Config files: load a `get_config()` module by path, and apply dotted-field overrides."""
from __future__ import annotations

import importlib.util
import os

import ml_collections


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
