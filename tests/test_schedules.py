"""Schedules against a numpy transcription of the official per-iteration arrays."""
import numpy as np
import pytest

from dino_jax import schedules


def official_cosine(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
  """The official cosine_scheduler, written out from its description."""
  warmup_iters = warmup_epochs * niter
  warm = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
  iters = np.arange(epochs * niter - warmup_iters)
  cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate([warm, cos])


@pytest.mark.parametrize('base,final,epochs,niter,warmup', [
    (1e-3, 1e-6, 10, 7, 2), (0.04, 0.4, 5, 3, 0), (0.996, 1.0, 4, 11, 0), (5e-4, 0, 3, 5, 1)])
def test_cosine_matches_official_array(base, final, epochs, niter, warmup):
  want = official_cosine(base, final, epochs, niter, warmup)
  steps = np.arange(epochs * niter)
  got = np.asarray(schedules.cosine(steps, base, final, epochs * niter, warmup * niter))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  assert got[0] == pytest.approx(0.0 if warmup else base, rel=1e-6)


@pytest.mark.parametrize('warmup_epochs', [0, 1, 3, 30])
def test_teacher_temperature_is_per_epoch_linspace(warmup_epochs):
  niter, epochs = 4, 40
  per_epoch = np.concatenate([np.linspace(0.04, 0.07, warmup_epochs),
                              np.ones(epochs - warmup_epochs) * 0.07])
  want = np.repeat(per_epoch, niter)
  got = schedules.teacher_temperature(np.arange(epochs * niter), niter, 0.04, 0.07,
                                      warmup_epochs)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_from_config_scales_lr_by_batch(config):
  config.batch_size = 1024
  config.optim.lr = 5e-4
  s = schedules.Schedules.from_config(config, steps_per_epoch=10)
  assert s.lr_peak == pytest.approx(2e-3)
  assert s.total_steps == config.epochs * 10
  assert float(s.lr(s.warmup_steps)) == pytest.approx(2e-3, rel=1e-6)
  assert bool(s.last_layer_frozen(s.freeze_last_layer_steps - 1))
  assert not bool(s.last_layer_frozen(s.freeze_last_layer_steps))


def dinov3_schedule(start, peak, end, warmup_iters, total_iters, cosine_iters=None):
  """DINOv3's linear_warmup_cosine_decay array, written out from its description: linspace
  start -> peak without its last point, a half cosine peak -> end with both ends, then end."""
  warm = np.linspace(start, peak, warmup_iters, endpoint=False)
  cosine_iters = total_iters - warmup_iters if cosine_iters is None else cosine_iters
  cos = end + (peak - end) * (np.cos(np.linspace(0, np.pi, cosine_iters)) + 1) / 2
  return np.concatenate([warm, cos, np.full(total_iters - warmup_iters - cosine_iters, end)])


@pytest.mark.parametrize('start,peak,end,warmup,total,cosine', [
    (0.0, 5e-5, 5e-5, 10, 40, None),  # DINOv3 pretraining lr: warmup, then constant
    (0.04, 0.07, 0.07, 7, 30, None),  # its teacher temperature
    (0.0, 1e-3, 1e-6, 5, 40, None),  # warmup + cosine decay
    (0.0, 0.0, 1.25e-5, 0, 30, 10),  # high-res adaptation lr: cosine up, then constant
    (0.994, 0.994, 0.994, 0, 12, None),  # a constant
    (1.0, 2.0, 0.5, 3, 9, 1),  # a one-step cosine
])
def test_warmup_cosine_constant_matches_dinov3_array(start, peak, end, warmup, total, cosine):
  want = dinov3_schedule(start, peak, end, warmup, total, cosine)
  got = schedules.warmup_cosine_constant(np.arange(total), start, peak, end, warmup, total,
                                         cosine)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-10)


def test_constant_family_is_dinov3s_schedules(config):
  config.optim.schedules = 'constant'
  config.epochs, config.batch_size, config.optim.lr, config.optim.warmup_epochs = 8, 256, 4e-4, 2
  config.optim.weight_decay, config.optim.momentum_teacher = 0.04, 0.994
  config.loss.warmup_teacher_temp, config.loss.teacher_temp = 0.04, 0.07
  config.loss.warmup_teacher_temp_epochs = 3
  s = schedules.Schedules.from_config(config, steps_per_epoch=5)
  steps = np.arange(s.total_steps)
  np.testing.assert_allclose(np.asarray(s.lr(steps)),
                             dinov3_schedule(0.0, 4e-4, 4e-4, 10, s.total_steps), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s.teacher_temp_at(steps)),
                             dinov3_schedule(0.04, 0.07, 0.07, 15, s.total_steps), rtol=1e-5)
  assert np.all(np.asarray(s.weight_decay(steps)) == np.float32(0.04))
  assert np.all(np.asarray(s.teacher_momentum(steps)) == np.float32(0.994))
  assert float(s.lr(s.total_steps - 1)) == pytest.approx(4e-4)  # no decay at the end
  config.optim.schedules = 'cosine'  # the default family still decays
  c = schedules.Schedules.from_config(config, steps_per_epoch=5)
  assert float(c.lr(c.total_steps - 1)) < 4e-4 / 2
