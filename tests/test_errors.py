"""One base class for the errors a user sees as one line: every `class ...Error` of the package
is a DinoJaxError and keeps its built-in base; main.py, evaluate.py and bench.py catch the base
once, so a new error class needs no new except clause."""
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from dino_jax import checkpointing, convert, data, distributed, evaluate, plot, train, watchdog
from dino_jax import weights
from dino_jax.errors import DinoJaxError
from dino_jax.validate import ConfigError


@pytest.mark.parametrize('cls,builtin', [
    (ConfigError, ValueError), (data.DataError, ValueError),
    (distributed.DistributedConfigError, ValueError), (train.DivergenceError, FloatingPointError),
    (checkpointing.CheckpointMismatchError, ValueError),
    (checkpointing.DamagedCheckpointError, OSError), (watchdog.CollapseError, RuntimeError),
    (weights.ModelFileError, ValueError), (convert.CheckpointError, ValueError),
    (convert.UnsafeCheckpointError, ValueError), (plot.PlotError, ValueError),
])
def test_user_errors_share_the_base_and_keep_their_builtin(cls, builtin):
  assert issubclass(cls, DinoJaxError) and issubclass(cls, builtin)
  with pytest.raises(builtin):  # older `except ValueError` clauses still catch it
    raise cls('one line')


def test_every_error_class_in_the_package_is_a_dino_jax_error():
  """Found by reading the sources, so an error class added later is checked too."""
  found = []
  for root, _, files in os.walk(REPO / 'dino_jax'):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(root, name)
      module = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
      with open(path) as f:
        for cls in re.findall(r'^class (\w+Error)\(', f.read(), re.M):
          found.append((module, cls))
  assert len(found) >= 11, found
  for module, cls in found:
    assert issubclass(getattr(importlib.import_module(module), cls), DinoJaxError), (module, cls)


MAIN_WITH = '''
import sys
from absl import app
from dino_jax import errors, main, train

class NewError(errors.DinoJaxError):
  pass

def fail(config, workdir):
  raise NewError('something the user can fix, in one line')

train.train_and_evaluate = fail
sys.argv = ['dino_jax.main', '--config=configs/cpu.py', '--workdir=' + sys.argv[1]]
app.run(main.main, flags_parser=main.parse_flags)
'''


def test_main_reports_any_dino_jax_error_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, '-c', MAIN_WITH, str(tmp_path / 'w')], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == 'error: something the user can fix, in one line'


def test_evaluate_reports_any_dino_jax_error_in_one_line(monkeypatch, capsys):
  def fail(args):
    raise checkpointing.DamagedCheckpointError('checkpoint 8 is damaged: checksum mismatch')
  monkeypatch.setitem(evaluate.COMMANDS, 'knn', fail)
  with pytest.raises(SystemExit) as e:
    evaluate.main(['knn', '--model=run', '--source=digits'])
  assert e.value.code == 1
  assert capsys.readouterr().err == 'error: checkpoint 8 is damaged: checksum mismatch\n'
