"""The collapse watchdog: its bands and patience, a run forced to collapse, a healthy run."""
import json
import math

import pytest

from conftest import tiny_config
from dino_jax import train, watchdog
from dino_jax.validate import ConfigError, validate


def events(workdir, name):
  with open(f'{workdir}/metrics.jsonl') as f:
    return [l for l in map(json.loads, f) if l.get('event') == name]


def test_bands_patience_and_one_warning_per_episode():
  top = math.log(64)
  w = watchdog.Watchdog(out_dim=64, margin=0.05, low_margin=0.05, patience=3, start_step=10)
  assert w.symptom(0.96 * top) == 'uniform'
  assert w.symptom(0.94 * top) is None
  assert w.symptom(0.04 * top) == 'one-prototype'
  assert w.symptom(0.06 * top) is None
  assert w.symptom(float('nan')) is None
  # before start_step nothing counts, even deep inside a band
  assert [w.update(s, top) for s in (2, 4, 6, 8)] == [None] * 4
  out = [w.update(s, top) for s in (10, 12, 14, 16, 18)]
  assert out[:2] == [None, None] and out[3:] == [None, None]  # fires once, at the 3rd
  assert out[2].startswith('collapse watchdog: uniform collapse: teacher entropy 4.159 stayed '
                           'above 95% of ln(out_dim) = 4.159 for 3 log intervals (steps 10-14)')
  assert 'koleo_weight' in out[2] and 'freeze_last_layer' in out[2] and '\n' not in out[2]
  # leaving the band re-arms it; an interruption restarts the count
  assert w.update(20, 2.0) is None
  assert [w.update(s, top) for s in (22, 24)] == [None, None]
  assert w.update(26, 2.0) is None
  assert [w.update(s, 0.0) for s in (28, 30)] == [None, None]
  msg = w.update(32, 0.0)
  assert msg.startswith('collapse watchdog: one-prototype collapse: teacher entropy 0.000 '
                        'stayed below 5% of ln(out_dim)')
  assert 'steps 28-32' in msg


@pytest.mark.parametrize('field,value', [('watchdog.margin', 0.0), ('watchdog.margin', 0.6),
                                         ('watchdog.low_margin', -0.1), ('watchdog.patience', 0)])
def test_bad_watchdog_settings_are_one_line_errors(field, value):
  with pytest.raises(ConfigError, match=f'^config.{field}: must be'):
    validate(tiny_config(**{field: value}), n_devices=8)


def test_fires_on_a_forced_uniform_collapse_and_the_run_goes_on(tmp_path, digits_npz, capsys):
  """A teacher temperature of 10 flattens every target: H_t sits at ln(out_dim)."""
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', 'loss.teacher_temp': 10.0,
                          'loss.warmup_teacher_temp': 10.0, 'watchdog.patience': 2})
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 8  # warned, did not stop
  warned = events(tmp_path, 'collapse_warning')
  assert len(warned) == 1
  assert warned[0]['symptom'] == 'uniform'
  assert warned[0]['step'] == 5  # judged from the end of warmup (step 4): 4, 5
  out = capsys.readouterr().out
  assert out.count('WARNING: collapse watchdog: uniform collapse') == 1

  from dino_jax import plot  # pylint: disable=import-outside-toplevel
  png = plot.plot(str(tmp_path))
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_stop_raises_and_keeps_checkpoints(tmp_path, digits_npz):
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', 'loss.teacher_temp': 10.0,
                          'loss.warmup_teacher_temp': 10.0, 'watchdog.patience': 2,
                          'watchdog.stop': True, 'checkpoint_every': 2})
  with pytest.raises(watchdog.CollapseError, match='stopped .config.watchdog.stop.'):
    train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / 'checkpoints' / '4').is_dir()  # saved before the warning, kept
  assert len(events(tmp_path, 'collapse_warning')) == 1


def test_silent_on_a_healthy_run(tmp_path, digits_npz, capsys):
  config = tiny_config(**{'data.source': f'npz:{digits_npz}', 'watchdog.patience': 1})
  train.train_and_evaluate(config, str(tmp_path))
  with open(f'{tmp_path}/metrics.jsonl') as f:
    h = [l['teacher_entropy'] for l in map(json.loads, f) if 'teacher_entropy' in l]
  top = math.log(config.model.out_dim)
  assert all(0.02 * top < x < 0.9 * top for x in h[4:]), h  # the premise: a healthy band
  assert not events(tmp_path, 'collapse_warning')
  assert 'collapse watchdog' not in capsys.readouterr().out
