"""Top-1/top-5 of a classifier over a whole test split (padded examples excluded)."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimjax.evaluate import features
from mimjax.evaluate import knn
from mimjax.train import sharding


def test_accuracy_fn(config: ml_collections.ConfigDict,
                     logits_fn: Callable[[Any, Any, jnp.ndarray], jnp.ndarray]) -> Callable:
  """evaluate(params, state) -> {'top1', 'top5'} (%) on `config.eval_split` (default 'test')
  with the eval view; logits_fn(params, state, uint8 images) -> (B, classes)."""
  mesh = sharding.make_mesh(config.mesh)
  batch_size = int(config.get('eval_batch_size') or config.batch_size)
  split = config.get('eval_split', 'test')

  fn = jax.jit(lambda ps, images: logits_fn(ps[0], ps[1], images).astype(jnp.float32))

  def evaluate(params, state):
    logits, labels = features.extract(fn, (params, state), config.data, mesh, split,
                                      batch_size, config.seed)
    return knn.topk_accuracy(np.asarray(logits), labels)

  return evaluate
