"""Weighted k-NN: known answers and a brute-force reference."""
import numpy as np
import pytest

from dino_jax.evaluators import knn


def clusters(n_per, centers, rng, spread=0.05):
  n_classes, dim = centers.shape
  x = np.repeat(centers, n_per, axis=0) + spread * rng.normal(size=(n_per * n_classes, dim))
  return knn.l2_normalize(x), np.repeat(np.arange(n_classes), n_per)


def test_separable_clusters_score_100():
  rng = np.random.default_rng(0)
  centers = knn.l2_normalize(rng.normal(size=(5, 16)))
  xtr, ytr = clusters(30, centers, rng)
  xte, yte = clusters(7, centers, rng)
  res = knn.knn_classify(xtr, ytr, xte, yte, k=20)
  assert res['top1'] == 100.0 and res['top5'] == 100.0


def test_constant_features_score_chance():
  rng = np.random.default_rng(1)
  ytr = rng.integers(0, 10, 500)
  yte = rng.integers(0, 10, 400)
  feats = knn.l2_normalize(np.ones((1, 8)))
  res = knn.knn_classify(np.repeat(feats, 500, 0), ytr, np.repeat(feats, 400, 0), yte, k=20)
  assert 2.0 < res['top1'] < 25.0  # one fixed class for every test image: about 10%


def brute_force(xtr, ytr, xte, k, t, c):
  preds = []
  for q in xte:
    sims = xtr @ q
    idx = np.argsort(-sims, kind='stable')[:k]
    votes = np.zeros(c)
    for i in idx:
      votes[ytr[i]] += np.exp(sims[i] / t)
    preds.append(np.argmax(votes))
  return np.array(preds)


@pytest.mark.parametrize('n_test,chunk', [(1, 1024), (37, 8), (99, 1024), (250, 64)])
def test_matches_brute_force_for_any_test_size(n_test, chunk):
  rng = np.random.default_rng(n_test)
  xtr = knn.l2_normalize(rng.normal(size=(300, 12)))
  ytr = rng.integers(0, 6, 300)
  xte = knn.l2_normalize(rng.normal(size=(n_test, 12)))
  yte = rng.integers(0, 6, n_test)
  res = knn.knn_classify(xtr, ytr, xte, yte, k=20, chunk=chunk, num_classes=6)
  want = 100.0 * np.mean(brute_force(xtr, ytr, xte, 20, 0.07, 6) == yte)
  assert res['top1'] == pytest.approx(want)


def test_empty_inputs_raise():
  with pytest.raises(ValueError, match='at least one'):
    knn.knn_classify(np.zeros((0, 4)), np.zeros(0), np.zeros((3, 4)), np.zeros(3))


def test_several_k_in_one_pass_match_brute_force_each():
  rng = np.random.default_rng(5)
  xtr = knn.l2_normalize(rng.normal(size=(403, 10)))  # not a multiple of the 8 devices
  ytr = rng.integers(0, 7, 403)
  xte = knn.l2_normalize(rng.normal(size=(61, 10)))
  yte = rng.integers(0, 7, 61)
  res = knn.knn_classify_ks(xtr, ytr, xte, yte, ks=(1, 10, 20, 100, 200), chunk=16,
                            num_classes=7)
  for k in (1, 10, 20, 100, 200):
    want = 100.0 * np.mean(brute_force(xtr, ytr, xte, k, 0.07, 7) == yte)
    assert res[k]['top1'] == pytest.approx(want), k


def test_sharded_bank_equals_single_device_scores():
  import jax  # pylint: disable=import-outside-toplevel
  from dino_jax import sharding  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(6)
  xtr = knn.l2_normalize(rng.normal(size=(101, 6))).astype(np.float32)
  ytr = rng.integers(0, 4, 101).astype(np.int32)
  xte = knn.l2_normalize(rng.normal(size=(9, 6))).astype(np.float32)
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  bank, labels = knn.shard_bank(xtr, ytr, mesh)
  assert len(bank.sharding.device_set) == 8 and bank.shape[0] == 104
  sharded = knn.knn_scores(xte, bank, labels, ks=(10, 20), temperature=0.07, num_classes=4,
                           mesh=mesh)
  single = knn.knn_scores(xte, jax.numpy.asarray(xtr), jax.numpy.asarray(ytr), ks=(10, 20),
                          temperature=0.07, num_classes=4)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5)


def test_k_larger_than_the_train_set_uses_every_train_image():
  rng = np.random.default_rng(7)
  xtr = knn.l2_normalize(rng.normal(size=(12, 5)))
  ytr = rng.integers(0, 3, 12)
  xte = knn.l2_normalize(rng.normal(size=(5, 5)))
  yte = rng.integers(0, 3, 5)
  res = knn.knn_classify_ks(xtr, ytr, xte, yte, ks=(12, 200), num_classes=3)
  assert res[200] == res[12]


def test_bad_k_is_a_clear_error():
  with pytest.raises(ValueError, match='every k must be >= 1'):
    knn.knn_classify_ks(np.ones((3, 2)), np.zeros(3), np.ones((2, 2)), np.zeros(2), ks=(0, 20))
