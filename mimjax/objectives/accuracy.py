"""Top-1/top-5 of a classifier over a whole test split (padded examples excluded)."""

from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax import sharding
from mimjax.objectives import pretrained


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict:
  """{'top{k}': % of rows whose label is among the k best scores} (ties: lower class first)."""
  order = np.argsort(-scores, axis=-1, kind='stable')
  return {f'top{k}': 100.0 * float(np.mean(np.any(order[:, :k] == labels[:, None], axis=-1)))
          for k in ks}


def test_accuracy_fn(config: ml_collections.ConfigDict,
                     logits_fn: Callable[[Any, Any, jnp.ndarray], jnp.ndarray]) -> Callable:
  """evaluate(params, state) -> {'top1', 'top5'} (%) on `config.eval_split` (default 'test')
  with the eval view; logits_fn(params, state, uint8 images) -> (B, classes)."""
  mesh = sharding.make_mesh(config.mesh)
  batch_size = int(config.get('eval_batch_size') or config.batch_size)
  split = config.get('eval_split', 'test')

  fn = sharding.jit_on(mesh, lambda ps, images: logits_fn(ps[0], ps[1], images)
                       .astype(jnp.float32))

  def evaluate(params, state):
    logits, labels = pretrained.extract(fn, (params, state), config.data, mesh, split,
                                      batch_size, config.seed)
    return topk_accuracy(np.asarray(logits), labels)

  return evaluate
