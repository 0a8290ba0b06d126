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
