"""The DINOv3 recipes (configs/dinov3_*.py): they load and validate, the ViT-L/16 recipe builds
the official architecture (counted abstractly, nothing materialised), and the CPU recipe,
shrunk, trains two steps to a finite loss."""
import math

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from dino_jax import config_file, train
from dino_jax.models import dino, vit
from dino_jax.validate import validate

CONFIGS = ('dinov3_vitl16.py', 'dinov3_cpu.py', 'dinov3_gram.py', 'dinov3_highres.py')


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_validates(name, tmp_path):
  config = config_file.load(REPO / 'configs' / name)
  if name in ('dinov3_gram.py', 'dinov3_highres.py'):  # later phases need a workdir: any dir
    config.init_from = str(tmp_path)
  validate(config, n_devices=8 if config.batch_size % 8 == 0 else 1)


def test_highres_recipe_has_the_official_size_sets():
  from dino_jax import resolution  # pylint: disable=import-outside-toplevel
  config = config_file.load(REPO / 'configs' / 'dinov3_highres.py')
  sets = resolution.size_sets(config)
  assert [(s.global_size, s.local_size, s.gram_teacher_size) for s in sets] == [
      (512, 112, 768), (768, 112, 1152), (768, 160, 1152), (768, 224, 1152), (768, 336, 1152)]
  np.testing.assert_allclose(resolution.ratios(config), [0.3, 0.3, 0.3, 0.05, 0.05])
  # each set's config is the recipe at that set's sizes, and validates
  for s in sets:
    derived = resolution.set_config(config, s)
    assert (derived.crops.global_size, derived.crops.local_size) == (s.global_size, s.local_size)
    derived.init_from = '/'
    validate(derived, n_devices=8)
  assert (config.gram.rep_update, config.gram.weight, config.loss.dino_local_weight) == (
      False, 1.5, 0.5)


def test_vitl16_recipe_builds_the_official_backbone():
  config = config_file.load(REPO / 'configs' / 'dinov3_vitl16.py')
  assert (config.model.pos_embed, config.model.patch_size) == ('rope', 16)
  cfg = dino.vit_config(config)
  assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio) == (1024, 24, 16, 4.0)
  abstract = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  # ViT-L/16 (timm's vit_large_patch16_224 backbone: 303,301,632 with its 197 x 1024 learned
  # pos-embed), with RoPE (no pos-embed), a mask token and LayerScale on both branches
  assert n == 303_301_632 - 197 * 1024 + 1024 + 2 * 24 * 1024 == 303_150_080


def test_cpu_recipe_trains_two_steps(tmp_path, digits_npz):
  config = config_file.load(REPO / 'configs' / 'dinov3_cpu.py')
  config = config_file.override(config, {
      'data.source': f'npz:{digits_npz}', 'batch_size': 32, 'epochs': 1,
      'model.out_dim': 64, 'model.head_hidden_dim': 32, 'model.head_bottleneck_dim': 16,
      'crops.n_local': 2, 'log_every': 1, 'eval_every': 0, 'checkpoint_every': 1000,
      # as tests/conftest.py's tiny config: 16 px crops with patch 4 compile in seconds
      'data.canvas_size': 16, 'model.patch_size': 4, 'crops.global_size': 16,
      'crops.local_size': 8,
      'gram.update_every': 1, 'knn.batch_size': 64})
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2  # 64 images / batch 32
  lines = [l for l in (tmp_path / 'metrics.jsonl').read_text().splitlines() if '"loss"' in l]
  import json  # pylint: disable=import-outside-toplevel
  losses = [json.loads(l)['loss'] for l in lines]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
