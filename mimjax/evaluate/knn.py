"""Weighted k-NN classifier on frozen features (DINO `eval_knn.py`), also a pretraining monitor.

    config.evals.knn = {module: 'knn', every_steps: 500, k: 20, temperature: 0.07}

Features: l2-normalised pooled tokens of the eval view of the train and test splits; class
score = Σ over the k most cosine-similar train examples of exp(sim / T); reports top-1/top-5.
`fractions` (e.g. (1.0, 0.1, 0.01)) repeats the vote with a per-class subset of the train
labels (few-shot; our subsets are seeded random draws, not ImageNet's fixed 1%/10% lists).

Scale: the bank is a jit argument split by rows over every device; each device votes a
replicated chunk of `query_chunk` test rows against its shard in blocks of `bank_chunk` rows
(running top-k), and the k·ndev candidates are merged (docs/evaluation.md, "At scale").
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from mimjax import sharding
from mimjax.evaluate import base
from mimjax.objectives import accuracy


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """x / max(‖x‖, eps) row-wise (torch F.normalize)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.lru_cache(maxsize=None)
def knn_vote(mesh, k: int, num_classes: int, temperature: float):
  """jit(bank (B, chunk, D), labels (B, chunk), queries (q, D)) → (q, classes) DINO votes.

  bank/labels are split over every device of `mesh` on their first axis (`KnnBank` lays them
  out); each device keeps a running top-k over its chunks, then the k·ndev candidates are
  merged. Labels < 0 mark rows outside the bank (padding, or not in a label fraction)."""
  axes = sharding.BATCH_AXES

  def local(bank, labels, queries):
    # bank (chunks, chunk, D) and labels (chunks, chunk): this device's rows; queries replicated.
    q = queries.shape[0]

    def merge(carry, block):
      # Running top-k over the shard: memory q·chunk for one block's similarities.
      best_s, best_l = carry
      rows, lab = block
      s = jnp.where(lab[None] >= 0, queries @ rows.T, -jnp.inf)
      s, i = jax.lax.top_k(s, min(k, rows.shape[0]))
      s = jnp.concatenate([best_s, s], axis=1)
      lab = jnp.concatenate([best_l, lab[i]], axis=1)
      s, i = jax.lax.top_k(s, k)
      return (s, jnp.take_along_axis(lab, i, axis=1)), None

    init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))
    (s, lab), _ = jax.lax.scan(merge, init, (bank, labels))
    # Merge the k·ndev candidates of all shards (small: q × k per device).
    s = jax.lax.all_gather(s, axes, axis=1, tiled=True)
    lab = jax.lax.all_gather(lab, axes, axis=1, tiled=True)
    s, i = jax.lax.top_k(s, k)
    lab = jnp.take_along_axis(lab, i, axis=1)
    onehot = jax.nn.one_hot(lab, num_classes, dtype=jnp.float32)  # label -1 → zero row
    return jnp.einsum('nk,nkc->nc', jnp.exp(s / temperature), onehot)

  spec = P(axes)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P()), out_specs=P(),
                               check_vma=False))


class KnnBank:
  """The l2-normalised train features, row-split over every device of `mesh` and laid out as
  (ndev · chunks, chunk, D) so that each device walks its shard in `chunk`-row blocks.

  Per-device memory: bank shard ⌈n/ndev⌉·(D + 1)·4 B + ≤ 2·q·chunk·4 B of one block's
  similarities and top-k + q·k·ndev·8 B of candidates + q·C·4 B of votes."""

  def __init__(self, train_features: np.ndarray, mesh=None, bank_chunk: int = 16384):
    self.mesh = mesh or sharding.default_mesh()
    self.n = len(train_features)
    self.chunk = sharding.row_chunk(self.n, self.mesh, bank_chunk)
    self.features = sharding.shard_rows(l2_normalize(train_features), self.mesh, self.chunk)

  def scores(self, train_labels: np.ndarray, test_features: np.ndarray, num_classes: int,
             k: int = 20, temperature: float = 0.07, query_chunk: int = 1024) -> np.ndarray:
    """DINO's vote (n_test, classes) over the rows whose label is ≥ 0 (−1: left out)."""
    labels = np.asarray(train_labels, np.int32)
    if labels.shape != (self.n,):
      raise ValueError(f'kNN labels: shape {labels.shape}, expected ({self.n},)')
    k = min(k, int((labels >= 0).sum()))
    if not len(test_features) or k == 0:
      return np.zeros((len(test_features), num_classes), np.float32)
    labels = sharding.shard_rows(labels, self.mesh, self.chunk, -1)
    vote = knn_vote(self.mesh, k, num_classes, float(temperature))
    q = max(1, min(int(query_chunk), len(test_features)))
    test = sharding.pad_rows(l2_normalize(test_features), q)
    queries = sharding.replicated(self.mesh)
    out = [np.asarray(vote(self.features, labels, jax.device_put(test[i:i + q], queries)))
           for i in range(0, len(test), q)]
    return np.concatenate(out)[:len(test_features)]


def knn_scores(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
               num_classes: int, k: int = 20, temperature: float = 0.07, *,
               query_chunk: int = 1024, bank_chunk: int = 16384, mesh=None) -> np.ndarray:
  """DINO's weighted vote: (n_test, classes) scores Σ_{top-k} exp(cos / T) per class."""
  return KnnBank(train_features, mesh, bank_chunk).scores(train_labels, test_features,
                                                          num_classes, k, temperature,
                                                          query_chunk)


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


# cfg keys of the bank / probe-training split and the query / test split, with their defaults.
TRAIN_TEST_SPLITS = {'train_split': 'train', 'test_split': 'test'}


class KNN(base.Evaluator):
  """Evaluator: kNN top-1/top-5 of the encoder at `objective.encoder` (see module doc)."""

  SPLIT_KEYS = TRAIN_TEST_SPLITS

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               objective: Any, mesh):
    super().__init__(name, cfg, config, objective, mesh)
    self.extractor = self.make_extractor(config)

  def run(self, params: Any, state: Any) -> dict:
    enc = self.encoder_params(params, state)
    train_x, train_y = self.extractor(enc, self.split('train_split'), self.cfg.get('max_train'))
    test_x, test_y = self.extractor(enc, self.split('test_split'), self.cfg.get('max_test'))
    classes = num_classes_of(self.cfg, train_y, test_y)
    # The bank goes to the devices once; a label fraction only hides rows (label −1).
    bank = KnnBank(train_x, self.mesh, int(self.cfg.get('bank_chunk', 16384)))
    out = {}
    for fraction in tuple(self.cfg.get('fractions', (1.0,))):
      labels = np.full_like(train_y, -1)
      idx = label_subset(train_y, fraction, self.seed)
      labels[idx] = train_y[idx]
      scores = bank.scores(labels, test_x, classes, int(self.cfg.get('k', 20)),
                           float(self.cfg.get('temperature', 0.07)),
                           int(self.cfg.get('query_chunk', 1024)))
      out.update({f'{k}{fraction_tag(fraction)}': v
                  for k, v in accuracy.topk_accuracy(scores, test_y).items()})
    return out


def make(name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
         objective: Any, mesh) -> KNN:
  """`config.evals.<name>.module = 'knn'` → the kNN evaluator."""
  return KNN(name, cfg, config, objective, mesh)
