"""Start-up validation of a training config: one clear error naming the key."""

import ml_collections

from mimjax.data import pipeline
from mimjax.objectives import base as objectives

POSITIVE_INTS = ('batch_size', 'grad_accum', 'log_every', 'checkpoint_every', 'keep_checkpoints')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError('config.<key>=...: expected ...') for the first bad value."""
  for key in ('objective', 'model', 'data', 'optim', 'seed') + POSITIVE_INTS:
    if key not in config:
      raise ValueError(f'config.{key} is missing')
  objectives.load(config.objective)
  for key in POSITIVE_INTS:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f'config.{key}={value!r}: expected a positive integer')
  if config.batch_size % config.grad_accum:
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by '
                     f'config.grad_accum={config.grad_accum}')
  ratio = config.get('mask_ratio')
  if ratio is not None and not 0.0 <= ratio < 1.0:
    raise ValueError(f'config.mask_ratio={ratio}: expected a value in [0, 1)')
  from mimjax.models.vit import DTYPES, model_dims
  if 'pretrained' not in config:  # eval configs take the model from the pretrained workdir
    model_dims(config.model)
  if config.model.get('dtype', 'float32') not in DTYPES:
    raise ValueError(f'config.model.dtype={config.model.dtype!r}: expected one of {list(DTYPES)}')
  from mimjax.models.attention import IMPLEMENTATIONS
  if config.model.get('attention', 'xla') not in IMPLEMENTATIONS:
    raise ValueError(f'config.model.attention={config.model.attention!r}: expected one of '
                     f'{IMPLEMENTATIONS}')
  pipeline.validate_data_config(config.data)
