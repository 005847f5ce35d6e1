"""Linear probes on cached frozen features: a learning-rate grid (and few-shot label fractions)
in one run, as an evaluator (`config.evals.<name>.module = 'linear'`).

The full protocol with augmentation and AbMILP / attentive pooling is the `linear_probe`
objective (trained by the shared trainer); this one trains BN + Linear on features extracted
once (eval view, no augmentation), vmapped over the lr grid. BatchNorm(affine=False) is
applied with the train-set mean/variance (what BN's running statistics converge to).
Features can be cached to `cache_dir` (npz) so a sweep re-uses them.
"""

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mimjax.evaluate import features
from mimjax.evaluate import knn
from mimjax.train import optim


def standardize(train: np.ndarray, *others: np.ndarray, eps: float = 1e-6):
  """BatchNorm1d(affine=False) at its converged running statistics: (x − μ)/√(σ² + eps)."""
  mean, var = train.mean(0), train.var(0)
  scale = 1.0 / np.sqrt(var + eps)
  return tuple((x - mean) * scale for x in (train,) + others)


def train_linear(x: np.ndarray, y: np.ndarray, num_classes: int, lrs, *, epochs: int = 90,
                 batch_size: int = 256, warmup_epochs: int = 10, optimizer: str = 'lars',
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0) -> dict:
  """Trains one Linear(D, classes) per peak lr (vmapped) with MAE's probe recipe (LARS or SGD,
  warm-up + cosine per step, trunc-normal(0.01) init); returns {'kernel': (L, D, C), 'bias'}."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  n, dim = x.shape
  batch_size = min(batch_size, n)
  steps_per_epoch = max(n // batch_size, 1)
  total = epochs * steps_per_epoch
  warmup = warmup_epochs * steps_per_epoch
  key = jax.random.key(seed)
  init = {'kernel': 0.01 * jax.random.truncated_normal(key, -2.0, 2.0, (dim, num_classes)),
          'bias': jnp.zeros((num_classes,))}
  # Every lr sees the same batches (one permutation per epoch).
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(
      jax.random.split(jax.random.fold_in(key, 1), epochs))
  batches = perms[:, :steps_per_epoch * batch_size].reshape(total, batch_size)

  def run(peak):
    schedule = optim.warmup_cosine(peak, total, warmup)
    if optimizer == 'lars':
      tx = optim.lars(schedule, weight_decay, 0.001, momentum)
    elif optimizer == 'sgd':
      tx = optax.chain(optax.add_decayed_weights(weight_decay,
                                                 {'kernel': True, 'bias': False}),
                       optax.sgd(schedule, momentum=momentum or None))
    else:
      raise ValueError(f'probe optimizer={optimizer!r}: expected "lars" or "sgd"')

    def loss_fn(p, idx):
      logits = x[idx] @ p['kernel'] + p['bias']
      return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

    def step(carry, idx):
      p, s = carry
      grads = jax.grad(loss_fn)(p, idx)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None

    (p, _), _ = jax.lax.scan(step, (init, tx.init(init)), batches)
    return p

  return jax.jit(jax.vmap(run))(jnp.asarray(lrs, jnp.float32))


def probe_sweep(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                test_y: np.ndarray, num_classes: int, lrs, **kw) -> dict:
  """Top-1/top-5 on the test set for every lr, plus the best lr's numbers."""
  tr, te = standardize(train_x, test_x)
  heads = train_linear(tr, train_y, num_classes, lrs, **kw)
  out, best = {}, None
  for i, lr in enumerate(lrs):
    logits = np.asarray(te @ np.asarray(heads['kernel'][i]) + np.asarray(heads['bias'][i]))
    acc = knn.topk_accuracy(logits, test_y)
    out.update({f'{k}@lr={lr:g}': v for k, v in acc.items()})
    if best is None or acc['top1'] > best[1]['top1']:
      best = (lr, acc)
  out.update(best[1])
  out['best_lr'] = best[0]
  return out


class LinearProbe(features.Evaluator):
  """Evaluator: cached-feature linear probe over `lrs` (and `fractions` of the train labels)."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               objective: Any, mesh):
    super().__init__(name, cfg, config, objective, mesh)
    self.extractor = self.make_extractor(config)

  def _features(self, params: Any, split: str, limit: Optional[int]):
    cache = self.cfg.get('cache_dir')
    path = cache and os.path.join(cache, f'{self.name}_{split}.npz')
    if path and os.path.exists(path):
      data = np.load(path)
      return data['x'], data['y']
    x, y = self.extractor(features.subtree(params, self.path), split, limit)
    if path:
      os.makedirs(cache, exist_ok=True)
      np.savez(path, x=x, y=y)
    return x, y

  def run(self, params: Any, state: Any) -> dict:
    del state
    train_x, train_y = self._features(params, self.cfg.get('train_split', 'train'),
                                      self.cfg.get('max_train'))
    test_x, test_y = self._features(params, self.cfg.get('test_split', 'test'),
                                    self.cfg.get('max_test'))
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
                        weight_decay=float(self.cfg.get('weight_decay', 0.0)), seed=self.seed)
      out.update({f'{k}{knn.fraction_tag(fraction)}': v for k, v in res.items()})
    return out


def make(name: str, cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
         objective: Any, mesh) -> LinearProbe:
  """`config.evals.<name>.module = 'linear'` → the cached-feature linear probe evaluator."""
  return LinearProbe(name, cfg, config, objective, mesh)
