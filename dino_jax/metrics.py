"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard, and the library log.

MetricWriter: one JSON line per logged step (and per event) in WORKDIR/metrics.jsonl, the same
scalars to TensorBoard; the progress lines on stdout are train.py's own prints.

The library log: under `python -m dino_jax.main`, INFO and DEBUG lines of the libraries (orbax's
checkpoint manager, JAX, grain: all through absl logging, whose handler sits on Python's root
logger) go to WORKDIR/log.txt instead of stderr, so the terminal shows the run's own lines;
warnings and errors still show on stderr (and are in the file too). absl's flags keep their
meaning: --alsologtostderr also shows every line on stderr, --logtostderr shows them only
there (no log file), --stderrthreshold=info|warning|error sets what shows, -v 1 adds DEBUG
lines. Lines logged before the workdir exists (it is created once the config is valid) are held
in memory and written first.
"""
from __future__ import annotations

import io
import json
import os
import tempfile

import jax
from absl import flags as absl_flags
from absl import logging as absl_logging
from etils import epath

from dino_jax import paths

_pending: io.StringIO | None = None  # library log lines held until the workdir exists


def quiet_library_logs() -> None:
  """Send absl-handled log lines to memory, then (start_log_file) to the workdir's log file,
  with only warnings and errors also on stderr. Call after absl parsed the flags (main.py);
  a no-op under --logtostderr."""
  global _pending
  flag_values = absl_flags.FLAGS
  if flag_values['logtostderr'].value:
    return
  if not flag_values['stderrthreshold'].present:
    flag_values.stderrthreshold = 'warning'
  _pending = io.StringIO()
  absl_logging.get_absl_handler().python_handler.setStream(_pending)


def log_path(workdir: str, process_index: int = 0) -> str:
  """WORKDIR/log.txt (process i > 0 of a multi-host run: log.<i>.txt). A bucket workdir cannot
  be appended to: its log goes to a local file, TMPDIR/dino_jax_logs/BUCKET/PATH/log.txt."""
  name = 'log.txt' if process_index == 0 else f'log.{process_index}.txt'
  if paths.is_remote(workdir):
    local = str(workdir).split('://', 1)[1].strip('/')
    return os.path.join(tempfile.gettempdir(), 'dino_jax_logs', local, name)
  return os.path.join(workdir, name)


def start_log_file(workdir: str) -> str | None:
  """From now on the held library log lines go to log_path(workdir) (appended: a resumed run
  continues the file). Returns the path, or None when quiet_library_logs was not called (a
  run started from Python keeps its logging as it was)."""
  global _pending
  if _pending is None:
    return None
  path = log_path(workdir, jax.process_index())
  os.makedirs(os.path.dirname(path), exist_ok=True)
  f = open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with  # open till exit
  handler = absl_logging.get_absl_handler().python_handler
  handler.acquire()
  try:
    f.write(_pending.getvalue())
    handler.setStream(f)
  finally:
    handler.release()
  _pending = None
  if paths.is_remote(workdir):
    print(f'dino_jax: library log lines go to {path} (a bucket cannot be appended to)',
          flush=True)
  return path


class MetricWriter:
  """metrics.jsonl + TensorBoard, written by process 0 only.

  Local workdirs append to metrics.jsonl; bucket workdirs (gs://...), whose objects cannot be
  appended to, rewrite it whole at each write (it stays small: one line per logged step).
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.remote = paths.is_remote(workdir)
    self.lines = []
    self.tb = None
    if self.active:
      if self.remote and self.path.exists():
        self.lines = self.path.read_text().splitlines(keepends=True)
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, values: dict) -> None:
    if not self.active:
      return
    self._append(json.dumps({'step': int(step), **{k: float(v) for k, v in values.items()}})
                 + '\n')
    for k, v in values.items():
      self.tb.add_scalar(k, float(v), int(step))
    self.tb.flush()

  def event(self, step: int, event: str, **fields: str) -> None:
    """One non-numeric line in metrics.jsonl, e.g. {"step": 300, "event": "collapse", ...}."""
    if not self.active:
      return
    self._append(json.dumps({'step': int(step), 'event': event, **fields}) + '\n')

  def resume_at(self, step: int) -> None:
    """Drop the lines past `step`: a killed run logged them after its last checkpoint, and the
    resumed run logs those steps again (a reader would see every resumed stretch twice).
    A line cut short by the kill is dropped too (the next line would be glued to it)."""
    if not self.active:
      return
    lines = self.lines if self.remote else (
        self.path.read_text().splitlines(keepends=True) if self.path.exists() else [])
    kept = [l for l in lines if _line_step(l) <= step]
    if len(kept) == len(lines):
      return
    if self.remote:
      self.lines = kept
      self.path.write_text(''.join(kept))
    else:
      tmp = self.path.parent / (self.path.name + '.tmp')
      tmp.write_text(''.join(kept))
      os.replace(tmp, self.path)

  def _append(self, line: str) -> None:
    if self.remote:
      self.lines.append(line)
      self.path.write_text(''.join(self.lines))
    else:
      with self.path.open('a') as f:
        f.write(line)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _line_step(line: str) -> int:
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return 2 ** 62  # not a whole JSON line: cut short by a kill
