"""The training loop: init or restore, step, log, checkpoint, evaluate (the evaluators
config.evals names, and the attention log). Nothing else."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dino_jax import attention_log, augment, checkpointing, data, distill, distributed, evaluators
from dino_jax import models
from dino_jax import objective, optim, paths, resolution, sharding, weights
from dino_jax import state as state_lib
from dino_jax import watchdog as watchdog_lib
from dino_jax import train_step as train_step_lib
from dino_jax.errors import DinoJaxError
from dino_jax.evaluators import features as features_lib
from dino_jax.metrics import MetricWriter, start_log_file
from dino_jax.schedules import Schedules
from dino_jax.validate import validate


class DivergenceError(DinoJaxError, FloatingPointError):
  """The run diverged: a loss, gradient or parameter norm is not finite, or the student's
  parameters grew past config.max_param_growth times their norm where the run started."""


@dataclasses.dataclass
class Run:
  """Everything built once from the config."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  train_source: data.Source
  test_source: data.Source | None
  schedules: Schedules
  student_def: nnx.GraphDef
  teacher_def: nnx.GraphDef
  init_fn: Callable
  state_shardings: object
  step_fns: tuple[Callable, ...]  # one compiled step per crop-size set (resolution.py)
  size_set_at: Callable[[int], int]  # step -> the index of its set in step_fns
  feature_fn: Callable  # (teacher params, canvas, hw) -> L2-normalised CLS, for evaluators
  norms_fn: Callable  # state -> {param_norm, teacher_param_norm}, at the steps that read them

  @property
  def step_fn(self) -> Callable:
    """The step of the first (without crops.size_sets: the only) crop-size set."""
    return self.step_fns[0]

  def step_for(self, step: int) -> Callable:
    """The compiled step that update number `step` runs."""
    return self.step_fns[self.size_set_at(step)]


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Run:
  """Validate the config, then build data sources, model graphdefs, optimizer and step."""
  validate(config, n_devices=mesh.devices.size if mesh is not None else jax.device_count())
  mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.global_batch_check(config.batch_size, mesh)
  train_source, test_source = data.load(config.data.source)
  data.check_source(train_source, config.batch_size, config.data.canvas_size)
  schedules = Schedules.from_config(
      config, config.data.epoch_length or data.steps_per_epoch(len(train_source),
                                                               config.batch_size))
  dtype = jnp.dtype(config.dtype)
  student_def, abstract_params = nnx.split(nnx.eval_shape(lambda: models.build(config)))
  teacher_def, _ = nnx.split(nnx.eval_shape(lambda: models.build(config, teacher=True)))
  tx = optim.make(config, schedules, abstract_params.to_pure_dict())
  loss = objective.Objective.from_config(config)  # its gram_teacher is the same in every set
  distill_def = distill_abstract = None
  if config.distill.teacher:  # its architecture from the run config saved with it
    distill_def, distill_abstract = weights.network(
        distill.teacher_config(config.distill.teacher)[0], dtype)

  def init_fn():
    student = models.build(config, seed=config.seed)
    return state_lib.create(student, tx, config.model.out_dim,
                            jax.random.PRNGKey(config.seed + 1), models.patch_out_dim(config),
                            gram_teacher=loss.gram_teacher,
                            distill_params=(distill.placeholder(distill_abstract)
                                            if distill_def is not None else None))

  state_shardings = sharding.tree_shardings(mesh, jax.eval_shape(init_fn),
                                            config.mesh.min_shard_size)
  def compiled_step(set_config):  # crop sizes, iBOT mask grid, Gram teacher size of one set
    step = train_step_lib.make(student_def, teacher_def, tx, schedules,
                               augment.AugmentConfig.from_config(set_config), dtype=dtype,
                               loss=objective.Objective.from_config(set_config),
                               crop_sharding=sharding.batch_sharding(mesh),
                               distill_def=distill_def)
    return train_step_lib.jit(step, state_shardings, sharding.batch_sharding(mesh),
                              sharding.replicated(mesh))

  step_fns = tuple(compiled_step(resolution.set_config(config, s))
                   for s in resolution.size_sets(config))
  feature_fn = features_lib.make_feature_fn(teacher_def, size=config.crops.global_size,
                                            crop_fraction=config.crops.eval_crop_fraction,
                                            dtype=dtype)
  norms_fn = jax.jit(train_step_lib.param_norms, out_shardings=sharding.replicated(mesh))
  return Run(config, mesh, train_source, test_source, schedules, student_def, teacher_def,
             init_fn, state_shardings, step_fns, resolution.Sampler.from_config(config),
             feature_fn, norms_fn)


def init_state(run: Run):
  """A fresh TrainState, born sharded (never materialised whole on one host)."""
  return jax.jit(run.init_fn, out_shardings=run.state_shardings)()


def evaluate(run: Run, state) -> dict[str, dict[str, float]]:
  """{name: metrics} of every evaluator config.evals names, on the teacher (an evaluator the
  data does not allow, e.g. k-NN without a labelled test split, is left out)."""
  inputs = evaluators.LoopInputs(run.feature_fn, state.teacher_params, run.train_source,
                                 run.test_source, run.config, run.mesh)
  results = {}
  for name in run.config.evals:
    res = evaluators.run_in_loop(name, inputs)
    if res is not None:
      results[name] = res
  return results


_LEVERS = ('Lower optim.lr, raise optim.warmup_epochs, use dtype=float32, or lower '
           'loss.teacher_temp.')


def check_sane(step: int, metrics: dict, reference_norm: float, max_growth: float) -> None:
  """Raise DivergenceError unless the step's loss, gradient norm and parameter norms are finite
  and the student's parameter norm is within max_growth x reference_norm (its norm where the
  run started). Runs before every save, so a saved checkpoint is always one a run can go on
  from."""
  for key in ('loss', 'grad_norm', 'param_norm', 'teacher_param_norm'):
    value = float(metrics[key])
    if not math.isfinite(value):
      raise DivergenceError(f'{key} is {value} at step {step}: stopping without saving; the '
                            f'last good checkpoint is intact. {_LEVERS}')
  norm = float(metrics['param_norm'])
  if norm > max_growth * reference_norm:
    raise DivergenceError(
        f'the student parameter norm is {norm:.3g} at step {step}, {norm / reference_norm:.3g}x '
        f'its {reference_norm:.3g} where this run started (config.max_param_growth='
        f'{max_growth:g}): the run is diverging; stopping without saving; the last good '
        f'checkpoint is intact. {_LEVERS}')


def time_up(limit_minutes: float, t_begin: float) -> bool:
  """Whether `limit_minutes` (0: none) of wall time have passed since `t_begin`, by process
  0's clock, so that every process of a multi-host run stops at the same step."""
  if not limit_minutes:
    return False
  up = time.time() - t_begin >= 60 * limit_minutes
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    up = bool(multihost_utils.broadcast_one_to_all(jnp.asarray(up)))
  return up


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def data_state(run: Run, batches) -> dict:
  """The input iterator's state plus what it was built from (checked when resuming)."""
  return {**batches.get_state(), 'seed': run.config.seed,
          'num_records': len(run.train_source), 'global_batch': run.config.batch_size}


def _start_state(run: Run, workdir: str, mngr):
  """Resume order: the workdir's own newest readable checkpoint, then config.init_from, then
  a fresh state. Returns (state, the saved data-iterator state or None, manager)."""
  config = run.config
  abstract = checkpointing.abstract_with_shardings(jax.eval_shape(run.init_fn),
                                                   run.state_shardings)
  restored, mngr = checkpointing.restore_latest(workdir, mngr, abstract, config)
  if restored is not None:
    if restored.data.get('num_records') != len(run.train_source):
      raise checkpointing.CheckpointMismatchError(
          f'{workdir} was trained on {restored.data.get("num_records")} images of '
          f'{config.data.source}, which now has {len(run.train_source)}: the data order cannot '
          f'resume. Use a new --workdir.')
    print(f'dino_jax: resumed from {mngr.directory}/{restored.step}', flush=True)
    return restored.state, restored.data, mngr
  state = init_state(run)
  if config.init_from.endswith('.safetensors'):
    state = _init_from_converted(state, config.init_from)
  elif config.init_from:
    params = {}
    for which, key in (('student', 'params'), ('teacher', 'teacher_params')):
      params[key], step = checkpointing.restore_params(
          config.init_from, checkpointing.abstract_with_shardings(getattr(state, key)),
          which=which)
    state = state.replace(**params)
    print(f'dino_jax: initialised student and teacher from {config.init_from} (step {step})',
          flush=True)
  if isinstance(state, state_lib.GramTrainState):
    state = _init_gram_teacher(state, config.gram.init_from)
  if isinstance(state, state_lib.DistillTrainState):
    params, where = distill.load(config.distill.teacher, state.distill_params)
    state = state.replace(distill_params=params)
    print(f'dino_jax: distilling from the frozen teacher {where}', flush=True)
  return state, None, mngr


def _init_gram_teacher(state, path: str):
  """DINOv3's Gram teacher of a fresh run: the teacher backbone of `path` (config.gram.init_from:
  a workdir, WORKDIR/checkpoints/<step>, or a model file of dino_jax/weights.py, e.g. a
  .safetensors from `python -m dino_jax.convert import`), or else a copy of the EMA teacher
  this run starts from."""
  if not path:
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                   out_shardings=jax.tree.map(lambda x: x.sharding, state.gram_params))
    return state.replace(gram_params=copy(state.teacher_params['backbone']))
  if path.endswith('.safetensors'):
    gram = checkpointing.put_fitting(
        weights.read_file(path).backbone, state.gram_params,
        f'config.gram.init_from: the backbone in {path} (set model.* to match)')
    where = path
  else:
    parts, step = checkpointing.restore_parts(
        path, {'teacher_params': {'backbone': checkpointing.abstract_with_shardings(
            state.gram_params)}})
    gram = parts['teacher_params']['backbone']
    where = f'{path} (step {step})'
  print(f'dino_jax: Gram teacher from {where}', flush=True)
  return state.replace(gram_params=gram)


def _init_from_converted(state, path: str):
  """Student and teacher start from official weights converted by `python -m dino_jax.convert
  import` or another model file (dino_jax/weights.py: the backbone, and the head and center
  when the file has them and they fit)."""
  c = weights.read_file(path)
  parts = {'backbone': c.backbone}
  if c.head is not None:
    parts['head'] = c.head
  def put(current, new, name):
    return checkpointing.put_fitting(new, current, f'config.init_from: the {name} in {path} '
                                     f'(convert shows the architecture it read; set model.* to '
                                     f'match)')
  student, teacher = dict(state.params), dict(state.teacher_params)
  for name, new in parts.items():
    student[name] = put(state.params[name], new, name)
    teacher[name] = put(state.teacher_params[name], new, name)
  state = state.replace(params=student, teacher_params=teacher)
  if c.center is not None and c.center.shape == state.center.shape:
    state = state.replace(center=jax.device_put(c.center, state.center.sharding))
  print(f'dino_jax: initialised student and teacher ({", ".join(parts)}) from {path}',
        flush=True)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Train DINO as `config` says, writing logs and checkpoints to `workdir`. Returns the state.

  Once steps run, SIGTERM (a preempted TPU VM) saves a checkpoint at the next step boundary
  and returns; before that, the caller's SIGTERM handling applies (main.py: stop at once).
  """
  t_begin = time.time()  # config.time_limit_minutes counts from here
  writer = mngr = preemption = None
  try:
    run = build(config)
    paths.makedirs(workdir)
    start_log_file(workdir)  # main.py's library log, from the moment the workdir exists
    writer = MetricWriter(workdir)
    mngr = checkpointing.manager(workdir, keep=config.keep_checkpoints,
                                 keep_every=config.keep_checkpoint_every)
    state, saved_data, mngr = _start_state(run, workdir, mngr)
    total = run.schedules.total_steps
    start = int(state.step)
    writer.resume_at(start)
    print(f'dino_jax: {config.model.arch}/{config.model.patch_size} on {config.data.source}: '
          f'{len(run.train_source)} images, {run.schedules.steps_per_epoch} steps/epoch, '
          f'{total} steps, mesh {dict(run.mesh.shape)}', flush=True)

    writer.event(start, 'start', out_dim=config.model.out_dim,
                 total_steps=total)  # marks resumes; plot reads ln(out_dim) from it
    log_attention = attention_log.tensorboard_logger(run, writer)

    def eval_and_log(step):
      if log_attention is not None:
        log_attention(state.teacher_params, step)
      for name, res in evaluate(run, state).items():
        writer.write(step, res)
        print(f'[{step}/{total}] {evaluators.module(name).describe(res, config)}', flush=True)

    def save(step):
      checkpointing.save(mngr, step, state, config, data_state(run, batches))

    if start == 0 and config.eval_every:
      eval_and_log(0)
    batches = data.train_iterator(
        run.train_source, canvas_size=config.data.canvas_size, global_batch=config.batch_size,
        seed=config.seed, start_step=saved_data['next_step'] if saved_data else start,
        worker_count=config.data.worker_count,
        prefetch=config.data.prefetch, process_index=jax.process_index(),
        process_count=jax.process_count())
    watch = watchdog_lib.Watchdog.from_config(config, run.schedules.warmup_steps)
    t_start = t_last = time.time()
    last_logged = start
    metrics = None
    # the student's parameter norm where this run starts (init or the restored checkpoint)
    reference_norm = float(jax.jit(optax.global_norm)(state.params))
    step_fns = list(run.step_fns)
    preemption = checkpointing.PreemptionWatch()  # from here SIGTERM saves at a step boundary

    checked = -1  # the last step whose metrics passed check_sane

    def fetch():  # the step's metrics and the parameter norms of the state it produced
      return train_step_lib.with_norms(jax.device_get(metrics),
                                       jax.device_get(run.norms_fn(state)))

    def check(step, fetched=None):
      nonlocal checked
      if step != checked:
        check_sane(step, fetch() if fetched is None else fetched, reference_norm,
                   config.max_param_growth)
        checked = step

    for step in range(start, total):
      batch = sharding.to_global(next(batches), run.mesh)
      if step == start:  # multi-host: every process compiled every step before any runs one
        step_fns = distributed.compile_on_all(run.step_fns, state, batch)
      state, metrics = step_fns[run.size_set_at(step)](state, batch)
      done = step + 1
      if done % config.log_every == 0 or done == total:
        m = fetch()
        check(done, m)
        now = time.time()
        m['img_per_s'] = (done - last_logged) * config.batch_size / max(now - t_last, 1e-9)
        m['epoch'] = done / run.schedules.steps_per_epoch
        m['data_skipped'] = batches.take_skipped()  # unreadable images since the last log
        writer.write(done, m)
        eta = (now - t_start) / (done - start) * (total - done)
        print(f'[{done}/{total}] loss {m["loss"]:.4f} lr {m["lr"]:.2e} '
              f'T_t {m["teacher_temp"]:.3f} m {m["momentum"]:.4f} H_t {m["teacher_entropy"]:.3f} '
              f'{m["img_per_s"]:.1f} img/s ETA {_fmt_time(eta)}', flush=True)
        t_last, last_logged = now, done
        warning = watch.update(done, float(m['teacher_entropy']))
        if warning is not None:
          print(f'dino_jax: WARNING: {warning}', flush=True)
          writer.event(done, 'collapse_warning', symptom=watch.symptom(m['teacher_entropy']),
                       message=warning)
          if config.watchdog.stop:
            raise watchdog_lib.CollapseError(
                f'{warning}; stopped (config.watchdog.stop); the last checkpoint is intact')
        if done != total and time_up(config.time_limit_minutes, t_begin):
          print(f'dino_jax: time limit of {config.time_limit_minutes:g} min reached at step '
                f'{done} of {total}: evaluating and saving; rerun the same command to go on',
                flush=True)
          writer.event(done, 'time_limit', minutes=config.time_limit_minutes)
          break
      if done != total and preemption.reached(done):
        check(done)
        save(done)
        mngr.wait_until_finished()
        print(f'dino_jax: preempted: saved step {done} to {mngr.directory}; rerun the same '
              f'command to resume', flush=True)
        return state
      if done % config.checkpoint_every == 0 and done != total:
        check(done)
        save(done)
      if config.eval_every and done % config.eval_every == 0 and done != total:
        eval_and_log(done)
    if metrics is not None:
      check(int(state.step))
    eval_and_log(int(state.step))
    if checkpointing.latest_step(mngr) != int(state.step):
      save(int(state.step))
  finally:  # a pending (good) save completes even when the run stops on an error
    if mngr is not None:  # before the SIGTERM watch goes: a signal now must not cut the save
      mngr.wait_until_finished()
      mngr.close()
    if preemption is not None:
      preemption.close()
    if writer is not None:
      writer.close()
  return state
