"""A training run's terminal shows its own lines; library INFO/DEBUG log lines (orbax, JAX,
absl) go to WORKDIR/log.txt; warnings and errors still reach stderr; absl's flags
(--alsologtostderr, --logtostderr, -v) keep their meaning."""
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import CACHE, REPO
from dino_jax import metrics

# What the terminal may show: our own lines, absl/C++ warnings and errors (W/E/F + date) and
# Python warnings (the "...Warning: ..." line and the source line it quotes, indented).
OURS = ('dino_jax:', '[', 'warning:', 'error:')
ABSL_INFO = re.compile(r'^[ID]\d{4} \d\d:\d\d:\d\d')
ABSL_WARNING = re.compile(r'^[WEF]\d{4} \d\d:\d\d:\d\d')
PY_WARNING = re.compile(r'\w*Warning: ')


def unexpected_lines(text: str) -> list[str]:
  bad, after_warning = [], False
  for line in text.splitlines():
    if not line.strip():
      continue
    if line.startswith(OURS) or ABSL_WARNING.match(line) or PY_WARNING.search(line):
      after_warning = bool(PY_WARNING.search(line))
      continue
    if after_warning and line.startswith(' '):  # the source line a Python warning quotes
      continue
    bad.append(line)
  return bad


def test_unexpected_lines_filter():
  assert unexpected_lines(
      'dino_jax: a run\n[1/2] loss 1\nW1202 08:07:33.22 1 f.py:1] slow save\n'
      '/x.py:3: UserWarning: careful\n  warnings.warn("careful")\nwarning: left out 1 file\n'
  ) == []
  assert unexpected_lines('I1202 08:06:24.05 1 checkpoint_manager.py:701] init\nfoo\n') == [
      'I1202 08:06:24.05 1 checkpoint_manager.py:701] init', 'foo']


SCRIPT = '''
import logging as pylogging
from absl import app, logging
from dino_jax import metrics

def main(argv):
  metrics.quiet_library_logs()
  logging.info('info before the workdir exists')
  logging.warning('a warning')
  pylogging.getLogger('jax._src.xla_bridge').info('python logging info')
  print('dino_jax: our own line', flush=True)
  metrics.start_log_file(argv[1])
  logging.info('info after the workdir exists')
  logging.debug('a debug line')

app.run(main)
'''


@pytest.mark.parametrize('flags,on_stderr,in_file', [
    ([], ['a warning'], ['info before', 'a warning', 'python logging info', 'info after']),
    (['--alsologtostderr'], ['info before', 'a warning', 'python logging info', 'info after'],
     ['info before', 'a warning', 'python logging info', 'info after']),
    (['--logtostderr'], ['info before', 'a warning', 'python logging info', 'info after'], None),
    (['-v', '1'], ['a warning'],
     ['info before', 'a warning', 'python logging info', 'info after', 'a debug line']),
])
def test_library_lines_go_to_the_log_file_and_warnings_to_stderr(tmp_path, flags, on_stderr,
                                                                 in_file):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  proc = subprocess.run([sys.executable, '-c', SCRIPT, *flags, str(workdir)], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == 'dino_jax: our own line\n'
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  shown = [m for m in ('info before', 'a warning', 'python logging info', 'info after',
                       'a debug line') if any(m in l for l in err)]
  assert shown == on_stderr, proc.stderr
  if in_file is None:
    assert not (workdir / 'log.txt').exists()
    return
  lines = (workdir / 'log.txt').read_text().splitlines()
  logged = [m for m in ('info before', 'a warning', 'python logging info', 'info after',
                        'a debug line') if any(m in l for l in lines)]
  assert logged == in_file  # in order: the lines held before the workdir existed come first
  assert all(ABSL_INFO.match(l) or ABSL_WARNING.match(l) for l in lines), lines


def test_a_training_run_shows_only_its_own_lines(tmp_path, digits_npz):
  """The CLI on a tiny 2-step run (unlabelled data: no k-NN to compile) that saves a
  checkpoint: orbax's INFO lines end up in WORKDIR/log.txt, none on the terminal."""
  npz = tmp_path / 'unlabelled.npz'
  with np.load(digits_npz) as f:
    np.savez(npz, x_train=f['x_train'][:32])
  cfg = tmp_path / 'config.py'
  overrides = {'data.source': f'npz:{npz}', 'epochs': 1, 'data.epoch_length': 2}
  cfg.write_text(f'import sys\nsys.path.insert(0, {str(REPO / "tests")!r})\n'
                 f'from conftest import tiny_config\n'
                 f'def get_config():\n  return tiny_config(**{overrides!r})\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(CACHE),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
      [sys.executable, '-m', 'dino_jax.main', f'--config={cfg}', f'--workdir={tmp_path}/w'],
      cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '[2/2] loss' in proc.stdout and 'dino_jax: vit_pico/4 on npz:' in proc.stdout
  assert unexpected_lines(proc.stdout) == [], proc.stdout
  assert unexpected_lines(proc.stderr) == [], proc.stderr[-3000:]
  log = (tmp_path / 'w' / 'log.txt').read_text()
  info = [l for l in log.splitlines() if ABSL_INFO.match(l)]
  assert any('checkpoint_manager.py' in l for l in info), log[-3000:]  # orbax's lines
  assert any('Saving checkpoint at step 2' in l for l in info), log[-3000:]


def test_log_file_paths(tmp_path):
  assert metrics.log_path('/runs/a') == '/runs/a/log.txt'
  assert metrics.log_path('/runs/a', process_index=3) == '/runs/a/log.3.txt'  # multi-host
  # a bucket cannot be appended to: a local file named after the URL
  assert metrics.log_path('gs://bucket/runs/a') == os.path.join(
      tempfile.gettempdir(), 'dino_jax_logs', 'bucket', 'runs', 'a', 'log.txt')
  # train_and_evaluate called from Python (not the CLI) leaves logging alone: no file
  assert metrics.start_log_file(str(tmp_path)) is None
  assert not (tmp_path / 'log.txt').exists()
