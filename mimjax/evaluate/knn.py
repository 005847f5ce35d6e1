"""Weighted k-NN classifier on frozen features (DINO `eval_knn.py`), also a pretraining monitor.

    config.evals.knn = {module: 'knn', every_steps: 500, k: 20, temperature: 0.07}

Features: l2-normalised pooled tokens of the eval view of the train and test splits; class
score = Σ over the k most cosine-similar train examples of exp(sim / T); reports top-1/top-5.
`fractions` (e.g. (1.0, 0.1, 0.01)) repeats the vote with a per-class subset of the train
labels (few-shot; our subsets are seeded random draws, not ImageNet's fixed 1%/10% lists).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax.evaluate import features


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """x / max(‖x‖, eps) row-wise (torch F.normalize)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def knn_scores(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
               num_classes: int, k: int = 20, temperature: float = 0.07,
               chunk: int = 1024) -> np.ndarray:
  """DINO's weighted vote: (n_test, classes) scores Σ_{top-k} exp(cos / T) per class."""
  train = jnp.asarray(l2_normalize(train_features))
  labels = jnp.asarray(train_labels, jnp.int32)
  k = min(k, train.shape[0])

  @jax.jit
  def vote(test):
    sims, idx = jax.lax.top_k(test @ train.T, k)
    onehot = jax.nn.one_hot(labels[idx], num_classes, dtype=jnp.float32)
    return jnp.einsum('nk,nkc->nc', jnp.exp(sims / temperature), onehot)

  test = l2_normalize(test_features)
  return np.concatenate([np.asarray(vote(jnp.asarray(test[i:i + chunk])))
                         for i in range(0, len(test), chunk)]) if len(test) else \
      np.zeros((0, num_classes), np.float32)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict:
  """{'top{k}': % of rows whose label is among the k best scores} (ties: lower class first)."""
  order = np.argsort(-scores, axis=-1, kind='stable')
  return {f'top{k}': 100.0 * float(np.mean(np.any(order[:, :k] == labels[:, None], axis=-1)))
          for k in ks}


def label_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """Indices of a seeded per-class random `fraction` of the examples (≥ 1 per class)."""
  if not 0 < fraction <= 1:
    raise ValueError(f'label fraction {fraction}: expected a value in (0, 1]')
  if fraction == 1:
    return np.arange(len(labels))
  rng = np.random.default_rng(seed)
  keep = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    keep.append(rng.choice(idx, max(1, int(round(fraction * len(idx)))), replace=False))
  return np.sort(np.concatenate(keep))


def fraction_tag(fraction: float) -> str:
  """1.0 → '', 0.1 → '@10%', 0.01 → '@1%' (metric-name suffix)."""
  return '' if fraction == 1 else f'@{100 * fraction:g}%'


def num_classes_of(config: ml_collections.ConfigDict, *labels: np.ndarray) -> int:
  """`cfg.num_classes` if set, else 1 + the largest label seen."""
  return int(config.get('num_classes') or 1 + max(int(l.max()) for l in labels if len(l)))


class KNN(features.Evaluator):
  """Evaluator: kNN top-1/top-5 of the encoder at `objective.encoder` (see module doc)."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               objective: Any, mesh):
    super().__init__(name, cfg, config, objective, mesh)
    self.extractor = self.make_extractor(config)
    # the trainer checks these exist at start-up
    self.splits = (cfg.get('train_split', 'train'), cfg.get('test_split', 'test'))

  def run(self, params: Any, state: Any) -> dict:
    del state
    enc = features.subtree(params, self.path)
    train_x, train_y = self.extractor(enc, self.cfg.get('train_split', 'train'),
                                      self.cfg.get('max_train'))
    test_x, test_y = self.extractor(enc, self.cfg.get('test_split', 'test'),
                                    self.cfg.get('max_test'))
    classes = num_classes_of(self.cfg, train_y, test_y)
    out = {}
    for fraction in tuple(self.cfg.get('fractions', (1.0,))):
      idx = label_subset(train_y, fraction, self.seed)
      scores = knn_scores(train_x[idx], train_y[idx], test_x, classes,
                          int(self.cfg.get('k', 20)), float(self.cfg.get('temperature', 0.07)))
      out.update({f'{k}{fraction_tag(fraction)}': v
                  for k, v in topk_accuracy(scores, test_y).items()})
    return out


def make(name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
         objective: Any, mesh) -> KNN:
  """`config.evals.<name>.module = 'knn'` → the kNN evaluator."""
  return KNN(name, cfg, config, objective, mesh)
