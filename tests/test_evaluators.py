"""Evaluators by name: the registry, config.evals checked before anything runs, the training
loop's evaluate running what config.evals names, the CLI's commands from the same table."""
import sys
import types

import numpy as np
import pytest

from conftest import tiny_config
from dino_jax import config_file, evaluate, evaluators, train
from dino_jax.validate import ConfigError, validate


def test_every_registered_evaluator_has_a_cli_command_and_loop_ones_an_entry_point():
  assert set(evaluate.COMMANDS) == set(evaluators.names()) == {'knn', 'linear', 'attention',
                                                                'video'}
  assert evaluators.loop_names() == ('knn',)
  for name in evaluators.loop_names():
    mod = evaluators.module(name)
    assert callable(mod.evaluate) and callable(mod.describe)


def test_unknown_evaluator_in_config_evals_is_one_line_naming_the_choices():
  config = tiny_config(evals=('knn', 'foo'))
  with pytest.raises(ConfigError) as e:
    validate(config)
  assert str(e.value) == "unknown evaluator 'foo' in config.evals; choose from knn"
  with pytest.raises(ConfigError, match="unknown evaluator 'video' in config.evals"):
    validate(tiny_config(evals=('video',)))  # known to the CLI, but not a loop evaluator
  validate(tiny_config(evals=()))  # no evaluation at all is allowed
  validate(tiny_config())


def test_saved_config_without_evals_gets_the_default():
  config = config_file.from_saved({'model': {'arch': 'vit_pico'}})
  assert config.evals == ('knn',)
  assert config_file.from_saved({'evals': ['knn']}).evals == ('knn',)  # JSON list -> tuple


def test_loop_evaluate_runs_each_configured_evaluator(monkeypatch):
  calls = []
  fake = types.ModuleType('fake_evaluator')
  fake.evaluate = lambda inputs: calls.append(inputs) or {'fake_score': 1.5}
  fake.describe = lambda metrics, config: f'fake {metrics["fake_score"]}'
  none = types.ModuleType('none_evaluator')
  none.evaluate = lambda inputs: None  # the data does not allow it: left out
  monkeypatch.setitem(sys.modules, 'fake_evaluator', fake)
  monkeypatch.setitem(sys.modules, 'none_evaluator', none)
  monkeypatch.setitem(evaluators.EVALUATORS, 'fake', ('fake_evaluator', True))
  monkeypatch.setitem(evaluators.EVALUATORS, 'none', ('none_evaluator', True))
  config = tiny_config(evals=('none', 'fake'))
  run = types.SimpleNamespace(config=config, feature_fn='f', train_source='tr',
                              test_source='te', mesh='m')
  state = types.SimpleNamespace(teacher_params='p')
  assert train.evaluate(run, state) == {'fake': {'fake_score': 1.5}}
  (inputs,) = calls
  assert (inputs.feature_fn, inputs.params, inputs.train_source, inputs.test_source,
          inputs.mesh) == ('f', 'p', 'tr', 'te', 'm')
  assert inputs.config is config
  run.config = tiny_config(evals=())
  assert train.evaluate(run, state) == {}


def test_knn_loop_evaluator_needs_a_labelled_test_split():
  from dino_jax import data  # pylint: disable=import-outside-toplevel
  labelled = data.ArraySource(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
  unlabelled = data.ArraySource(np.zeros((4, 8, 8, 3), np.uint8))
  config = tiny_config()
  for train_source, test_source in ((labelled, None), (labelled, unlabelled),
                                    (unlabelled, labelled)):
    inputs = evaluators.LoopInputs(None, None, train_source, test_source, config, None)
    assert evaluators.run_in_loop('knn', inputs) is None
