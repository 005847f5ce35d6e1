"""kNN and cached-feature probes vs hand computations and on separable synthetic features."""

import numpy as np
import pytest

from mimjax.evaluate import knn
from mimjax.evaluate import linear


def _separable(n_per_class=40, classes=4, dim=16, seed=0, noise=0.3):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, dim)) * 3
  y = np.repeat(np.arange(classes), n_per_class)
  x = centers[y] + noise * rng.normal(size=(len(y), dim))
  perm = rng.permutation(len(y))
  return x[perm].astype(np.float32), y[perm].astype(np.int32)


def test_knn_scores_match_hand_computed_dino_vote():
  train = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)
  labels = np.array([0, 1, 1, 2])
  test = np.array([[2, 0.2]], np.float32)
  scores = knn.knn_scores(train, labels, test, num_classes=3, k=2, temperature=0.5)
  t = test[0] / np.linalg.norm(test[0])
  sims = [t @ (v / np.linalg.norm(v)) for v in train]
  # top-2 neighbours: [1,0] (class 0) and [1,1] (class 1)
  expected = np.zeros(3)
  expected[0] = np.exp(sims[0] / 0.5)
  expected[1] = np.exp(sims[2] / 0.5)
  np.testing.assert_allclose(scores[0], expected, rtol=1e-5)


def test_knn_on_separable_features_is_perfect():
  x, y = _separable()
  tx, ty = _separable(seed=1, n_per_class=10)
  # Same class centres for the test set: reuse the generator's centres via seed 0 draws.
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 16)) * 3
  tx = (centers[ty] + 0.3 * np.random.default_rng(5).normal(size=(len(ty), 16))).astype(np.float32)
  acc = knn.topk_accuracy(knn.knn_scores(x, y, tx, 4), ty)
  assert acc['top1'] == 100.0 and acc['top5'] == 100.0


def test_topk_accuracy_counts_rank():
  scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
  acc = knn.topk_accuracy(scores, np.array([2, 0, 0]), ks=(1, 2))
  assert acc['top1'] == pytest.approx(100 / 3)
  assert acc['top2'] == pytest.approx(200 / 3)


def test_label_subset_is_per_class_and_seeded():
  y = np.repeat(np.arange(5), 100)
  idx = knn.label_subset(y, 0.1, seed=3)
  assert np.bincount(y[idx]).tolist() == [10] * 5
  np.testing.assert_array_equal(idx, knn.label_subset(y, 0.1, seed=3))
  assert np.bincount(y[knn.label_subset(y, 0.001)]).tolist() == [1] * 5  # at least one
  with pytest.raises(ValueError, match='label fraction'):
    knn.label_subset(y, 0.0)


def test_standardize_is_bn_without_affine():
  x = np.array([[1.0, 2.0], [3.0, 6.0]])
  (z,) = linear.standardize(x)
  np.testing.assert_allclose(z, [[-1, -1], [1, 1]], atol=1e-5)


@pytest.mark.parametrize('optimizer', ['lars', 'sgd'])
def test_linear_probe_sweep_on_separable_features(optimizer):
  x, y = _separable()
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 16)) * 3
  ty = np.arange(40) % 4
  tx = (centers[ty] + 0.3 * np.random.default_rng(7).normal(size=(40, 16))).astype(np.float32)
  # LARS steps are tiny (trust 0.001): MAE's lr scale.
  lrs = (0.0, 50.0) if optimizer == 'lars' else (0.0, 0.1)
  out = linear.probe_sweep(x, y, tx, ty, 4, lrs, epochs=20, batch_size=32, warmup_epochs=2,
                           optimizer=optimizer)
  assert out[f'top1@lr={lrs[1]:g}'] == 100.0
  assert out['best_lr'] == lrs[1]
  assert out['top1'] == 100.0
