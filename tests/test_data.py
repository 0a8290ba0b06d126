"""Sources and grain pipelines: canvases, order, resume, per-process shards, eval padding."""
import numpy as np
import pytest

from dino_jax import data
from dino_jax.data import pipeline, sources


def indexed_source(n, size=8):
  """Images whose first pixel encodes their index (and labels = index)."""
  x = np.zeros((n, size, size, 3), np.uint8)
  x[:, 0, 0, 0] = np.arange(n) % 256
  x[:, 0, 0, 1] = np.arange(n) // 256
  return sources.ArraySource(x, np.arange(n))


def ids(batch):
  return batch['label'].tolist()


def test_digits_is_real_labelled_images():
  train, test = data.load('digits')
  assert len(train) == 1500 and len(test) == 297
  r = train[0]
  assert r['image'].shape == (8, 8, 3) and r['image'].dtype == np.uint8
  assert r['image'].max() > 200 and 0 <= r['label'] <= 9


def test_npz_source_grayscale_and_missing_fields(tmp_path):
  path = tmp_path / 'a.npz'
  np.savez(path, x_train=np.zeros((3, 5, 7), np.uint8))
  train, test = data.load(f'npz:{path}')
  assert train[1]['image'].shape == (5, 7, 3) and not train.has_labels and test is None
  np.savez(tmp_path / 'b.npz', images=np.zeros((3, 5, 7), np.uint8))
  with pytest.raises(ValueError, match='has no array x_train'):
    data.load(f'npz:{tmp_path}/b.npz')
  with pytest.raises(FileNotFoundError, match='no such file'):
    data.load(f'npz:{tmp_path}/missing.npz')
  with pytest.raises(ValueError, match='expected one of'):
    data.load('imagenet')


def test_canvas_keeps_aspect_and_valid_size():
  img = np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8)
  canvas, hw = data.to_canvas(img, 32)
  assert canvas.shape == (32, 32, 3) and hw.tolist() == [16, 32]
  np.testing.assert_array_equal(canvas[16:], np.repeat(canvas[15:16], 16, axis=0))  # edge pad
  same, hw2 = data.to_canvas(img[:16, :32], 32)
  np.testing.assert_array_equal(same[:16], img[:16, :32])
  assert hw2.tolist() == [16, 32]


def test_same_seed_same_order_and_each_epoch_is_a_permutation():
  src = indexed_source(50)
  a = pipeline.train_dataset(src, canvas_size=8, global_batch=10, seed=3)
  b = pipeline.train_dataset(src, canvas_size=8, global_batch=10, seed=3)
  c = pipeline.train_dataset(src, canvas_size=8, global_batch=10, seed=4)
  assert [ids(a[i]) for i in range(10)] == [ids(b[i]) for i in range(10)]
  assert ids(a[0]) != ids(c[0])
  epoch0 = sum((ids(a[i]) for i in range(5)), [])
  epoch1 = sum((ids(a[i]) for i in range(5, 10)), [])
  assert sorted(epoch0) == list(range(50)) == sorted(epoch1)
  assert epoch0 != epoch1  # reshuffled every epoch


def test_iterator_resumes_at_any_step():
  src = indexed_source(40)
  ds = pipeline.train_dataset(src, canvas_size=8, global_batch=8, seed=0)
  it = data.train_iterator(src, canvas_size=8, global_batch=8, seed=0, start_step=7)
  for i in range(7, 12):
    batch = next(it)
    assert ids(batch) == ids(ds[i])
    np.testing.assert_array_equal(batch['image'], ds[i]['image'])


def test_two_processes_read_disjoint_shards_that_cover_the_data():
  src = indexed_source(64)
  seen = []
  for p in range(2):
    ds = pipeline.train_dataset(src, canvas_size=8, global_batch=16, seed=0,
                                process_index=p, process_count=2)
    assert ds[0]['image'].shape[0] == 8  # local batch
    seen.append(set(sum((ids(ds[i]) for i in range(4)), [])))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(64))


def test_eval_batches_cover_everything_once_with_padding_masked():
  src = indexed_source(23)
  batches = list(data.eval_batches(src, canvas_size=8, batch_size=10))
  assert len(batches) == 3 and all(b['image'].shape[0] == 10 for b in batches)
  real = sum((b['label'][b['mask']].tolist() for b in batches), [])
  assert real == list(range(23))


def test_steps_per_epoch_drops_the_last_partial_batch():
  assert data.steps_per_epoch(1_281_167, 512) == 2502  # the official ImageNet count
  assert data.steps_per_epoch(1_281_167, 1024) == 1251


def test_tfds_source_through_grain_with_mock_data():
  """tfds:imagenet2012 (the ViT-S/16 default) read with tfds.data_source, no TensorFlow."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    train, test = data.load('tfds:imagenet2012')
    assert len(train) == 24 and train.has_labels
    assert test is not None and len(test) == 24
    batch = data.train_dataset(train, canvas_size=32, global_batch=8, seed=0)[0]
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert (batch['hw'] <= 32).all() and (batch['hw'].max(axis=1) == 32).all()
  assert ((batch['label'] >= 0) & (batch['label'] < 1000)).all()
