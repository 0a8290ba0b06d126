"""The config defaults live in the package: saved configs are completed from dino_jax/defaults.py,
whatever the working directory, and without the repository's configs/ folder."""
import ast
import os
import pathlib
import shutil
import subprocess
import sys

from conftest import REPO
from dino_jax import config_file, defaults


def test_from_saved_fills_missing_fields_from_the_package_defaults(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  saved = {'model': {'arch': 'vit_pico', 'patch_size': 8}, 'crops': {'global_scale': [0.3, 1.0]}}
  config = config_file.from_saved(saved)
  assert (config.model.arch, config.model.patch_size) == ('vit_pico', 8)  # saved values kept
  assert config.crops.global_scale == (0.3, 1.0)  # tuples stay tuples
  # fields the saved dict lacks come from the package defaults
  assert config.model.out_dim == defaults.get_config().model.out_dim == 65536
  assert config.crops.local_size == 96 and config.knn.k == 20
  assert config.model.remat == 'none' and config.watchdog.patience == 3


def test_defaults_are_the_vit_s16_recipe():
  recipe = config_file.load(REPO / 'configs' / 'vit_s16.py')
  assert recipe.to_dict() == defaults.get_config().to_dict()


def test_defaults_module_does_not_depend_on_configs():
  tree = ast.parse(pathlib.Path(defaults.__file__).read_text())
  imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert imported == {'ml_collections'}


def test_installed_copy_without_configs_still_has_the_defaults(tmp_path):
  """As from a wheel: the package files alone, run from a folder with no configs/."""
  pkg = tmp_path / 'site' / 'dino_jax'
  pkg.mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  for name in ('config_file.py', 'defaults.py'):
    shutil.copy(REPO / 'dino_jax' / name, pkg / name)
  code = ('from dino_jax import config_file\n'
          'c = config_file.from_saved({"model": {"arch": "vit_pico"}})\n'
          'print(c.model.arch, c.model.out_dim, c.crops.n_local, c.loss.prototype_chunk)\n'
          'print(config_file.__file__)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                       text=True, check=True, env={**os.environ, 'PYTHONPATH': str(tmp_path / 'site')})
  values, where = out.stdout.splitlines()
  assert values.split() == ['vit_pico', '65536', '8', '0']
  assert pathlib.Path(where).parent == pkg  # the copy, not the repository's package


def test_the_dino_crop_preset_is_the_defaults_own():
  crops = defaults.get_config().crops
  for field, value in defaults.CROP_PRESETS['dino'].items():
    assert crops[field] == value, field
  assert set(defaults.CROP_PRESETS['dinov2']) == set(defaults.CROP_PRESETS['dino'])
