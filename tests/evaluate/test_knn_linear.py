"""kNN and cached-feature probes vs hand computations, numpy references and separable synthetic
features; and how their programs scale (data as arguments, split over 8 devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mimjax import sharding
from mimjax.evaluate import knn
from mimjax.evaluate import linear
from mimjax.objectives import accuracy
from tests import hlo

ROWS = P(sharding.BATCH_AXES)
KEY = jax.eval_shape(lambda: jax.random.key(0)).dtype


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
  acc = accuracy.topk_accuracy(knn.knn_scores(x, y, tx, 4), ty)
  assert acc['top1'] == 100.0 and acc['top5'] == 100.0


def test_topk_accuracy_counts_rank():
  scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
  acc = accuracy.topk_accuracy(scores, np.array([2, 0, 0]), ks=(1, 2))
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


# --- At scale: data as jit arguments, split over the mesh (issue 13) ---

def _numpy_knn(train, labels, test, classes, k, temperature):
  """DINO eval_knn.py: cosine top-k over the labelled rows, score Σ exp(sim / T) per class."""
  unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
  keep = labels >= 0
  bank, labels = unit(train)[keep], labels[keep]
  sims = unit(test) @ bank.T
  out = np.zeros((len(test), classes))
  for i, row in enumerate(sims):
    for j in np.argsort(-row)[:k]:
      out[i, labels[j]] += np.exp(row[j] / temperature)
  return out


@pytest.mark.parametrize('devices,bank_chunk', [(1, 1000), (8, 7)])
def test_knn_bank_matches_numpy_vote_on_a_split_bank_and_label_fraction(devices, bank_chunk):
  rng = np.random.default_rng(0)
  train = rng.normal(size=(203, 16)).astype(np.float32)
  labels = rng.integers(0, 5, 203)
  test = rng.normal(size=(37, 16)).astype(np.float32)
  bank = knn.KnnBank(train, hlo.mesh_of(devices), bank_chunk)
  subset = np.where(rng.random(203) < 0.3, labels, -1)  # a label fraction hides rows
  for lab in (labels, subset):
    scores = bank.scores(lab, test, 5, k=10, temperature=0.07, query_chunk=16)
    np.testing.assert_allclose(scores, _numpy_knn(train, lab, test, 5, 10, 0.07), rtol=2e-5)
  # One program for every query chunk (37 rows → 3 chunks of 16) and label fraction.
  assert knn.knn_vote(bank.mesh, 10, 5, 0.07)._cache_size() == 1


def _numpy_probe(x, y, classes, lr, init, epochs, optimizer, momentum, wd, warmup):
  """Full-batch version of MAE's probe loop: softmax CE, warm-up + cosine, SGD or LARS."""
  w, b = np.array(init['kernel'], np.float64), np.array(init['bias'], np.float64)
  mw, mb = np.zeros_like(w), np.zeros_like(b)
  onehot = np.eye(classes)[y]
  for step in range(epochs):
    rate = (lr * step / warmup if step < warmup else
            lr * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (epochs - warmup))))
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gw, gb = x.T @ (p - onehot) / len(x), (p - onehot).mean(0)
    gw = gw + wd * w
    if optimizer == 'lars':
      gw = gw * 0.001 * np.linalg.norm(w) / np.linalg.norm(gw)
    mw, mb = momentum * mw + gw, momentum * mb + gb
    w, b = w - rate * mw, b - rate * mb
  return w, b


@pytest.mark.parametrize('devices,optimizer', [(1, 'sgd'), (8, 'sgd'), (8, 'lars')])
def test_probe_training_matches_numpy_full_batch(devices, optimizer):
  x, y = _separable(n_per_class=16, classes=4, dim=8)
  lrs = (0.5, 40.0) if optimizer == 'lars' else (0.5, 2.0)
  heads = linear.train_linear(x, y, 4, lrs, epochs=5, batch_size=len(x), warmup_epochs=1,
                              optimizer=optimizer, weight_decay=0.01, seed=3,
                              mesh=hlo.mesh_of(devices))
  init = linear.init_head(jax.random.key(3), 8, 4)
  for i, lr in enumerate(lrs):
    w, b = _numpy_probe(x.astype(np.float64), y, 4, lr, init, 5, optimizer, 0.9, 0.01, 1)
    np.testing.assert_allclose(heads['kernel'][i], w, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(heads['bias'][i], b, rtol=2e-4, atol=1e-6)


def _compile_knn(devices, n, dim=64, queries=64):
  mesh = hlo.mesh_of(devices)
  return knn.knn_vote(mesh, 20, 10, 0.07).lower(
      hlo.abstract((devices, n // devices, dim), jnp.float32, mesh, ROWS),
      hlo.abstract((devices, n // devices), jnp.int32, mesh, ROWS),
      hlo.abstract((queries, dim), jnp.float32, mesh))


def _compile_probe(devices, n, dim=64, batch=2048):
  mesh = hlo.mesh_of(devices)
  fn = linear.probe_trainer(mesh, 10, epochs=2, local_batch=batch // devices, steps_per_epoch=2,
                            warmup_epochs=1, optimizer='sgd', momentum=0.9, weight_decay=0.0)
  return fn.lower(hlo.abstract((devices, n // devices, dim), jnp.float32, mesh, ROWS),
                  hlo.abstract((devices, n // devices), jnp.int32, mesh, ROWS),
                  hlo.abstract((3,), jnp.float32, mesh), hlo.abstract((), KEY, mesh))


def test_knn_and_probe_programs_do_not_grow_with_the_data():
  # A bank closed over as a constant would put its 4·n·64 bytes (16 MB here) into the HLO
  # text; as an argument only the digits of its shape change.
  for compile_fn in (_compile_knn, _compile_probe):
    small, big = (len(compile_fn(8, n).as_text()) for n in (4096, 65536))
    assert abs(big - small) < 0.05 * small and big < 200_000


@pytest.mark.parametrize('compile_fn', [_compile_knn, _compile_probe])
def test_knn_and_probe_split_their_flops_over_8_devices(compile_fn):
  n = 16384 if compile_fn is _compile_knn else 4096
  one, eight = (compile_fn(d, n).compile() for d in (1, 8))
  assert hlo.flops(eight) == pytest.approx(hlo.flops(one) / 8, rel=0.15)
  # Only the k·ndev candidates (kNN) or nothing (probe) is gathered, never the rows.
  assert all(size < n // 8 * 64 // 10 for size in hlo.all_gather_sizes(eight))
