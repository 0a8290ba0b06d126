"""DAVIS label propagation: mask formats, a static mask through identical frames gives J=F=1,
the top-k affinity against a brute-force reference, and J / F on known cases."""
import numpy as np
import pytest
from PIL import Image

from dino_jax.evaluators import video


def palette_png(path, ids):
  img = Image.fromarray(ids.astype(np.uint8), 'P')
  img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
  img.save(path)


def test_reads_palette_and_binary_masks(tmp_path):
  ids = np.zeros((6, 8), np.uint8)
  ids[1:3, 1:3], ids[4:, 5:], ids[0, 7] = 1, 2, 255
  palette_png(tmp_path / 'p.png', ids)
  got, pal = video.read_mask(str(tmp_path / 'p.png'))
  assert np.array_equal(got, ids) and pal[:6] == [0, 0, 0, 128, 0, 0]
  Image.fromarray((ids == 1).astype(np.uint8) * 255, 'L').save(tmp_path / 'g.png')
  got, pal = video.read_mask(str(tmp_path / 'g.png'))
  assert np.array_equal(got, (ids == 1).astype(np.uint8)) and pal is None
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'rgb.png')
  with pytest.raises(ValueError, match='mode RGB: expected a palette PNG'):
    video.read_mask(str(tmp_path / 'rgb.png'))


def test_official_frame_size():
  assert video.frame_size(480, 854) == (480, 832)
  assert video.frame_size(854, 480) == (832, 480)
  assert video.frame_size(240, 427, short=240) == (240, 384)


def position_features(frame, patch=4):
  """A feature per patch position, orthogonal to every other: an 'ideal' backbone."""
  n = (frame.shape[0] // patch) * (frame.shape[1] // patch)
  return np.eye(n, dtype=np.float32)


@pytest.mark.parametrize('n_objects', [1, 3])
def test_static_mask_through_identical_frames_gives_j_and_f_of_one(n_objects):
  rng = np.random.default_rng(n_objects)
  # Objects as bands on the 4-px patch grid of 32 x 48 frames (8 x 12 patches): exactly
  # representable at the features' resolution, and without corners (see the next test).
  mask = np.zeros((32, 48), np.uint8)
  for o in range(1, n_objects + 1):
    mask[8 * o - 4:8 * o, :] = o
  frame = rng.normal(size=(32, 48, 3)).astype(np.float32)
  frames = [frame] * 12  # more than 1 + 7: the context queue wraps around
  preds = video.segment_sequence(frames, mask, position_features, 4, mask.shape)
  assert len(preds) == 12 and all(p.shape == mask.shape for p in preds)
  scores = video.score_sequence(preds, [mask] * 12)
  assert len(scores['J']) == n_objects
  res = video.summarize({'static': scores})
  assert res == {'J': 1.0, 'F': 1.0, 'J&F': 1.0}


def test_static_labels_propagate_unchanged_and_only_corners_round():
  """Propagation copies patch labels exactly; the official bilinear x patch upsampling and
  argmax then rounds off one pixel at each convex corner of an object."""
  mask = np.zeros((32, 48), np.uint8)
  mask[8:20, 12:28] = 1
  frames = [np.zeros((32, 48, 3), np.float32)] * 5
  feats = np.stack([position_features(f) for f in frames])
  first = video.one_hot_grid(mask, (8, 12), 2)
  soft = video.propagate(feats, first, (8, 12))
  np.testing.assert_allclose(soft, np.broadcast_to(first, soft.shape), atol=1e-2)  # e^-10 leaks
  pred = video.to_mask(soft[3], (8, 12), 4, mask.shape)
  wrong = np.argwhere(pred != mask)
  assert sorted(map(tuple, wrong)) == [(8, 12), (8, 27), (19, 12), (19, 27)]


def brute_force_step(feat_t, ctx_feats, ctx_labels, near, topk, temperature):
  out = []
  src_f = ctx_feats.reshape(-1, ctx_feats.shape[-1])
  src_l = ctx_labels.reshape(-1, ctx_labels.shape[-1])
  near_all = np.tile(near, (len(ctx_feats), 1))
  for t in range(len(feat_t)):
    w = np.exp(src_f @ feat_t[t] / temperature) * near_all[:, t]
    kth = np.sort(w)[-topk]
    w = np.where(w >= kth, w, 0.0)
    out.append((w / w.sum()) @ src_l)
  return np.array(out)


def test_propagation_step_matches_brute_force():
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  feat_t = unit(rng.normal(size=(20, 8))).astype(np.float32)
  ctx = unit(rng.normal(size=(3, 20, 8))).astype(np.float32)
  labels = rng.dirichlet(np.ones(3), size=(3, 20)).astype(np.float32)
  near = video.neighborhood_mask(4, 5, 1)
  assert near.sum(0)[0] == 4 and near.sum(0)[6] == 9  # corner and inner 3 x 3 windows
  got = video.propagate_step(feat_t, ctx, labels, np.ones(3, np.float32), near, topk=5,
                             temperature=0.1)
  want = brute_force_step(feat_t, ctx, labels, near, 5, 0.1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
  # an unused context slot contributes nothing
  got2 = video.propagate_step(feat_t, ctx, labels, np.array([1, 1, 0], np.float32), near,
                              topk=5, temperature=0.1)
  want2 = brute_force_step(feat_t, ctx[:2], labels[:2], near, 5, 0.1)
  np.testing.assert_allclose(np.asarray(got2), want2, rtol=1e-4, atol=1e-6)


def test_j_and_f_on_known_cases():
  a = np.zeros((100, 100), bool)
  a[20:60, 20:60] = True
  assert video.region_j(a, a) == 1.0 and video.boundary_f(a, a) == 1.0
  shifted = np.roll(a, 1, axis=1)  # 1 px: inside the ceil(0.008 * 141.4) = 2 px tolerance
  assert video.region_j(shifted, a) == pytest.approx(39 * 40 / (41 * 40))
  assert video.boundary_f(shifted, a) == 1.0
  far = np.zeros_like(a)
  far[80:90, 80:90] = True
  assert video.region_j(far, a) == 0.0 and video.boundary_f(far, a) == 0.0
  empty = np.zeros_like(a)
  assert video.region_j(empty, empty) == 1.0 and video.boundary_f(empty, empty) == 1.0
  assert video.boundary_f(empty, a) == 0.0
  void = np.zeros_like(a)
  void[:, 50:] = True  # void pixels are ignored
  half = a.copy()
  half[:, 50:] = False
  assert video.region_j(half, a, void) == 1.0


def test_first_and_last_frames_are_not_scored():
  gt = np.zeros((10, 10), np.uint8)
  gt[2:6, 2:6] = 1
  wrong = np.zeros_like(gt)
  s = video.score_sequence([gt, gt, gt, wrong], [gt] * 4)  # the last frame is left out
  assert s == {'J': [1.0], 'F': [1.0]}
  s = video.score_sequence([gt, wrong, gt, gt], [gt] * 4)
  assert s['J'] == [0.5]


def test_davis_layout_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a DAVIS folder'):
    video.list_sequences(str(tmp_path))
  (tmp_path / 'JPEGImages' / '480p' / 's').mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'JPEGImages/480p/s/00000.jpg')
  with pytest.raises(FileNotFoundError, match='the first frame has no annotation'):
    video.list_sequence(str(tmp_path), 's')


def test_frame_size_too_small_is_a_clear_error():
  with pytest.raises(ValueError, match='raise the short side'):
    video.frame_size(32, 48, short=32)
