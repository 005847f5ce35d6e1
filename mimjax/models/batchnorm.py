"""BatchNorm running statistics as objective state (LUT heads, BN probe heads, ...).

Objectives keep a module's `params` in the trained params and its `batch_stats` in the
non-trained objective state; these helpers run such a module and hand the statistics back.

Cross-device synchronisation: the trainer jits the step with the batch sharded over the mesh
(NamedSharding). A BatchNorm's mean/variance over the batch axis of such a global array is a
reduction over the *whole global batch* — XLA inserts the all-reduce — so it behaves like
torch SyncBatchNorm without any `axis_name`. (An `axis_name` is only needed under pmap /
shard_map, which mimjax does not use.) With `grad_accum > 1` the statistics are those of each
micro-batch (B / grad_accum examples spread over all devices), as in torch with accum_iter.
"""

from typing import Any

import flax.linen as nn

Params = Any
BatchStats = Any


def init(module: nn.Module, rng, *args, **kwargs) -> tuple[Params, BatchStats]:
  """Initialises `module` (in eval mode, so any batch size works) → (params, batch_stats)."""
  variables = module.init({'params': rng}, *args, train=False, **kwargs)
  return variables.get('params', {}), variables.get('batch_stats', {})


def apply(module: nn.Module, params: Params, batch_stats: BatchStats, *args, train: bool,
          **kwargs) -> tuple[Any, BatchStats]:
  """Runs `module`; returns (output, batch_stats).

  train=True: normalises with this batch's statistics (global batch under jit) and returns
  the updated running statistics. train=False: normalises with the running statistics and
  returns them unchanged.
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  if not train:
    return module.apply(variables, *args, train=False, **kwargs), batch_stats
  out, updates = module.apply(variables, *args, train=True, mutable=['batch_stats'], **kwargs)
  return out, updates.get('batch_stats', batch_stats)
