"""Config validation: every mistake stops the run before compiling, with one line naming the field."""
from __future__ import annotations

import os

from dino_jax import distill, evaluators, paths, sharding
from dino_jax.data import sources
from dino_jax.errors import DinoJaxError, error_line
from dino_jax.objective import GRAM_RESIZES
from dino_jax.schedules import LR_SCALING, SCHEDULES
from dino_jax.models import FFNS, PATCH_SIZES, REMAT_POLICIES, VARIANTS, patch_out_dim
from dino_jax.models.rope import NORMALIZE
from dino_jax.models.stem import STEMS
from dino_jax.models.vit import POS_EMBEDS, VARIANT_FFNS


class ConfigError(DinoJaxError, ValueError):
  """A config field with a bad value; the message names the field."""


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}: {message}')


def validate(config, n_devices: int | None = None) -> None:
  """Raise ConfigError for the first invalid field. n_devices: check batch divisibility."""
  m, c, o, l = config.model, config.crops, config.optim, config.loss
  _check(m.arch in VARIANTS, 'model.arch', f'unknown arch {m.arch!r}; choose one of '
         f'{", ".join(sorted(VARIANTS))}')
  _check(m.patch_size in PATCH_SIZES, 'model.patch_size',
         f'{m.patch_size} is not one of {PATCH_SIZES}')
  for field in ('global_size', 'local_size'):
    size = c[field]
    _check(size > 0 and size % m.patch_size == 0, f'crops.{field}',
           f'crop size {size} is not divisible by model.patch_size={m.patch_size}')
  for field in ('global_scale', 'local_scale'):
    lo, hi = c[field]
    _check(0 < lo <= hi <= 1, f'crops.{field}', f'{c[field]} is not a range within (0, 1]')
  _check(c.n_local >= 0, 'crops.n_local', f'must be >= 0, got {c.n_local}')
  for field in ('flip_p', 'jitter_p', 'grayscale_p', 'global1_blur_p', 'global2_blur_p',
                'global2_solarize_p', 'local_blur_p'):
    _check(0 <= c[field] <= 1, f'crops.{field}', f'probability {c[field]} is not in [0, 1]')
  _check(0 < c.eval_crop_fraction <= 1, 'crops.eval_crop_fraction', 'must be in (0, 1]')
  _check(config.data.canvas_size >= c.global_size, 'data.canvas_size',
         f'{config.data.canvas_size} is smaller than crops.global_size={c.global_size}')
  try:
    sources.check_kind(config.data.source)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  kind, _, location = config.data.source.partition(':')
  _check(kind not in ('npz', 'folder', 'arrayrecord') or paths.is_remote(location) or
         os.path.exists(location), 'data.source', f'no such file or folder {location!r} '
         f'(relative paths start at {os.getcwd()})')
  _check(config.data.worker_count >= 0, 'data.worker_count', 'must be >= 0 (0: no workers)')
  _check(config.data.prefetch >= 0, 'data.prefetch', 'must be >= 0')
  for field in ('head_hidden_dim', 'head_bottleneck_dim', 'head_layers', 'ibot_out_dim',
                'ibot_bottleneck_dim'):
    _check(m[field] >= 1, f'model.{field}', f'must be >= 1, got {m[field]}')
  for field in ('brightness', 'contrast', 'saturation'):
    _check(c[field] >= 0, f'crops.{field}', f'must be >= 0, got {c[field]}')
  _check(0 <= c.hue <= 0.5, 'crops.hue', f'must be in [0, 0.5], got {c.hue}')
  _check(0 < c.blur_sigma[0] <= c.blur_sigma[1], 'crops.blur_sigma',
         f'{c.blur_sigma} is not a positive range')
  _check(c.blur_radius >= 0, 'crops.blur_radius', 'must be >= 0 (0: 3 x the largest sigma)')
  _check(m.out_dim > 0, 'model.out_dim', f'must be positive, got {m.out_dim}')
  _check(0 <= m.drop_path_rate < 1, 'model.drop_path_rate', 'must be in [0, 1)')
  _check(m.ffn in FFNS, 'model.ffn', f'{m.ffn!r} is not one of {FFNS}')
  _check(m.stem in STEMS, 'model.stem', f'{m.stem!r} is not one of {STEMS}')
  _check(m.stem != 'conv' or m.patch_size & (m.patch_size - 1) == 0, 'model.stem',
         f"'conv' needs a power-of-two model.patch_size, got {m.patch_size}")
  _check(m.n_registers >= 0, 'model.n_registers', f'must be >= 0, got {m.n_registers}')
  _check(m.arch not in VARIANT_FFNS or m.ffn == VARIANT_FFNS[m.arch][0], 'model.ffn',
         f'{m.arch} has a SwiGLU FFN (DINOv3); set model.ffn={VARIANT_FFNS[m.arch][0]!r}'
         if m.arch in VARIANT_FFNS else '')
  _check(m.pos_embed in POS_EMBEDS, 'model.pos_embed',
         f'{m.pos_embed!r} is not one of {POS_EMBEDS}')
  head_dim = VARIANTS[m.arch][0] // VARIANTS[m.arch][2]
  _check(m.pos_embed != 'rope' or head_dim % 4 == 0, 'model.pos_embed',
         f'RoPE needs a head dimension divisible by 4, {m.arch} has {head_dim}')
  _check(m.rope_normalize in NORMALIZE, 'model.rope_normalize',
         f'{m.rope_normalize!r} is not one of {NORMALIZE}')
  _check(m.rope_base > 0, 'model.rope_base', f'must be positive, got {m.rope_base}')
  _check((m.rope_min_period, m.rope_max_period) == (0, 0) or
         0 < m.rope_min_period <= m.rope_max_period, 'model.rope_min_period',
         'rope_min_period and rope_max_period must both be 0 (use rope_base) or 0 < min <= max')
  _check(m.rope_shift >= 0, 'model.rope_shift', f'must be >= 0 (0: off), got {m.rope_shift}')
  for field in ('rope_jitter', 'rope_rescale'):
    _check(m[field] == 0 or m[field] >= 1, f'model.{field}',
           f'must be 0 (off) or >= 1 (factors in [1/x, x]), got {m[field]}')
  _check(m.ln_eps > 0, 'model.ln_eps', f'must be positive, got {m.ln_eps}')
  _check(m.register_init_std >= 0, 'model.register_init_std', 'must be >= 0')
  _check(m.layerscale >= 0, 'model.layerscale', f'must be >= 0 (0: off), got {m.layerscale}')
  _check(m.interpolate_offset >= 0, 'model.interpolate_offset', 'must be >= 0')
  _check(isinstance(m.remat, bool) or m.remat in REMAT_POLICIES, 'model.remat',
         f'{m.remat!r} is not one of {sorted(REMAT_POLICIES)} (or True/False: block/none)')
  _check(l.prototype_chunk >= 0, 'loss.prototype_chunk', 'must be >= 0 (0: no chunks)')
  for k in {m.out_dim, patch_out_dim(config)} if l.ibot_weight > 0 else {m.out_dim}:
    _check(l.prototype_chunk == 0 or l.prototype_chunk >= k or k % l.prototype_chunk == 0,
           'loss.prototype_chunk', f'{l.prototype_chunk} does not divide {k} prototypes')
  _check(l.centering in ('centering', 'sinkhorn_knopp'), 'loss.centering',
         f"{l.centering!r} is not 'centering' or 'sinkhorn_knopp'")
  _check(l.ibot_weight >= 0 and l.koleo_weight >= 0, 'loss.ibot_weight',
         'loss weights must be >= 0')
  _check(l.ibot_weight == 0 or m.mask_token, 'loss.ibot_weight',
         'the iBOT loss masks patches: set model.mask_token=True')
  _check(0 < l.mask_probability <= 1, 'loss.mask_probability', 'must be in (0, 1]')
  _check(0 <= l.mask_ratio[0] <= l.mask_ratio[1] <= 1, 'loss.mask_ratio',
         f'{l.mask_ratio} is not a range within [0, 1]')
  _check(o.lr_scaling in LR_SCALING, 'optim.lr_scaling',
         f'{o.lr_scaling!r} is not one of {sorted(LR_SCALING)}')
  _check(o.schedules in SCHEDULES, 'optim.schedules',
         f'{o.schedules!r} is not one of {list(SCHEDULES)}')
  _check(o.clip_mode in ('per_param', 'per_module'), 'optim.clip_mode',
         f"{o.clip_mode!r} is not 'per_param' or 'per_module'")
  _check(0 < o.layer_decay <= 1, 'optim.layer_decay', 'must be in (0, 1]')
  _check(o.patch_embed_lr_mult > 0, 'optim.patch_embed_lr_mult', 'must be positive')
  _check(config.data.epoch_length >= 0, 'data.epoch_length', 'must be >= 0 (0: one pass)')
  _check(config.batch_size > 0, 'batch_size', f'must be positive, got {config.batch_size}')
  if n_devices is not None:
    try:
      sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, n_devices)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    _check(config.batch_size % n_devices == 0, 'batch_size',
           f'global batch {config.batch_size} is not divisible by the {n_devices} devices')
  _check(config.epochs > 0, 'epochs', f'must be positive, got {config.epochs}')
  _check(config.dtype in ('float32', 'bfloat16', 'float16'), 'dtype',
         f'{config.dtype!r} is not float32, bfloat16 or float16')
  _check(o.lr > 0, 'optim.lr', f'must be positive, got {o.lr}')
  _check(0 <= o.momentum_teacher <= 1, 'optim.momentum_teacher', 'must be in [0, 1]')
  _check(0 <= o.warmup_epochs <= config.epochs, 'optim.warmup_epochs',
         f'{o.warmup_epochs} is not in [0, epochs={config.epochs}]')
  _check(o.min_lr >= 0, 'optim.min_lr', f'must be >= 0, got {o.min_lr}')
  for field in ('weight_decay', 'weight_decay_end', 'clip_grad', 'freeze_last_layer'):
    _check(o[field] >= 0, f'optim.{field}', f'must be >= 0, got {o[field]}')
  _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, 'optim.b1', 'Adam betas must be in [0, 1)')
  _check(o.eps > 0, 'optim.eps', f'must be positive, got {o.eps}')
  _check(config.mesh.min_shard_size >= 0, 'mesh.min_shard_size', 'must be >= 0')
  _check(0 <= l.center_momentum <= 1, 'loss.center_momentum', 'must be in [0, 1]')
  _check(l.warmup_teacher_temp_epochs >= 0, 'loss.warmup_teacher_temp_epochs', 'must be >= 0')
  _check(l.teacher_temp > 0 and l.warmup_teacher_temp > 0, 'loss.teacher_temp',
         'temperatures must be positive')
  _check(l.student_temp > 0, 'loss.student_temp', 'must be positive')
  _check(config.log_every > 0, 'log_every', f'must be positive, got {config.log_every}')
  _check(config.eval_every >= 0, 'eval_every', f'must be >= 0, got {config.eval_every}')
  try:
    evaluators.check_loop_names(config.evals)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check(config.checkpoint_every > 0, 'checkpoint_every',
         f'must be positive, got {config.checkpoint_every}')
  _check(config.keep_checkpoints > 0, 'keep_checkpoints',
         f'must be positive, got {config.keep_checkpoints}')
  _check(config.keep_checkpoint_every >= 0, 'keep_checkpoint_every',
         f'must be >= 0, got {config.keep_checkpoint_every}')
  _check_init_from(config.init_from, 'init_from')
  _validate_dinov3(config)
  _validate_distill(config)
  _validate_size_sets(config)
  w = config.watchdog
  _check(0 < w.margin < 0.5, 'watchdog.margin', f'must be in (0, 0.5), got {w.margin}')
  _check(0 < w.low_margin < 0.5, 'watchdog.low_margin',
         f'must be in (0, 0.5), got {w.low_margin}')
  _check(w.patience > 0, 'watchdog.patience', f'must be positive, got {w.patience}')
  _check(config.attention_images >= 0, 'attention_images', 'must be >= 0 (0: none)')
  _check(config.max_param_growth > 1, 'max_param_growth',
         f'must be > 1, got {config.max_param_growth}')
  _check(config.time_limit_minutes >= 0, 'time_limit_minutes',
         f'must be >= 0 (0: none), got {config.time_limit_minutes}')
  k = config.knn
  _check(k.k > 0, 'knn.k', f'must be positive, got {k.k}')
  _check(k.temperature > 0, 'knn.temperature', f'must be positive, got {k.temperature}')
  _check(k.max_train >= 0, 'knn.max_train', f'must be >= 0 (0: all), got {k.max_train}')
  _check(k.batch_size > 0, 'knn.batch_size', f'must be positive, got {k.batch_size}')


def _weight_schedule(schedule, field: str) -> None:
  _check(len(schedule) in (0, 4), field, f'{tuple(schedule)} is neither () nor (start, peak, '
         f'warmup_epochs, cosine_epochs)')
  if schedule:
    _check(all(v >= 0 for v in schedule), field, f'{tuple(schedule)} has a negative entry')


def _check_init_from(path: str, field: str) -> None:
  """An init_from field: empty, a workdir or step directory (local or gs://), or a local
  .safetensors model file."""
  remote_dir = paths.is_remote(path) and not path.endswith('.safetensors')
  _check(not path or remote_dir or os.path.isdir(path) or
         (path.endswith('.safetensors') and os.path.isfile(path)),
         field, f'{path!r} is neither a directory (a workdir or WORKDIR/checkpoints/<step>, '
         f'local or gs://) nor a local .safetensors file from dino_jax.convert')


def _validate_distill(config) -> None:
  """DINOv3 distillation (config.distill): the teacher is readable, has its heads, and its
  patch size and DINO and iBOT prototypes are the student's (its run config says)."""
  path, m = config.distill.teacher, config.model
  if not path:
    return
  _check_init_from(path, 'distill.teacher')
  _check(config.gram.weight == 0, 'distill.teacher',
         'distillation with Gram anchoring is not supported: set gram.weight=0')
  try:
    teacher, refused = distill.teacher_config(path)
  except Exception as e:  # pylint: disable=broad-except  # any unreadable teacher: one line
    raise ConfigError(f'config.distill.teacher: cannot read the teacher {path!r} '
                      f'({error_line(e)})') from None
  _check(refused is None, 'distill.teacher', refused or '')
  t = teacher.model
  _check(t.patch_size == m.patch_size, 'model.patch_size',
         f'{m.patch_size}, but the teacher {path} has patch size {t.patch_size}: distillation '
         f'needs the same')
  _check(t.out_dim == m.out_dim, 'model.out_dim',
         f'{m.out_dim}, but the teacher {path} has {t.out_dim} DINO prototypes: distillation '
         f'needs the same')
  _check(patch_out_dim(teacher) == patch_out_dim(config), 'model.ibot_out_dim',
         f'the student\'s iBOT head has {patch_out_dim(config)} prototypes (ibot_separate_head='
         f'{m.ibot_separate_head}), the teacher {path}\'s {patch_out_dim(teacher)} '
         f'(ibot_separate_head={t.ibot_separate_head}): distillation needs the same')


def _validate_dinov3(config) -> None:
  """The DINOv3 fields: the local-crop DINO weight and Gram anchoring (config.gram)."""
  l, g = config.loss, config.gram
  _check(l.dino_local_weight >= 0, 'loss.dino_local_weight',
         f'must be >= 0, got {l.dino_local_weight}')
  _weight_schedule(l.dino_local_weight_schedule, 'loss.dino_local_weight_schedule')
  _check(g.weight >= 0, 'gram.weight', f'must be >= 0 (0: off), got {g.weight}')
  _weight_schedule(g.weight_schedule, 'gram.weight_schedule')
  size, patch = g.teacher_size, config.model.patch_size
  _check(size >= 0 and size % patch == 0, 'gram.teacher_size',
         f'{size} is not 0 (crops.global_size) or a positive multiple of model.patch_size={patch}')
  _check(not g.ema_teacher or size in (0, config.crops.global_size), 'gram.teacher_size',
         f'{size}: with gram.ema_teacher the targets are the EMA teacher\'s own global crops '
         f'(set 0)')
  _check(not (g.ema_teacher and g.init_from), 'gram.init_from',
         'with gram.ema_teacher there is no Gram teacher to load (set one of the two)')
  _check_init_from(g.init_from, 'gram.init_from')
  _check(g.load_ema_at >= -1, 'gram.load_ema_at', f'must be a step or -1 (never), got '
         f'{g.load_ema_at}')
  _check(g.update_every > 0, 'gram.update_every', f'must be positive, got {g.update_every}')
  _check(g.first_update >= 0, 'gram.first_update', f'must be >= 0, got {g.first_update}')
  _check(g.max_updates >= 0, 'gram.max_updates', f'must be >= 0 (0: no limit), got '
         f'{g.max_updates}')
  _check(not (g.remove_neg and g.remove_only_teacher_neg), 'gram.remove_only_teacher_neg',
         'set at most one of gram.remove_neg and gram.remove_only_teacher_neg')
  _check(g.resize in GRAM_RESIZES, 'gram.resize', f'{g.resize!r} is not one of {GRAM_RESIZES}')
  _check(not g.antialias or g.resize == 'bicubic', 'gram.antialias',
         "antialiased resizing is implemented for gram.resize='bicubic' only")


def _validate_size_sets(config) -> None:
  """DINOv3's crop-size sets (crops.size_sets, crops.size_set_ratios; resolution.py)."""
  c, patch = config.crops, config.model.patch_size
  sets, ratios = tuple(c.size_sets), tuple(c.size_set_ratios)
  _check(not ratios or len(ratios) == len(sets), 'crops.size_set_ratios',
         f'{len(ratios)} ratios for {len(sets)} crops.size_sets (give one per set, or none)')
  for i, s in enumerate(sets):
    _check(isinstance(s, (tuple, list)) and len(s) == 3 and
           all(isinstance(v, int) and not isinstance(v, bool) for v in s), 'crops.size_sets',
           f'set {i} is {s!r}, not (global size, local size, Gram teacher size) integers')
    g, l, t = s
    _check(g > 0 and g % patch == 0 and l > 0 and l % patch == 0, 'crops.size_sets',
           f'set {i} {tuple(s)}: crop sizes must be positive multiples of '
           f'model.patch_size={patch}')
    _check(t >= 0 and t % patch == 0, 'crops.size_sets',
           f'set {i} {tuple(s)}: the Gram teacher size must be 0 (the global size) or a '
           f'positive multiple of model.patch_size={patch}')
    _check(config.data.canvas_size >= g, 'data.canvas_size',
           f'{config.data.canvas_size} is smaller than the global crop size {g} of '
           f'crops.size_sets set {i}')
    _check(not config.gram.ema_teacher or t in (0, g), 'crops.size_sets',
           f'set {i} {tuple(s)}: with gram.ema_teacher the Gram targets are the global crops '
           f'themselves (set the teacher size to 0)')
  for r in ratios:
    _check(isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 0,
           'crops.size_set_ratios', f'{r!r} is not a weight >= 0')
  _check(not ratios or sum(ratios) > 0, 'crops.size_set_ratios', 'the weights sum to 0')
