"""The training loop: init or restore, step, log, checkpoint, evaluate. Nothing else."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from dino_jax import augment, checkpointing, data, distributed, models, optim, sharding
from dino_jax import state as state_lib
from dino_jax import train_step as train_step_lib
from dino_jax.evaluators import features as features_lib
from dino_jax.evaluators import knn
from dino_jax.schedules import Schedules
from dino_jax.validate import validate


class NonFiniteLossError(FloatingPointError):
  pass


class MetricWriter:
  """metrics.jsonl + TensorBoard + stdout, written by process 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, values: dict) -> None:
    if not self.active:
      return
    line = {'step': int(step), **{k: float(v) for k, v in values.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(line) + '\n')
    for k, v in values.items():
      self.tb.add_scalar(k, float(v), int(step))
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


@dataclasses.dataclass
class Run:
  """Everything built once from the config."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  train_source: data.sources.Source
  test_source: data.sources.Source | None
  schedules: Schedules
  student_def: nnx.GraphDef
  teacher_def: nnx.GraphDef
  init_fn: Callable
  state_shardings: object
  step_fn: Callable
  feature_fn: Callable  # (teacher params, canvas, hw) -> L2-normalised CLS, for k-NN


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Run:
  """Validate the config, then build data sources, model graphdefs, optimizer and step."""
  mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  validate(config, n_devices=mesh.devices.size)
  sharding.global_batch_check(config.batch_size, mesh)
  train_source, test_source = data.load(config.data.source)
  data.pipeline.check_size(len(train_source), config.batch_size)
  schedules = Schedules.from_config(config, data.steps_per_epoch(len(train_source),
                                                                 config.batch_size))
  dtype = jnp.dtype(config.dtype)
  student_def, abstract_params = nnx.split(nnx.eval_shape(lambda: models.build(config)))
  teacher_def, _ = nnx.split(nnx.eval_shape(lambda: models.build(config, teacher=True)))
  tx = optim.make(config, schedules, abstract_params.to_pure_dict())

  def init_fn():
    student = models.build(config, seed=config.seed)
    return state_lib.create(student, tx, config.model.out_dim,
                            jax.random.PRNGKey(config.seed + 1))

  state_shardings = sharding.tree_shardings(mesh, jax.eval_shape(init_fn),
                                            config.mesh.min_shard_size)
  step = train_step_lib.make(student_def, teacher_def, tx, schedules,
                             augment.AugmentConfig.from_config(config), dtype=dtype,
                             center_momentum=config.loss.center_momentum,
                             crop_sharding=sharding.batch_sharding(mesh))
  step_fn = train_step_lib.jit(step, state_shardings, sharding.batch_sharding(mesh),
                               sharding.replicated(mesh))
  feature_fn = features_lib.make_feature_fn(teacher_def, size=config.crops.global_size,
                                            crop_fraction=config.crops.eval_crop_fraction,
                                            dtype=dtype)
  return Run(config, mesh, train_source, test_source, schedules, student_def, teacher_def,
             init_fn, state_shardings, step_fn, feature_fn)


def init_state(run: Run):
  """A fresh TrainState, born sharded (never materialised whole on one host)."""
  return jax.jit(run.init_fn, out_shardings=run.state_shardings)()


def evaluate_knn(run: Run, state) -> dict[str, float] | None:
  """Teacher k-NN top-1/top-5 on the test split (None when the data has no labels)."""
  if run.test_source is None or not (run.train_source.has_labels and
                                     run.test_source.has_labels):
    return None
  c = run.config
  kw = dict(mesh=run.mesh, canvas_size=c.data.canvas_size, batch_size=c.knn.batch_size)
  train_f, train_y = features_lib.extract(run.feature_fn, state.teacher_params,
                                          run.train_source, limit=c.knn.max_train, **kw)
  test_f, test_y = features_lib.extract(run.feature_fn, state.teacher_params, run.test_source,
                                        **kw)
  res = knn.knn_classify(train_f, train_y, test_f, test_y, k=c.knn.k,
                         temperature=c.knn.temperature)
  return {'knn_top1': res['top1'], 'knn_top5': res['top5']}


def _check_finite(step: int, metrics: dict) -> None:
  loss = float(metrics['loss'])
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f'loss is {loss} at step {step}: stopping without saving; the last good checkpoint '
        f'is intact. Lower optim.lr, raise optim.warmup_epochs, use dtype=float32, or lower '
        f'loss.teacher_temp.')


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Train DINO as `config` says, writing logs and checkpoints to `workdir`. Returns the state."""
  run = build(config)
  os.makedirs(workdir, exist_ok=True)
  writer = MetricWriter(workdir)
  mngr = checkpointing.manager(workdir)
  abstract = checkpointing.abstract_with_shardings(jax.eval_shape(run.init_fn),
                                                   run.state_shardings)
  if checkpointing.latest_step(mngr) is not None:
    state, _ = checkpointing.restore(mngr, abstract)
    logging.info('resumed from %s at step %d', mngr.directory, int(state.step))
  else:
    state = init_state(run)
  total = run.schedules.total_steps
  start = int(state.step)
  print(f'dino_jax: {config.model.arch}/{config.model.patch_size} on {config.data.source}: '
        f'{len(run.train_source)} images, {run.schedules.steps_per_epoch} steps/epoch, '
        f'{total} steps, mesh {dict(run.mesh.shape)}', flush=True)

  def eval_and_log(step):
    res = evaluate_knn(run, state)
    if res is not None:
      writer.write(step, res)
      print(f'[{step}/{total}] k-NN (k={config.knn.k}) top-1 {res["knn_top1"]:.2f}% '
            f'top-5 {res["knn_top5"]:.2f}%', flush=True)
    return res

  try:
    if start == 0 and config.eval_every:
      eval_and_log(0)
    batches = data.train_iterator(
        run.train_source, canvas_size=config.data.canvas_size, global_batch=config.batch_size,
        seed=config.seed, start_step=start, worker_count=config.data.worker_count,
        prefetch=config.data.prefetch, process_index=jax.process_index(),
        process_count=jax.process_count())
    t_start = t_last = time.time()
    last_logged = start
    metrics = None
    step_fn = run.step_fn
    for step in range(start, total):
      batch = sharding.to_global(next(batches), run.mesh)
      if step == start:  # multi-host: every process compiled before any runs the step
        step_fn = distributed.compile_on_all(run.step_fn, state, batch)
      state, metrics = step_fn(state, batch)
      done = step + 1
      if done % config.log_every == 0 or done == total:
        m = jax.device_get(metrics)
        _check_finite(done, m)
        now = time.time()
        m['img_per_s'] = (done - last_logged) * config.batch_size / max(now - t_last, 1e-9)
        m['epoch'] = done / run.schedules.steps_per_epoch
        writer.write(done, m)
        eta = (now - t_start) / (done - start) * (total - done)
        print(f'[{done}/{total}] loss {m["loss"]:.4f} lr {m["lr"]:.2e} '
              f'T_t {m["teacher_temp"]:.3f} m {m["momentum"]:.4f} H_t {m["teacher_entropy"]:.3f} '
              f'{m["img_per_s"]:.1f} img/s ETA {_fmt_time(eta)}', flush=True)
        t_last, last_logged = now, done
      if done % config.checkpoint_every == 0 and done != total:
        _check_finite(done, jax.device_get(metrics))
        checkpointing.save(mngr, done, state, config)
      if config.eval_every and done % config.eval_every == 0 and done != total:
        eval_and_log(done)
    if metrics is not None:
      _check_finite(total, jax.device_get(metrics))
    eval_and_log(total)
    if checkpointing.latest_step(mngr) != int(state.step):
      checkpointing.save(mngr, int(state.step), state, config)
  finally:  # a pending (good) save completes even when the run stops on an error
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return state
