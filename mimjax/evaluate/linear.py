"""Linear probes on cached frozen features: a learning-rate grid (and few-shot label fractions)
in one run, as an evaluator (`config.evals.<name>.module = 'linear'`).

The full protocol with augmentation and AbMILP / attentive pooling is the `linear_probe`
objective (trained by the shared trainer); this one trains BN + Linear on features extracted
once (eval view, no augmentation), vmapped over the lr grid. BatchNorm(affine=False) is
applied with the train-set mean/variance (what BN's running statistics converge to).
Features can be cached to `cache_dir` (npz) so a sweep re-uses them.

Scale: the features are a jit argument split by rows over every device; each step every device
takes its share of the batch from its own rows and the (D, C) gradients are summed
(docs/evaluation.md, "At scale").
"""

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from mimjax import optim
from mimjax import sharding
from mimjax.evaluate import base
from mimjax.evaluate import knn
from mimjax.objectives import accuracy


def standardize(train: np.ndarray, *others: np.ndarray, eps: float = 1e-6):
  """BatchNorm1d(affine=False) at its converged running statistics: (x − μ)/√(σ² + eps)."""
  mean, var = train.mean(0), train.var(0)
  scale = 1.0 / np.sqrt(var + eps)
  return tuple((x - mean) * scale for x in (train,) + others)


def init_head(key: jax.Array, dim: int, num_classes: int) -> dict:
  """Linear(D, classes) at MAE's probe init: kernel trunc-normal(0.01), bias 0."""
  return {'kernel': 0.01 * jax.random.truncated_normal(key, -2.0, 2.0, (dim, num_classes)),
          'bias': jnp.zeros((num_classes,))}


def probe_tx(schedule, optimizer: str, momentum: float,
             weight_decay: float) -> optax.GradientTransformation:
  """MAE's probe optimizer: LARS (trust 0.001), or SGD with momentum and L2 wd on the kernel."""
  if optimizer == 'lars':
    return optim.lars(schedule, weight_decay, 0.001, momentum)
  if optimizer == 'sgd':
    return optax.chain(optax.add_decayed_weights(weight_decay, {'kernel': True, 'bias': False}),
                       optax.sgd(schedule, momentum=momentum or None))
  raise ValueError(f'probe optimizer={optimizer!r}: expected "lars" or "sgd"')


def probe_trainer(mesh, num_classes: int, *, epochs: int, local_batch: int,
                  steps_per_epoch: int, warmup_epochs: int, optimizer: str, momentum: float,
                  weight_decay: float):
  """jit(x (ndev, n_local, D), y (ndev, n_local), lrs (L,), key) → heads
  {'kernel': (L, D, C), 'bias': (L, C)}.

  x/y are split by rows over every device of `mesh` (labels < 0: padding). Each epoch every
  device permutes its own rows and each step takes `local_batch` of them, so a step's global
  batch is `local_batch`·ndev rows, none of which leaves its device; gradients are summed over
  the mesh (a (D, C) all-reduce)."""
  axes = sharding.BATCH_AXES
  total = epochs * steps_per_epoch
  warmup = warmup_epochs * steps_per_epoch

  def local(x, y, lrs, key):
    x, y = x[0], y[0]  # this device's (1, n_local, ...) block
    n_local, dim = x.shape
    device_key = jax.random.fold_in(key, jax.lax.axis_index(axes))
    init = init_head(key, dim, num_classes)

    def run(peak):
      tx = probe_tx(optim.warmup_cosine(peak, total, warmup), optimizer, momentum, weight_decay)

      def loss_fn(p, idx, count):
        logits = x[idx] @ p['kernel'] + p['bias']
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y[idx], 0))
        return jnp.sum(jnp.where(y[idx] >= 0, ce, 0.0)) / count

      def step(carry, idx):
        p, s = carry
        count = jnp.maximum(jax.lax.psum(jnp.sum(y[idx] >= 0), axes), 1).astype(jnp.float32)
        grads = jax.lax.psum(jax.grad(loss_fn)(p, idx, count), axes)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

      def epoch(carry, e):
        order = jax.random.permutation(jax.random.fold_in(device_key, e), n_local)
        batches = order[:steps_per_epoch * local_batch].reshape(steps_per_epoch, local_batch)
        return jax.lax.scan(step, carry, batches)[0], None

      (p, _), _ = jax.lax.scan(epoch, (init, tx.init(init)), jnp.arange(epochs))
      return p

    return jax.vmap(run)(lrs)

  spec = P(axes)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()),
                               out_specs=P(), check_vma=False))


def train_linear(x: np.ndarray, y: np.ndarray, num_classes: int, lrs, *, epochs: int = 90,
                 batch_size: int = 256, warmup_epochs: int = 10, optimizer: str = 'lars',
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 mesh=None) -> dict:
  """Trains one Linear(D, classes) per peak lr (vmapped) with MAE's probe recipe (LARS or SGD,
  warm-up + cosine per step, trunc-normal(0.01) init); returns {'kernel': (L, D, C), 'bias'}.

  Every lr sees the same batches. The features are split by rows over `mesh` (see
  `probe_trainer`); the global batch is `batch_size` rounded down to a multiple of the device
  count (at least one row per device), and an epoch is ⌈n/ndev⌉ // (batch/ndev) steps."""
  mesh = mesh or sharding.default_mesh()
  n = len(x)
  local_batch = max(min(batch_size, n) // mesh.size, 1)
  n_local = sharding.row_chunk(n, mesh, n)  # one block of ⌈n/ndev⌉ rows per device
  fn = probe_trainer(mesh, num_classes, epochs=epochs, local_batch=local_batch,
                     steps_per_epoch=max(n_local // local_batch, 1),
                     warmup_epochs=warmup_epochs, optimizer=optimizer, momentum=momentum,
                     weight_decay=weight_decay)
  return fn(sharding.shard_rows(np.asarray(x, np.float32), mesh, n_local),
            sharding.shard_rows(np.asarray(y, np.int32), mesh, n_local, -1),
            jnp.asarray(lrs, jnp.float32), jax.random.key(seed))


def probe_sweep(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                test_y: np.ndarray, num_classes: int, lrs, **kw) -> dict:
  """Top-1/top-5 on the test set for every lr, plus the best lr's numbers."""
  tr, te = standardize(train_x, test_x)
  heads = train_linear(tr, train_y, num_classes, lrs, **kw)
  out, best = {}, None
  for i, lr in enumerate(lrs):
    logits = np.asarray(te @ np.asarray(heads['kernel'][i]) + np.asarray(heads['bias'][i]))
    acc = accuracy.topk_accuracy(logits, test_y)
    out.update({f'{k}@lr={lr:g}': v for k, v in acc.items()})
    if best is None or acc['top1'] > best[1]['top1']:
      best = (lr, acc)
  out.update(best[1])
  out['best_lr'] = best[0]
  return out


class LinearProbe(base.Evaluator):
  """Evaluator: cached-feature linear probe over `lrs` (and `fractions` of the train labels)."""

  SPLIT_KEYS = knn.TRAIN_TEST_SPLITS

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               objective: Any, mesh):
    super().__init__(name, cfg, config, objective, mesh)
    self.extractor = self.make_extractor(config)

  def _features(self, encoder: Any, split: str, limit: Optional[int]):
    cache = self.cfg.get('cache_dir')
    path = cache and os.path.join(cache, f'{self.name}_{split}.npz')
    if path and os.path.exists(path):
      data = np.load(path)
      return data['x'], data['y']
    x, y = self.extractor(encoder, split, limit)
    if path:
      os.makedirs(cache, exist_ok=True)
      np.savez(path, x=x, y=y)
    return x, y

  def run(self, params: Any, state: Any) -> dict:
    enc = self.encoder_params(params, state)
    train_x, train_y = self._features(enc, self.split('train_split'), self.cfg.get('max_train'))
    test_x, test_y = self._features(enc, self.split('test_split'), self.cfg.get('max_test'))
    classes = knn.num_classes_of(self.cfg, train_y, test_y)
    out = {}
    for fraction in tuple(self.cfg.get('fractions', (1.0,))):
      idx = knn.label_subset(train_y, fraction, self.seed)
      res = probe_sweep(train_x[idx], train_y[idx], test_x, test_y, classes,
                        tuple(self.cfg.get('lrs', (0.1,))),
                        epochs=int(self.cfg.get('epochs', 90)),
                        batch_size=int(self.cfg.get('probe_batch_size', 256)),
                        warmup_epochs=int(self.cfg.get('warmup_epochs', 10)),
                        optimizer=self.cfg.get('optimizer', 'lars'),
                        momentum=float(self.cfg.get('momentum', 0.9)),
                        weight_decay=float(self.cfg.get('weight_decay', 0.0)), seed=self.seed,
                        mesh=self.mesh)
      out.update({f'{k}{knn.fraction_tag(fraction)}': v for k, v in res.items()})
    return out


def make(name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
         objective: Any, mesh) -> LinearProbe:
  """`config.evals.<name>.module = 'linear'` → the cached-feature linear probe evaluator."""
  return LinearProbe(name, cfg, config, objective, mesh)
